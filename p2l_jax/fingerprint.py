"""Fingerprints: short stable hashes that tell one run's (or one file set's) inputs from another's.

Every fingerprint is the first 16 hex digits of SHA-256 over a sequence of byte chunks
(:func:`digest`); the helpers below only decide which bytes go in, so a fingerprint written
by an earlier version of a caller stays the same:

* :func:`settings_fingerprint` -- a JSON-able value, as ``json.dumps(value, sort_keys=True)``
  (``p2l-jax restore``'s output folder: a rerun with other settings is refused);
* :func:`tree_fingerprint` -- pytrees of arrays (shape, dtype, bytes; PRNG keys by their key
  data) and other leaves by ``repr``, in order (the in-flight checkpoints of the runner);
* :func:`files_fingerprint` -- the files of a folder, each as its relative path, a NUL byte
  and its bytes, in sorted order (a model's weights, so a retrained model at the same path
  is never mistaken for the old one).

64 bits of a cryptographic hash: collisions between the few fingerprints a folder ever
sees are not a practical concern.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np

#: Hex digits kept of the SHA-256 digest.
LENGTH = 16


def digest(chunks: Iterable[bytes]) -> str:
    """SHA-256 of the concatenated ``chunks``, first :data:`LENGTH` hex digits."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:LENGTH]


def settings_fingerprint(value: Any) -> str:
    """:func:`digest` of ``json.dumps(value, sort_keys=True)`` (key order does not matter)."""
    return digest([json.dumps(value, sort_keys=True).encode()])


def _tree_chunks(parts) -> Iterable[bytes]:
    for part in parts:
        leaves, treedef = jax.tree_util.tree_flatten(part)
        yield str(treedef).encode()
        for leaf in leaves:
            if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
                if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                    leaf = jax.random.key_data(leaf)
                a = np.ascontiguousarray(np.asarray(leaf))
                yield f"{a.shape}{a.dtype}".encode() + a.tobytes()
            else:
                yield repr(leaf).encode()


def tree_fingerprint(*parts) -> str:
    """:func:`digest` of pytrees: each part's tree structure, then each leaf (arrays by
    shape, dtype and bytes, PRNG keys by their data, anything else by ``repr``), in order."""
    return digest(_tree_chunks(parts))


def files_fingerprint(root: Path, keep: Callable[[Path], bool] = lambda f: True) -> str:
    """:func:`digest` of the files under ``root`` that ``keep`` accepts, in sorted order,
    each as ``relative path + NUL + contents``."""
    files = (f for f in sorted(Path(root).rglob("*")) if f.is_file() and keep(f))
    return digest(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() for f in files)
