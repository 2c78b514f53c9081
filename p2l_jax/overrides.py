"""``NAME=VALUE`` overrides of frozen config dataclasses: one parser for the command line's
``--set``, settings grids (:func:`p2l_jax.solvers.sweep`) and the harnesses' settings.

    config = set_field(P2LConfig(), "optimizer.learning_rate", "1e-3", option="--set")
    config = apply_assignment(config, "rho=0.5", option="--set", owner="--solver p2l")
    name, values = parse_values(P2LConfig(), "lam=0.01,0.001", option="--p2l-grid")

Names are the dataclass's fields; ``FIELD.SUBFIELD`` reaches a nested dataclass (the
prompt optimizer). A value given as text is parsed as the field's declared type: the
annotation's command-line types (``bool``, ``int``, ``float``, ``str``, and ``none`` where
it admits ``None``), tried in the annotation's order; where it names none, the current
value's type. Numbers must be finite: ``nan``, ``inf`` and overflowing literals such as
``1e400`` are refused. A value given as a number is converted to the field's declared
number type when that is exact (``4.0`` -> ``4`` for an ``int`` field, ``1`` -> ``1.0``
for a ``float``), else passed as it is. The config class then validates the result.

Every error is one :class:`P2LError` naming the option as written: an unknown field (with
the fields there are), a field without sub-fields, text that is no value of the type, or
the config's own refusal.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from p2l_jax.errors import P2LError

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def declared_types(config, name: str) -> tuple[type, ...]:
    """The command-line types (bool, int, float, str) and ``NoneType`` that the annotation of
    field ``name`` admits, in order; empty if it admits none (then the value's type rules)."""
    try:
        hint = typing.get_type_hints(type(config))[name]
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to the value
        return ()
    args = (typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,))
    return tuple(a for a in args if a in (bool, int, float, str, type(None)))


def _kinds(config, name: str) -> tuple[type, ...]:
    kinds = declared_types(config, name)
    if kinds:
        return kinds
    current = getattr(config, name)
    return next(((k,) for k in (bool, int, float) if isinstance(current, k)), (str,))


def _parse(text: str, kind: type, option: str):
    if kind is bool:
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise ValueError
    if kind is float:
        value = float(text)
        if not math.isfinite(value):
            raise P2LError(f"{option}: expected a finite number, got {text!r}")
        return value
    return kind(text)


def parse_text(text: str, kinds: tuple[type, ...], option: str):
    """``text`` parsed as the first of ``kinds`` that accepts it (P2LError naming
    ``option`` if none does)."""
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


def _convert(value, kinds: tuple[type, ...]):
    """A number as the declared number type where that loses nothing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or type(value) in kinds:
        return value
    if int in kinds and float(value).is_integer():
        return int(value)
    if float in kinds:
        return float(value)
    return value


def set_field(config, name: str, value: Any, *, option: str = "option",
              owner: str | None = None):
    """``config`` with field ``name`` (``FIELD.SUBFIELD`` for a nested dataclass) replaced by
    ``value``: text is parsed, numbers converted (module docstring). ``option`` and ``owner``
    (default: the config's class name) name the setting in errors."""
    return _set(config, name.split("."), name, value, option, owner or type(config).__name__)


def _set(config, path: list[str], name: str, value, option: str, owner: str):
    head = path[0]
    fields = {f.name for f in dataclasses.fields(config)}
    if head not in fields:
        raise P2LError(f"{option}: {name!r} is not an option of {owner}; options: "
                       f"{', '.join(sorted(fields))}")
    current = getattr(config, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise P2LError(f"{option}: {name!r}: {head} is a {type(current).__name__}, which "
                           "has no options to vary")  # e.g. a user's optax transform
        value = _set(current, path[1:], name, value, option, f"{owner} {head}")
    elif isinstance(value, str):
        value = parse_text(value, _kinds(config, head), f"{option} {name}")
    else:
        value = _convert(value, _kinds(config, head))
    try:
        return dataclasses.replace(config, **{head: value})
    except (TypeError, ValueError) as err:
        raise P2LError(f"{option} {name}={value}: {err}") from None


def set_fields(config, values, *, option: str = "option", owner: str | None = None):
    """``config`` with every ``name: value`` of ``values`` (a mapping or pairs) set in order."""
    for name, value in dict(values).items():
        config = set_field(config, name, value, option=option, owner=owner)
    return config


def split_assignment(text: str, option: str) -> tuple[str, str]:
    """``"NAME=VALUE"`` -> (NAME, VALUE); P2LError naming ``option`` without a ``=``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise P2LError(f"{option} {text!r}: expected FIELD=VALUE")
    return name, value


def apply_assignment(config, text: str, *, option: str = "--set", owner: str | None = None):
    """``config`` with one ``NAME=VALUE`` applied (the command line's ``--set``)."""
    name, value = split_assignment(text, option)
    return set_field(config, name, value, option=option, owner=owner)


def parse_values(config, text: str, *, option: str, names: dict[str, str] | None = None
                 ) -> tuple[str, tuple]:
    """``"NAME=V1,V2"`` -> (NAME, (v1, v2)), each value parsed as ``config``'s field NAME
    would be. ``names`` maps a harness's short names to config fields (``learning_rate`` ->
    ``optimizer.learning_rate``); the NAME returned is the one written."""
    name, values = split_assignment(text, option)
    field = (names or {}).get(name, name)
    parsed = []
    for item in values.split(","):
        updated = set_field(config, field, item, option=option)
        parsed.append(_read(updated, field))
    return name, tuple(parsed)


def _read(config, name: str):
    for part in name.split("."):
        config = getattr(config, part)
    return config
