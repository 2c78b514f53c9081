"""Faults a user meets on the command line: data never lost, one-line errors before any work,
typed and finite ``--set`` values, one run per output folder, Ctrl-C, and what a newcomer sees.

Each test reproduces one case of docs/faults.md."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from p2l_jax import imageio
from p2l_jax.cli import build_parser, main
from p2l_jax.errors import P2LError
from test_restore_cli import (_error, _png, _records,  # noqa: F401
                              _reuse_loaded_models)

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, command: str, argv: list, progress: bool = False) -> str:
    """The command's error line; with ``progress``, after the run's own progress lines."""
    rc = main([command, *map(str, argv)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if progress:
        lines = [ln for ln in lines if not ln.startswith((f"{command}: ", f"{command} ["))]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"p2l-jax {command}: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _no_model_load(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    from p2l_jax.pipeline import P2LPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(P2LPipeline, "from_pretrained", refuse)


# ------------------------------------------------------------------ 1. degrade loses nothing
def test_degrade_refuses_to_overwrite_its_input(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image = _png(src / "a.png", 0)
    before = image.read_bytes()
    msg = _one_line_error(capsys, "degrade", ["--task", "denoise", "--input", image,
                                              "--output", src])
    assert "a.png: would be overwritten by an output" in msg
    assert image.read_bytes() == before and sorted(p.name for p in src.iterdir()) == ["a.png"]


def test_degrade_names_with_several_dots_stay_apart(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    inputs = [_png(src / "photo.v1.png", 1), _png(src / "photo.v2.png", 2)]
    out = tmp_path / "out"
    assert main(["degrade", "--task", "denoise", "--sigma", "0", "--input", *map(str, inputs),
                 "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"photo.{v}.{ext}" for v in ("v1", "v2") for ext in ("png", "npy", "json"))
    for path in inputs:  # sigma 0: each measurement is its own image
        np.testing.assert_array_equal(np.load(out / f"{path.stem}.npy"),
                                      imageio.read_image(path)[0])
        assert json.loads((out / f"{path.stem}.json").read_text())["input"] == str(path)


@pytest.mark.parametrize("value, expected", [(np.nan, "contains NaN or inf"),
                                             (1.5, "values outside [-1, 1]")])
def test_degrade_checks_npy_values(capsys, tmp_path, value, expected):
    arr = np.zeros((32, 32, 3), np.float32)
    arr[3, 4, 1] = value
    np.save(tmp_path / "x.npy", arr)
    msg = _one_line_error(capsys, "degrade", ["--task", "denoise", "--input",
                                              tmp_path / "x.npy", "--output", tmp_path / "o"])
    assert "x.npy" in msg and expected in msg and not (tmp_path / "o").exists()


# ---------------------------------------------------------- 2. fail before the model loads
def _unwritable_folder(tmp_path: Path) -> Path:
    """An existing folder in which no file can be created (root ignores permission bits)."""
    if os.geteuid() == 0:
        return Path("/proc/self")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("case", ["parent-is-a-file", "unwritable", "output-is-a-folder"])
def test_restore_output_checked_before_the_model_loads(capsys, tmp_path, monkeypatch, case):
    _no_model_load(monkeypatch)
    image = _png(tmp_path / "a.png", 0)
    if case == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        out, expected = tmp_path / "file" / "out", "cannot create"
    elif case == "unwritable":
        out, expected = _unwritable_folder(tmp_path), "cannot write"
    else:
        out, expected = tmp_path / "out", "a.png is a folder"
        (out / "a.png").mkdir(parents=True)
    msg = _one_line_error(capsys, "restore", ["--task", "denoise", "--steps", "2", "--simulate",
                                              "--input", image, "--output", out])
    assert expected in msg and str(out) in msg


def test_degrade_output_checked_before_any_work(capsys, tmp_path):
    out = _unwritable_folder(tmp_path)
    msg = _one_line_error(capsys, "degrade", ["--task", "denoise", "--input",
                                              _png(tmp_path / "a.png", 0), "--output", out])
    assert f"--output {out}: cannot write" in msg


def test_write_failure_after_the_batch_is_one_line(capsys, tmp_path, tiny_sd1_dir, monkeypatch):
    """A disk that fills up while the batch runs: one line naming the file, exit 2, no partial
    file. (The sampler is replaced by the adjoint, as in test_restore_cli, so nothing big is
    compiled; the failure is injected where a full disk would raise.)"""
    from p2l_jax import pipeline

    def adjoint_shard(batch, model, operator, inputs, structure, latent_shape):
        import jax.numpy as jnp

        x = operator.adjoint(batch["y"])
        return {"images": x, "residual": jnp.zeros((x.shape[0], structure.num_steps)),
                "residual_final": jnp.zeros((x.shape[0],))}

    monkeypatch.setattr(pipeline, "_whole_shard", adjoint_shard)
    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst).endswith("img0.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(imageio.os, "replace", disk_full)
    src = tmp_path / "gt"
    src.mkdir()
    _png(src / "img0.png", 0)
    out = tmp_path / "o"
    msg = _one_line_error(capsys, "restore", [
        "--task", "sr", "--scale", "2", "--solver", "ldps", "--steps", "2", "--simulate",
        "--batch-size", "2", "--model", tiny_sd1_dir, "--input", src, "--output", out],
        progress=True)
    assert "img0.png: cannot write" in msg and "No space left" in msg
    assert not out.exists()  # created by the run, and nothing in it was complete


# ------------------------------------------------------------- 3. --set: typed and finite
def _config(*overrides, solver="p2l"):
    from p2l_jax.cli.solver_options import solver_config

    return solver_config(argparse.Namespace(solver=solver, steps=7, prompt=None,
                                            overrides=list(overrides)))


@pytest.mark.parametrize("assignment", ["rho=nan", "lam=inf", "rho=-inf", "lam=1e400",
                                        "optimizer.b1=nan"])
def test_set_refuses_non_finite_values(assignment):
    name = assignment.split("=")[0]
    with pytest.raises(P2LError, match=f"--set {name}: expected a finite number"):
        _config(assignment)


def test_set_types_nested_fields_from_their_annotations():
    c = _config("optimizer.name=sgd", "optimizer.momentum=0.9", "K=2", "tune_prompt=no")
    assert c.optimizer.momentum == 0.9 and isinstance(c.optimizer.momentum, float)
    assert (c.optimizer.name, c.K, c.tune_prompt) == ("sgd", 2, False)
    assert _config("optimizer.momentum=0.9", "optimizer.momentum=none").optimizer.momentum is None
    with pytest.raises(P2LError, match="--set optimizer.momentum: expected float or none"):
        _config("optimizer.momentum=fast")
    with pytest.raises(P2LError, match="--set K: expected int"):
        _config("K=1.5")


def test_non_finite_setting_refused_before_any_work(capsys, tmp_path, monkeypatch):
    """`--set rho=nan` used to run the whole batch and then crash writing the record."""
    _no_model_load(monkeypatch)
    msg = _one_line_error(capsys, "restore", [
        "--task", "denoise", "--steps", "2", "--simulate", "--set", "rho=nan",
        "--input", _png(tmp_path / "a.png", 0), "--output", tmp_path / "o"])
    assert "--set rho: expected a finite number, got 'nan'" in msg
    assert not (tmp_path / "o").exists()


def test_records_write_non_finite_numbers_as_null(tmp_path):
    from p2l_jax.cli.restore import write_record

    write_record(tmp_path / "r.json", {"residual_final": float("nan"),
                                       "metrics": {"psnr": float("inf"), "ssim": 0.5},
                                       "rho": [1.0, float("-inf")]})
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "residual_final": None, "metrics": {"psnr": None, "ssim": 0.5}, "rho": [1.0, None]}


# ------------------------------------------------------------------ 6. image-file faults
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _raw_png(path: Path, width: int, height: int, depth: int, colour: int, rows: bytes) -> Path:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_a_one_line_error(capsys, tmp_path):
    # 30000 x 30000 pixels declared, a few bytes of data: refused when opened, never decoded
    bomb = _raw_png(tmp_path / "bomb.png", 30000, 30000, 1, 0, b"\x00" * 8)
    msg = _one_line_error(capsys, "degrade", ["--task", "denoise", "--input", bomb,
                                              "--output", tmp_path / "o"])
    assert "bomb.png" in msg and "30000x30000" in msg and "decompression-bomb" in msg


def test_sixteen_bit_rgb_png_precision_loss_is_recorded(tmp_path):
    """Pillow decodes 16-bit colour PNGs to 8 bits per channel; the record must say so."""
    h, w = 4, 5
    values = (np.arange(h * w * 3).reshape(h, w, 3) * 1111 + 7).astype(">u2")
    rows = b"".join(b"\x00" + values[i].tobytes() for i in range(h))
    path = _raw_png(tmp_path / "deep.png", w, h, 16, 2, rows)
    image, info = imageio.read_image(path)
    np.testing.assert_allclose(image, 2 * (values >> 8).astype(np.float64) / 255 - 1, atol=1e-6)
    assert any("16-bit RGB read at 8-bit precision" in c for c in info["converted"]), info


# ------------------------------------------------------------------- 7. what a newcomer sees
def test_top_level_help_lists_every_command():
    text = build_parser().format_help()
    for command in ("convert", "degrade", "restore", "bench"):
        assert f"    {command} " in text


def test_restore_steps_defaults_to_the_solver_config():
    from p2l_jax.cli.solver_options import solver_config
    from p2l_jax.solvers import P2LConfig

    default = next(f.default for f in dataclasses.fields(P2LConfig) if f.name == "num_steps")
    parser = build_parser()
    args = parser.parse_args(["restore", "--task", "denoise", "--input", "x", "--output", "o"])
    assert args.steps is None and solver_config(args).num_steps == default
    restore = parser._subparsers._group_actions[0].choices["restore"]
    assert f"solver config's num_steps, {default}" in " ".join(restore.format_help().split())


def test_tokenizer_without_torch_prints_nothing():
    """transformers announces "PyTorch was not found" on import; the tokenizer needs no torch,
    so loading it must stay silent, while transformers' other warnings still show."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from p2l_jax.tokenizer import default_tokenizer_dir, load_tokenizer\n"
            "load_tokenizer(default_tokenizer_dir())\n"
            "from transformers.utils import logging\n"
            "logging.get_logger('transformers').warning('a later warning')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr and "a later warning" in proc.stderr


