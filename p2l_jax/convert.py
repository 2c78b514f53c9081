"""Converted-parameter cache: a model directory whose weights are an orbax-checkpoint.

``p2l-jax convert --model SD_DIR --output OUT`` loads ``SD_DIR`` once (safetensors -> NNX
layout: transposes, key checks) and writes ``OUT`` with the same configs, tokenizer and
scheduler, the parameters saved by orbax-checkpoint under ``params/``, and a marker file
``p2l_jax_converted.json``. ``load_model(OUT)`` then restores the arrays directly in NNX
layout. The output is written to a temporary sibling directory and renamed into place, so an
interrupted conversion never leaves a half-written model, and an existing ``OUT`` is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.layout import CONVERTED_MARKER, NETWORKS

PARAMS_DIR = "params"
FORMAT_VERSION = 1


def _flat_arrays(params: dict) -> dict[str, np.ndarray]:
    """``{"unet/down_blocks/0/...": array}`` in NNX layout, float32 (bf16 has no numpy home)."""
    out = {}
    for name, state in params.items():
        for path, var in nnx.to_flat_state(state):
            out["/".join([name, *map(str, path)])] = np.asarray(var[...], dtype=np.float32)
    return out


def save_converted(model, output: str | Path) -> Path:
    """Write ``model`` (a loaded LatentDiffusionModel) as a converted directory at ``output``."""
    import orbax.checkpoint as ocp

    output = Path(output).resolve()
    source = Path(model.path)
    if output.exists():
        raise P2LError(f"output {output} already exists; choose a new directory")
    if output == source or source in output.parents:
        raise P2LError(f"output {output} must not be inside the source model {source}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for item in source.iterdir():
            if item.name in NETWORKS:
                (tmp / item.name).mkdir()
                for f in item.iterdir():
                    if f.suffix == ".json":
                        shutil.copy2(f, tmp / item.name / f.name)
            elif item.name not in (PARAMS_DIR, CONVERTED_MARKER):
                copy = shutil.copytree if item.is_dir() else shutil.copy2
                copy(item, tmp / item.name)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, _flat_arrays(model.params))
        (tmp / CONVERTED_MARKER).write_text(json.dumps(
            {"format": "p2l_jax.orbax", "version": FORMAT_VERSION, "source": str(source)}, indent=2))
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def restore_params(path: Path, abstract_states: dict, dtype) -> dict:
    """Read the orbax parameters of a converted directory into the given abstract states."""
    import orbax.checkpoint as ocp

    ckpt = Path(path).resolve() / PARAMS_DIR
    if not ckpt.is_dir():
        raise P2LError(f"{path}: converted model has no {PARAMS_DIR}/ checkpoint")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            arrays = ckptr.restore(ckpt)
    except Exception as err:  # noqa: BLE001 - orbax raises many types for a damaged checkpoint
        raise P2LError(f"{ckpt}: cannot restore orbax checkpoint ({err})") from None
    params = {}
    for name, state in abstract_states.items():
        filled, wanted = [], set()
        for p, var in nnx.to_flat_state(state):
            key = "/".join([name, *map(str, p)])
            wanted.add(key)
            if key not in arrays:
                raise P2LError(f"{ckpt}: missing parameter {key}")
            value = np.asarray(arrays[key])
            if tuple(value.shape) != tuple(var.shape):
                raise P2LError(f"{ckpt}: shape mismatch for {key}: checkpoint {value.shape}, "
                               f"model expects {tuple(var.shape)}")
            filled.append((p, var.replace(jnp.asarray(value, dtype=dtype))))
        extra = sorted(k for k in arrays if k.startswith(name + "/") and k not in wanted)
        if extra:
            raise P2LError(f"{ckpt}: unexpected parameters {', '.join(extra[:8])}")
        params[name] = nnx.from_flat_state(filled)
    return params
