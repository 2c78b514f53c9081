"""Exact, compact JSON encodings of the arrays operators hold (masks, kernels).

Binary arrays (all entries 0 or 1) are stored as ``np.packbits`` bits, anything else as the
raw little-endian float32 bytes; both base64-encoded with the shape, so decoding reproduces
the array bit for bit.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from p2l_jax.errors import P2LError


def encode_array(a) -> dict[str, Any]:
    """``{"shape", "encoding": "bits" | "float32", "data"}`` for a numpy/JAX array."""
    a = np.asarray(a, dtype=np.float32)
    if np.all((a == 0) | (a == 1)):
        raw, encoding = np.packbits(a.astype(bool).ravel()).tobytes(), "bits"
    else:
        raw, encoding = a.astype("<f4").tobytes(), "float32"
    return {"shape": list(a.shape), "encoding": encoding,
            "data": base64.b64encode(raw).decode("ascii")}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    """Invert :func:`encode_array`; returns float32."""
    try:
        shape = tuple(int(s) for s in d["shape"])
        raw = base64.b64decode(d["data"])
        n = int(np.prod(shape))
        if d["encoding"] == "bits":
            flat = np.unpackbits(np.frombuffer(raw, np.uint8), count=n).astype(np.float32)
        elif d["encoding"] == "float32":
            flat = np.frombuffer(raw, "<f4").astype(np.float32)
        else:
            raise ValueError(f"unknown encoding {d['encoding']!r}")
        return flat.reshape(shape)
    except (KeyError, TypeError, ValueError) as err:
        raise P2LError(f"cannot decode stored array: {err}") from None
