"""Checkpoint tensors <-> Flax NNX parameter states.

The NNX networks in :mod:`p2l_jax.models` name their attributes exactly as the diffusers and
transformers PyTorch modules name their state-dict keys, so one rule converts every network:

================================  =====================  ===========================
NNX leaf (path joined with ".")   torch key leaf         layout
================================  =====================  ===========================
``kernel``, 4-D (kh, kw, in, out)  ``weight`` (out, in, kh, kw)  transpose (2, 3, 1, 0)
``kernel``, 2-D (in, out)          ``weight`` (out, in)  transpose
``scale`` (norms)                  ``weight``            as is
``embedding``                      ``weight``            as is
``bias``                           ``bias``              as is
================================  =====================  ===========================

A few historical spellings are normalised per component before matching: CLIP text encoders
saved with or without the ``text_model.`` prefix (SD checkpoints have it, transformers 5 drops
it), the ``position_ids`` buffer older checkpoints carry (positions are computed, never
loaded), and the VAE's pre-0.14 attention names (``query``/``key``/``value``/``proj_attn``).

Loading is strict: every checkpoint tensor must be used and every parameter filled, otherwise
:class:`~p2l_jax.errors.P2LError` lists the missing and unexpected keys; a shape mismatch names
the key and both shapes. Nothing here imports torch unless a pickle is explicitly allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2l_jax.errors import P2LError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_SAFETENSORS_STEMS = ("diffusion_pytorch_model", "model")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_MAX_LISTED_KEYS = 12

# Pre-0.14 diffusers VAE attention blocks; diffusers itself renames these on load.
_LEGACY_VAE_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}
_LEGACY_VAE_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


# ----------------------------------------------------------------------------- reading files
def read_component_tensors(directory: str | Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read every tensor of one component directory (e.g. ``unet/``) into numpy arrays.

    Accepts a single safetensors file or a sharded one with its ``.index.json`` (whose shards
    must be plain file names in ``directory``: an index cannot point outside it); pickled
    ``.bin``/``.ckpt`` files are refused unless ``allow_pickle`` is set, in which case they are
    read with ``torch.load(weights_only=True)`` (the one place torch may be imported).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise P2LError(f"component directory not found: {directory}")
    for stem in _SAFETENSORS_STEMS:
        single = directory / f"{stem}.safetensors"
        index = directory / f"{stem}.safetensors.index.json"
        if single.is_file():
            return _read_safetensors([single])
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise P2LError(f"{index}: not a safetensors index ({err})") from None
            return _read_safetensors(_shard_paths(index, weight_map))
    variants = sorted(directory.glob("*.safetensors"))
    if variants:  # e.g. diffusion_pytorch_model.fp16.safetensors when it is the only file
        return _read_safetensors(variants[:1])
    pickles = sorted(p for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise P2LError(
                f"{pickles[0]}: pickled checkpoints can run arbitrary code and are refused; "
                "convert it to safetensors or pass allow_pickle=True (--allow-pickle)"
            )
        return _read_pickle(pickles[0])
    raise P2LError(f"{directory}: no weights file (*.safetensors) found")


def _shard_paths(index: Path, weight_map) -> list[Path]:
    """The shard files an index names, each a plain file name next to the index."""
    if not isinstance(weight_map, dict):
        raise P2LError(f"{index}: weight_map is not an object")
    names = sorted(set(weight_map.values()), key=str)
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise P2LError(f"{index}: shard {name!r} is outside {index.parent} (an index may "
                           "name only files in its own folder)")
    return [index.parent / name for name in names]


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise P2LError(f"weights shard missing: {file}")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as err:
            raise P2LError(f"{file}: cannot read safetensors ({err})") from None
        except TypeError as err:  # bfloat16 tensors: numpy has no native bf16 before ml_dtypes
            raise P2LError(f"{file}: unsupported tensor dtype ({err})") from None
    return tensors


def _read_pickle(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # only on explicit opt-in
    except ImportError:
        raise P2LError(f"{file}: reading a pickled checkpoint needs torch, which is not "
                       "installed (pip install torch), or convert it to safetensors") from None

    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many unrelated types here
        raise P2LError(f"{file}: cannot read pickled checkpoint ({err})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in obj.items() if hasattr(v, "detach")}


# ----------------------------------------------------------------------------- key mapping
def torch_key(path: tuple) -> str:
    """The torch state-dict key of an NNX flat-state path, e.g. ``('a', 0, 'kernel') -> 'a.0.weight'``."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def normalize_keys(tensors: Mapping[str, np.ndarray], component: str) -> dict[str, np.ndarray]:
    """Rewrite historical key spellings of ``component`` to the names the NNX modules use."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if component == "text_encoder":
            if key.startswith("text_model."):
                key = key[len("text_model."):]
            if key == "embeddings.position_ids":
                continue  # positions are computed, never loaded
        elif component == "vae":
            match = _LEGACY_VAE_RE.match(key)
            if match:
                key = f"{match[1]}.{_LEGACY_VAE_ATTENTION[match[2]]}.{match[3]}"
        out[key] = value
    return out


def _to_nnx_layout(leaf: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4 and len(target_shape) == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0].T  # 1x1-conv attention projections of old VAE checkpoints
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = f" (+{len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def state_from_torch(abstract_state: nnx.State, tensors: Mapping[str, np.ndarray], component: str,
                     *, dtype=None, source: str | None = None) -> nnx.State:
    """Fill an abstract NNX state (from ``nnx.eval_shape`` + ``nnx.split``) with checkpoint tensors.

    Args:
      abstract_state: parameter state whose leaves carry only shapes and dtypes.
      tensors: torch-named arrays of one component (``unet``, ``vae``, ``text_encoder``).
      component: selects the key normalisation (see :func:`normalize_keys`).
      dtype: cast every parameter to this dtype; default keeps the abstract leaf's dtype.
      source: file or directory named in error messages.

    Raises:
      P2LError: listing missing and unexpected keys, or naming a key whose shape differs.
    """
    where = source or component
    tensors = normalize_keys(tensors, component)
    flat = list(nnx.to_flat_state(abstract_state))
    expected = {torch_key(path): (path, var) for path, var in flat}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        raise P2LError(f"{where}: checkpoint does not match the {component} architecture: "
                       + "; ".join(parts))
    filled = []
    for key, (path, var) in expected.items():
        leaf = str(path[-1])
        target_shape = tuple(var.shape)
        value = np.asarray(tensors[key])
        converted = _to_nnx_layout(leaf, value, target_shape)
        if tuple(converted.shape) != target_shape:
            raise P2LError(f"{where}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                           f"model expects {_torch_shape(leaf, target_shape)}")
        target_dtype = dtype if dtype is not None else var.dtype
        filled.append((path, var.replace(jnp.asarray(converted, dtype=target_dtype))))
    return nnx.from_flat_state(filled)


def state_to_torch(state: nnx.State, *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_from_torch`: torch-named, torch-layout numpy arrays."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        leaf = str(path[-1])
        out[torch_key(path)] = np.ascontiguousarray(
            _to_torch_layout(leaf, np.asarray(var[...], dtype=dtype)))
    return out
