"""Converted-parameter cache: a model directory whose weights are an orbax-checkpoint.

``p2l-jax convert --model SD_DIR --output OUT`` loads ``SD_DIR`` once (safetensors -> NNX
layout: transposes, key checks) and writes ``OUT`` with the same configs, tokenizer and
scheduler, the parameters saved by orbax-checkpoint under ``params/``, and a marker file
``p2l_jax_converted.json``. ``load_model(OUT)`` then restores the arrays directly in NNX
layout. The output is written to a temporary sibling directory and renamed into place, so an
interrupted conversion never leaves a half-written model, and an existing ``OUT`` is refused.
The temporary directory is removed on any failure; the output gets the user's umask
(``mkdtemp``'s private 0o700 is widened to ``0o777 & ~umask``; files are created, not copied
with their source permissions).

What is copied (:func:`files_to_copy`): regular files inside ``SD_DIR`` only -- the networks'
JSON configs and every other file (tokenizer, scheduler, ``model_index.json``, ...), never a
network's weights. A symbolic link to a file is copied as that file when its target lies
inside ``SD_DIR`` (or, for a Hugging Face cache snapshot ``.../snapshots/<rev>``, in that
repository's ``blobs/``); a link out of it, a link to a folder (never followed, so no loops)
and special files (pipes, devices) are refused with a one-line error before anything loads.
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
from p2l_jax.imageio import current_umask
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


def _inside(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def _allowed_target(target: Path, root: Path) -> bool:
    """Inside the model folder, or in the blob store of the Hugging Face cache snapshot
    that the model folder is (``<repo>/snapshots/<rev>`` -> ``<repo>/blobs``)."""
    if _inside(target, root):
        return True
    return root.parent.name == "snapshots" and _inside(target, root.parent.parent / "blobs")


def files_to_copy(source: str | Path) -> list[tuple[Path, Path]]:
    """``(file, path relative to source)`` of every file ``convert`` copies (module
    docstring); raises :class:`P2LError` naming a link out of the folder, a link to a folder
    or a special file."""
    root = Path(source).resolve()
    found: list[tuple[Path, Path]] = []

    def visit(folder: Path, rel: Path, configs_only: bool) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path, name = Path(entry.path), rel / entry.name
            if rel == Path() and entry.name in (PARAMS_DIR, CONVERTED_MARKER):
                continue
            if configs_only and not (entry.name.endswith(".json")
                                     and not entry.is_dir(follow_symlinks=False)):
                continue  # a network's weights are what gets converted, not copied
            if entry.is_symlink():
                target = Path(os.path.realpath(path))
                if target.is_dir():
                    raise P2LError(f"{path}: symbolic link to a folder ({target}); convert "
                                   f"copies only regular files inside {root}")
                if not _allowed_target(target, root):
                    raise P2LError(f"{path}: symbolic link to {target}, outside the model "
                                   f"folder {root}; copy the file into the folder instead")
                if not target.is_file():
                    raise P2LError(f"{path}: symbolic link to {target}, not a regular file")
                found.append((path, name))
            elif entry.is_dir(follow_symlinks=False):
                visit(path, name, rel == Path() and entry.name in NETWORKS)
            elif entry.is_file(follow_symlinks=False):
                found.append((path, name))
            else:
                raise P2LError(f"{path}: not a regular file or folder (a pipe, socket or "
                               "device); convert copies only regular files")

    visit(root, Path(), False)
    return found


def save_converted(model, output: str | Path) -> Path:
    """Write ``model`` (a loaded LatentDiffusionModel) as a converted directory at ``output``."""
    import orbax.checkpoint as ocp

    output = Path(output).resolve()
    source = Path(model.path)
    if output.exists():
        raise P2LError(f"output {output} already exists; choose a new directory")
    if output == source or source in output.parents:
        raise P2LError(f"output {output} must not be inside the source model {source}")
    files = files_to_copy(source)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as err:
        raise P2LError(f"output {output}: cannot create ({err.strerror or err})") from None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        for file, rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, tmp / rel)  # content only: new files get the umask
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, _flat_arrays(model.params))
        (tmp / CONVERTED_MARKER).write_text(json.dumps(
            {"format": "p2l_jax.orbax", "version": FORMAT_VERSION, "source": str(source)}, indent=2))
        os.replace(tmp, output)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise P2LError(f"output {output}: cannot write the converted model "
                           f"({err.strerror or err})") from None
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