def test_package_never_reaches_into_the_checkout(tmp_path):
    """With only the package importable (no benchmarks/ on the path, as after a plain
    install): building the CLI imports neither torch nor benchmarks, and ``p2l-jax bench``
    is a one-line error saying how to run it (exit 2), whatever its options."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "p2l_jax").symlink_to(ROOT / "p2l_jax")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True,
                                       cwd=tmp_path, env=env, timeout=120)
    code = ("import sys, p2l_jax, p2l_jax.pipeline, p2l_jax.cli\n"
            "p2l_jax.cli.build_parser()\n"
            "print(p2l_jax.__file__)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'benchmarks'}))")
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "site" / "p2l_jax" / "__init__.py"), "[]"]
    proc = run("-m", "p2l_jax", "bench", "--steps", "2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("p2l-jax bench: error: needs the source checkout's benchmarks/")


def test_restore_names_an_allow_pickle_option_it_has(capsys, tmp_path, tiny_sd1_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    msg = _one_line_error(capsys, "restore", [
        "--task", "denoise", "--steps", "2", "--simulate", "--model", model,
        "--input", _png(tmp_path / "a.png", 0), "--output", tmp_path / "o"])
    assert "--allow-pickle" in msg
    args = build_parser().parse_args(["restore", "--allow-pickle", "--input", "x", "--output",
                                      "o"])
    assert args.allow_pickle


# ----------------------------------------------- 4, 5. two runs on one folder; Ctrl-C (real)
def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "p2l_jax", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupted(proc: subprocess.Popen) -> str:
    """Send Ctrl-C; the process must end with 130 and exactly one line about it."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert [ln for ln in lines if "interrupt" in ln.lower()] == lines[-1:], err[-3000:]
    assert lines[-1].startswith("p2l-jax restore: interrupted"), err[-3000:]
    return err


