"""Per-image measurement-noise keys, derived from the run seed and the image's file stem.

    key(seed, stem) = fold_in(jax.random.key(seed), crc32(utf8(stem)))

so an image's noise does not depend on its position in the input list or on the batch it
lands in, and a sidecar recording ``seed`` and ``stem`` reproduces it.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

NOISE_KEY_DERIVATION = "jax.random.fold_in(jax.random.key(seed), zlib.crc32(stem.encode('utf-8')))"


def stem_hash(stem: str) -> int:
    """CRC-32 of the UTF-8 stem, the value folded into the seed key."""
    return zlib.crc32(stem.encode("utf-8"))


def noise_key(seed: int, stem: str) -> jax.Array:
    """The measurement-noise key of the image whose file stem is ``stem``."""
    return jax.random.fold_in(jax.random.key(int(seed)), np.uint32(stem_hash(stem)))
