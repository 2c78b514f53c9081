"""``p2l-jax convert`` stays in its folder: regular files only, no symlink followed out of the
model folder, no loops, shards inside the folder, temp folder gone on failure, the user's
umask, and one-line errors that name options convert has."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from p2l_jax.cli import main


@pytest.fixture
def model(tmp_path, tiny_sd1_dir) -> Path:
    """A private copy of the tiny checkpoint that a test may alter."""
    return Path(shutil.copytree(tiny_sd1_dir, tmp_path / "model"))


def _convert_error(capsys, model: Path, out: Path, *extra: str) -> str:
    rc = main(["convert", "--model", str(model), "--output", str(out), *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("p2l-jax convert: error:"), err
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def test_symlink_out_of_the_model_folder_is_refused(capsys, model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (model / "tokenizer" / "notes.txt").symlink_to(secret)
    msg = _convert_error(capsys, model, tmp_path / "out")
    assert "notes.txt" in msg and "outside" in msg


def test_symlink_loop_is_refused(capsys, model, tmp_path):
    (model / "scheduler" / "loop").symlink_to(model)
    msg = _convert_error(capsys, model, tmp_path / "out")
    assert "scheduler/loop" in msg and "symbolic link to a folder" in msg


def test_shard_index_cannot_point_outside(capsys, model, tmp_path):
    unet = model / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    from safetensors.numpy import load_file

    keys = list(load_file(str(weights)))
    shutil.move(weights, tmp_path / "elsewhere.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../../elsewhere.safetensors" for k in keys}}))
    msg = _convert_error(capsys, model, tmp_path / "out")
    assert "../../elsewhere.safetensors" in msg and "outside" in msg


def test_existing_output_refused_before_loading(capsys, model, tmp_path, monkeypatch):
    import p2l_jax.model as model_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(model_module, "load_model", refuse)
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["convert", "--model", str(model), "--output", str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_allow_pickle_without_torch_says_torch_is_needed(capsys, model, tmp_path, monkeypatch):
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    msg = _convert_error(capsys, model, tmp_path / "out", "--allow-pickle")
    assert "diffusion_pytorch_model.bin" in msg and "needs torch" in msg


def test_failed_save_leaves_no_temp_folder(capsys, model, tmp_path, monkeypatch):
    from p2l_jax import convert

    def disk_full(params):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "_flat_arrays", disk_full)
    msg = _convert_error(capsys, model, tmp_path / "out")
    assert "No space left on device" in msg


def test_outputs_follow_the_umask_and_inside_links_are_copied(model, tmp_path):
    (model / "tokenizer" / "alias.json").symlink_to(model / "tokenizer" / "tokenizer.json")
    (model / "model_index.json").chmod(0o600)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(["convert", "--model", str(model), "--output", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "model_index.json").stat().st_mode) == 0o644
    alias = out / "tokenizer" / "alias.json"
    assert not alias.is_symlink() and alias.read_bytes() == (
        model / "tokenizer" / "tokenizer.json").read_bytes()
