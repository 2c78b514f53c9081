"""Disjoint index ranges of the procedural dataset: training, validation and test.

An index is the dataset seed (see :mod:`p2l_jax.data.shapes`); the ranges never overlap, so no
held-out image is ever drawn in training. Captions are shared: every one of the 2400 captions
occurs in every split.
"""

from __future__ import annotations

import numpy as np

from p2l_jax.errors import P2LError

SPLITS: dict[str, range] = {
    "train": range(0, 10**12),
    "validation": range(10**12, 10**12 + 10**6),
    "test": range(2 * 10**12, 2 * 10**12 + 10**6),
}


def split_indices(split: str, n: int, start: int = 0) -> np.ndarray:
    """The ``n`` indices ``start, ..., start + n - 1`` of ``split`` (int64), within its range."""
    if split not in SPLITS:
        raise P2LError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    bounds = SPLITS[split]
    if n < 0 or start < 0 or start + n > len(bounds):
        raise P2LError(f"split {split!r} holds {len(bounds)} indices; asked for "
                       f"[{start}, {start + n})")
    return np.arange(bounds.start + start, bounds.start + start + n, dtype=np.int64)


def split_of(index: int) -> str:
    """The split whose range holds ``index``."""
    for name, bounds in SPLITS.items():
        if index in bounds:
            return name
    raise P2LError(f"index {index} is in no split ({', '.join(SPLITS)})")
