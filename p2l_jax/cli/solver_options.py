"""Solver options of ``p2l-jax restore``: ``--solver`` names, and ``--set FIELD=VALUE``
overrides of any field of the frozen solver config (nested ``FIELD.SUBFIELD=VALUE`` for the
optimizer), parsed as the type of the field's current value."""

from __future__ import annotations

import dataclasses

from p2l_jax.errors import P2LError
from p2l_jax.solvers.registry import BY_NAME

#: --solver NAME -> registry entry: the solvers that restore a measurement.
SOLVERS = {name: solver for name, solver in BY_NAME.items() if solver.measured}


def solver_config(args):
    """The frozen solver config of ``--solver`` with ``--steps`` (and ``--prompt``)."""
    cls = SOLVERS[args.solver].config
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"num_steps": args.steps}
    if args.prompt is not None:
        if "prompt" not in fields:
            raise P2LError(f"--prompt is not an option of --solver {args.solver}")
        kwargs["prompt"] = args.prompt
    config = cls(**kwargs)
    for item in args.overrides:
        config = override_field(config, item, f"--solver {args.solver}")
    return config


def _coerce(text: str, current, option: str):
    """Parse ``text`` as the type of the field's current value (bool, int, float, str)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise P2LError(f"{option}: expected true/false, got {text!r}")
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise P2LError(f"{option}: expected {kind.__name__}, got {text!r}") from None
    return text


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
        value = override_field(current, f"{rest}={text}", f"{owner} {head}")
    else:
        value = _coerce(text, current, f"--set {name}")
    try:
        return dataclasses.replace(config, **{head: value})
    except (TypeError, ValueError) as err:
        raise P2LError(f"--set {name}={text}: {err}") from None
