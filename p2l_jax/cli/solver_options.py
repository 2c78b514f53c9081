"""Solver options of ``p2l-jax restore``: ``--solver`` names, and ``--set FIELD=VALUE``
overrides of any field of the frozen solver config (nested ``FIELD.SUBFIELD=VALUE`` for the
optimizer), parsed as the field's declared type.

The type comes from the dataclass field's annotation (``float | None`` accepts a number or
``none``), or, where the annotation names no command-line type, from the current value.
Numbers must be finite: ``nan``, ``inf`` and overflowing literals such as ``1e400`` are
refused when parsed, naming the option, rather than reaching the sampler."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from p2l_jax.errors import P2LError
from p2l_jax.solvers.registry import BY_NAME

#: --solver NAME -> registry entry: the solvers that restore a measurement.
SOLVERS = {name: solver for name, solver in BY_NAME.items() if solver.measured}

_NONE_WORDS = ("none", "null")


def default_steps_help() -> str:
    """``--steps`` help: the default is the solver config's ``num_steps``."""
    defaults = sorted({f.default for solver in SOLVERS.values()
                       for f in dataclasses.fields(solver.config) if f.name == "num_steps"})
    value = str(defaults[0]) if len(defaults) == 1 else "/".join(map(str, defaults))
    return f"number of sampler steps (default: the solver config's num_steps, {value} [paper])"


#: --preset NAME: "default" is the config class's own defaults (this project's, tuned on the
#: embedded model); "paper" the paper's settings as re-implementations read them, for solvers
#: whose config has a ``paper()`` preset (P2LConfig.paper).
PRESETS = ("default", "paper")


def solver_config(args):
    """The frozen solver config of ``--solver`` and ``--preset`` with ``--steps`` (and
    ``--prompt``), then every ``--set``."""
    cls = SOLVERS[args.solver].config
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {} if args.steps is None else {"num_steps": args.steps}
    if args.prompt is not None:
        if "prompt" not in fields:
            raise P2LError(f"--prompt is not an option of --solver {args.solver}")
        kwargs["prompt"] = args.prompt
    preset = getattr(args, "preset", "default")
    if preset == "paper" and not hasattr(cls, "paper"):
        raise P2LError(f"--preset paper: --solver {args.solver} has no paper preset (only "
                       f"{', '.join(n for n, s in SOLVERS.items() if hasattr(s.config, 'paper'))})")
    config = cls.paper(**kwargs) if preset == "paper" else cls(**kwargs)
    for item in args.overrides:
        config = override_field(config, item, f"--solver {args.solver}")
    return config


def _declared_types(config, name: str) -> tuple[type, ...]:
    """The command-line types (bool, int, float, str) and ``NoneType`` that the annotation of
    field ``name`` admits, in order; empty if it admits none (then the value's type rules)."""
    try:
        hint = typing.get_type_hints(type(config))[name]
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to the value
        return ()
    args = (typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,))
    return tuple(a for a in args if a in (bool, int, float, str, type(None)))


def _parse(text: str, kind: type, option: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if kind is float:
        value = float(text)
        if not math.isfinite(value):
            raise P2LError(f"{option}: expected a finite number, got {text!r}")
        return value
    return kind(text)


def _coerce(text: str, kinds: tuple[type, ...], option: str):
    """Parse ``text`` as the first of ``kinds`` that accepts it."""
    if type(None) in kinds and text.lower() in _NONE_WORDS:
        return None
    for kind in kinds:
        if kind is type(None):
            continue
        try:
            return _parse(text, kind, option)
        except ValueError:
            continue
    names = [("true/false" if k is bool else "none" if k is type(None) else k.__name__)
             for k in kinds]
    raise P2LError(f"{option}: expected {' or '.join(names)}, got {text!r}")


def override_field(config, assignment: str, owner: str):
    """``config`` with one ``FIELD=VALUE`` (or ``FIELD.SUBFIELD=VALUE``) replaced."""
    name, sep, text = assignment.partition("=")
    if not sep or not name:
        raise P2LError(f"--set {assignment!r}: expected FIELD=VALUE")
    head, _, rest = name.partition(".")
    fields = {f.name for f in dataclasses.fields(config)}
    if head not in fields:
        raise P2LError(f"--set {name}: not an option of {owner}; options: {', '.join(sorted(fields))}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise P2LError(f"--set {name}: {head} has no sub-options")
        try:
            value = override_field(current, f"{rest}={text}", f"{owner} {head}")
        except P2LError as err:  # name the option as the user wrote it
            raise P2LError(str(err).replace(f"--set {rest}", f"--set {name}", 1)) from None
    else:
        kinds = _declared_types(config, head)
        if not kinds:
            kinds = next(((k,) for k in (bool, int, float) if isinstance(current, k)), (str,))
        value = _coerce(text, kinds, f"--set {name}")
    try:
        return dataclasses.replace(config, **{head: value})
    except (TypeError, ValueError) as err:
        raise P2LError(f"--set {name}={text}: {err}") from None