def test_ctrl_c_while_starting_up(tmp_path):
    """Ctrl-C while the command is still importing JAX (a KeyboardInterrupt there used to
    end in a traceback, or be swallowed by a garbage-collector callback)."""
    proc = _spawn("restore", "--task", "denoise", "--steps", "2", "--simulate", "--input",
                  str(_png(tmp_path / "a.png", 0)), "--output", str(tmp_path / "o"))
    time.sleep(1.0)
    _interrupted(proc)


def test_second_run_refused_and_ctrl_c_leaves_a_resumable_folder(capsys, tmp_path,
                                                                 tiny_sd1_dir):
    """Run A holds OUTPUT's lock: run B refuses at once, naming A's pid. Ctrl-C to A while
    it compiles or samples: exit 130, one line; the same folder then completes."""
    src = tmp_path / "gt"
    src.mkdir()
    for i in range(2):
        _png(src / f"img{i}.png", i)
    out = tmp_path / "out"
    common = ["restore", "--task", "sr", "--scale", "2", "--solver", "ldps", "--simulate",
              "--seed", "3", "--batch-size", "2", "--model", str(tiny_sd1_dir),
              "--input", str(src), "--output", str(out)]
    first = _spawn(*common)  # default --steps (1000): still sampling when interrupted
    try:
        lock = out / ".p2l-jax.lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        second = _spawn(*common, "--steps", "2")
        _, err = second.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert second.returncode == 2 and len(lines) == 1, err
        assert f"--output {out} is in use by another p2l-jax run (pid {first.pid}" in lines[0]
        for line in first.stderr:  # the model is loaded; compilation starts now
            if "to run on" in line:
                break
        time.sleep(0.5)
        _interrupted(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert not list(out.glob("*.png"))
    rc = main([*common, "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert {s: r["status"] for s, r in _records(out).items()} == {"img0": "ok", "img1": "ok"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
