"""Parsing diffusers ``config.json`` dicts into the frozen-dataclass network configs.

A config file carries many keys (``_class_name``, ``_diffusers_version``, ``sample_size``,
training-only options, ...). :func:`config_from_dict` keeps the keys that are fields of the
dataclass, turns JSON lists into tuples (so configs stay hashable and usable as static jit
arguments), and refuses architecture options this project does not implement when they are set
to anything but their inert default, so an unsupported checkpoint fails loudly instead of
running a different network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from p2l_jax.errors import P2LError

T = TypeVar("T")


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def config_from_dict(cls: type[T], config: Mapping[str, Any], *, source: str,
                     unsupported: Mapping[str, Any] = ()) -> T:
    """Build ``cls`` from ``config``, ignoring unknown keys.

    Args:
      cls: a frozen dataclass whose ``__post_init__`` validates and raises P2LError.
      config: the parsed ``config.json``.
      source: names the file in error messages (e.g. ``"unet/config.json"``).
      unsupported: key -> the only accepted value (or a tuple of accepted values); a config
        that sets such a key to anything else raises P2LError naming the key.
    """
    if not isinstance(config, Mapping):
        raise P2LError(f"{source}: expected a JSON object, got {type(config).__name__}")
    for key, accepted in dict(unsupported).items():
        accepted = accepted if isinstance(accepted, tuple) else (accepted,)
        if key in config and _frozen(config[key]) not in accepted:
            raise P2LError(f"{source}: {key}={config[key]!r} is not supported "
                           f"(supported: {', '.join(map(repr, accepted))})")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _frozen(v) for k, v in config.items() if k in names}
    try:
        return cls(**kwargs)
    except P2LError as err:
        raise P2LError(f"{source}: {err}") from err
    except (TypeError, ValueError) as err:
        raise P2LError(f"{source}: invalid {cls.__name__}: {err}") from err


def per_block(value: Any, n: int, key: str) -> tuple:
    """``value`` as an n-tuple: an int (or None) is repeated, a sequence must have length n."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise P2LError(f"{key} has {len(value)} entries but there are {n} blocks")
        return value
    return (value,) * n


def check_block_counts(config) -> None:
    """Raise unless ``down_block_types``, ``up_block_types`` and ``block_out_channels`` of a
    UNet or VAE config have the same non-zero length."""
    n = len(config.block_out_channels)
    if n == 0 or len(config.down_block_types) != n or len(config.up_block_types) != n:
        raise P2LError(f"down_block_types ({len(config.down_block_types)}), up_block_types "
                       f"({len(config.up_block_types)}) and block_out_channels ({n}) must "
                       "have the same non-zero length")
