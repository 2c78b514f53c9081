"""``p2l-jax restore`` end to end on the tiny checkpoint: outputs, records, resume, errors."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from p2l_jax.cli import main
from p2l_jax.errors import P2LError

STEPS = "2"
_MODELS: dict = {}


@pytest.fixture(autouse=True)
def _reuse_loaded_models(monkeypatch):
    """One load per checkpoint for this file: each CLI run in this process would otherwise
    load a new model object and recompile (a real run is one process, one load)."""
    import p2l_jax.model as model_module

    real = model_module.load_model

    def cached(path=None, dtype="float32", **kw):
        key = (str(path), dtype, tuple(sorted(kw.items())))
        if key not in _MODELS:
            _MODELS[key] = real(path, dtype, **kw)
        return _MODELS[key]

    monkeypatch.setattr(model_module, "load_model", cached)


def _png(path: Path, seed: int, size=(64, 64), mode="RGB") -> Path:
    rs = np.random.RandomState(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[0], size[1], 3)
    arr = np.clip(base + rs.randint(-40, 40, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format="PNG")
    return path


@pytest.fixture
def gt_dir(tmp_path) -> Path:
    d = tmp_path / "gt"
    d.mkdir()
    for i in range(3):
        _png(d / f"img{i}.png", i, mode="L" if i == 2 else "RGB")
    return d


def _restore(capsys, *args) -> tuple[int, str]:
    rc = main(["restore", *map(str, args)])
    return rc, capsys.readouterr().err


def _error(capsys, *args) -> str:
    rc, err = _restore(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("p2l-jax restore: error:"), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ errors (no output written)
@pytest.mark.parametrize("extra, expected", [
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--sigma", "-0.1"], "--sigma must be a finite number >= 0"),
    (["--task", "nope"], "unknown --task 'nope'"),
    (["--solver", "dps2"], "unknown --solver 'dps2'"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
])
def test_invalid_options(capsys, gt_dir, tmp_path, extra, expected):
    args = ["--task", "denoise", "--steps", STEPS, "--input", gt_dir, "--output", tmp_path / "o",
            "--simulate"]
    msg = _error(capsys, *args, *extra)
    assert expected in msg
    assert not (tmp_path / "o").exists()


def test_input_errors(capsys, tmp_path):
    out = tmp_path / "o"
    base = ["--task", "denoise", "--steps", STEPS, "--output", out, "--simulate", "--input"]
    assert "no such file or folder" in _error(capsys, *base, tmp_path / "missing.png")
    (tmp_path / "empty").mkdir()
    assert "empty: folder has no images" in _error(capsys, *base, tmp_path / "empty")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "bad.png: cannot read image" in _error(capsys, *base, tmp_path / "bad.png")
    (tmp_path / "notes.txt").write_text("x")
    assert "notes.txt: not an image" in _error(capsys, *base, tmp_path / "notes.txt")
    msg = _error(capsys, "--task", "sr", "--scale", "3", "--steps", STEPS, "--output", out,
                 "--simulate", "--input", _png(tmp_path / "a.png", 0))
    assert "a.png" in msg and "not divisible by --scale 3" in msg
    assert not out.exists()


def test_nan_measurement_refused(capsys, tmp_path):
    deg = tmp_path / "deg"
    assert main(["degrade", "--task", "denoise", "--sigma", "0.1", "--input",
                 str(_png(tmp_path / "a.png", 0)), "--output", str(deg)]) == 0
    y = np.load(deg / "a.npy")
    y[3, 4, 1] = np.nan
    np.save(deg / "a.npy", y)
    capsys.readouterr()
    msg = _error(capsys, "--steps", STEPS, "--input", deg, "--output", tmp_path / "o")
    assert "a.npy: contains NaN or inf" in msg and not (tmp_path / "o").exists()


def test_model_and_size_errors(capsys, tmp_path, tiny_sd1_dir):
    out = tmp_path / "o"
    (tmp_path / "notamodel").mkdir()
    msg = _error(capsys, "--task", "denoise", "--steps", STEPS, "--simulate", "--output", out,
                 "--model", tmp_path / "notamodel", "--input", _png(tmp_path / "a.png", 0))
    assert "not a diffusers-format model directory" in msg
    msg = _error(capsys, "--task", "denoise", "--steps", STEPS, "--simulate", "--output", out,
                 "--model", tiny_sd1_dir, "--input", _png(tmp_path / "b.png", 0, (40, 64)))
    assert "b.png: image size 40x64 is not a multiple of 16" in msg
    assert not out.exists()



def test_output_names_stay_inside_and_collisions_refused(capsys, tmp_path):
    from p2l_jax.cli.restore import Item

    assert Item("..", Path("x")).name == "_."
    assert Item("é/ a", Path("x")).name == "___a"
    (tmp_path / "in").mkdir()
    _png(tmp_path / "in" / "a b.png", 0)
    _png(tmp_path / "in" / "a_b.png", 1)
    msg = _error(capsys, "--task", "denoise", "--steps", STEPS, "--simulate", "--input",
                 tmp_path / "in", "--output", tmp_path / "o")
    assert "output name 'a_b' collides" in msg
    msg = _error(capsys, "--task", "denoise", "--steps", STEPS, "--simulate", "--input",
                 tmp_path / "in" / "a_b.png", "--output", tmp_path / "in")
    assert "a_b.png: would be overwritten by an output" in msg


def _adjoint_shard(fail_first: bool):
    """A stand-in for the sampler's shard (compiles no sampler): A^T y, scaled; with
    ``fail_first`` the first row of each shard turns NaN."""
    import jax.numpy as jnp

    def shard(batch, model, operator, inputs, structure, latent_shape):
        x = operator.adjoint(batch["y"]) * 4.0
        x = x.at[0].set(jnp.nan) if fail_first else x
        return {"images": x, "residual": jnp.zeros((x.shape[0], structure.num_steps)),
                "residual_final": jnp.zeros((x.shape[0],))}

    return shard


def test_each_input_is_read_once(capsys, gt_dir, tmp_path, tiny_sd1_dir, monkeypatch):
    """Planning reads and checks every input; the batches use those arrays, not a second
    read (3 images, batches of 2)."""
    from p2l_jax import imageio, pipeline

    monkeypatch.setattr(pipeline, "_whole_shard", _adjoint_shard(fail_first=False))
    reads, real = [], imageio.read_image
    monkeypatch.setattr(imageio, "read_image",
                        lambda path: reads.append(Path(path).name) or real(path))
    rc, err = _restore(capsys, "--task", "sr", "--scale", "2", "--solver", "ldps", "--steps",
                       STEPS, "--simulate", "--batch-size", "2", "--model", tiny_sd1_dir,
                       "--input", gt_dir, "--output", tmp_path / "o")
    assert rc == 0, err
    assert sorted(reads) == ["img0.png", "img1.png", "img2.png"]
    assert len(list((tmp_path / "o").glob("img*.png"))) == 3


def test_non_finite_result_reported_per_image(capsys, gt_dir, tmp_path, tiny_sd1_dir,
                                              monkeypatch):
    """A sample that turns NaN gets a record with status non-finite and no PNG; the others
    are written; exit 1. (The solver is replaced by one that fails on the first row of each
    shard, so the reporting path is tested without compiling a sampler.)"""
    from p2l_jax import pipeline

    monkeypatch.setattr(pipeline, "_whole_shard", _adjoint_shard(fail_first=True))
    out = tmp_path / "o"
    rc, err = _restore(capsys, "--task", "sr", "--scale", "2", "--solver", "ldps", "--steps",
                       STEPS, "--simulate", "--batch-size", "2", "--model", tiny_sd1_dir,
                       "--input", gt_dir, "--output", out)
    assert rc == 1
    assert "img0.png: sampling produced NaN/inf" in err and "img2.png: sampling" in err
    recs = _records(out)
    assert {s: r["status"] for s, r in recs.items()} == {"img0": "non-finite", "img1": "ok",
                                                         "img2": "non-finite"}
    assert sorted(p.name for p in out.glob("*.png")) == ["img1.png"]
    assert recs["img0"]["metrics"] == {"psnr": None, "ssim": None, "lpips": None}
    assert json.loads((out / "summary.json").read_text())["failed"] == ["img0", "img2"]


# ------------------------------------------------------------------------------ end to end
def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")
            if p.name != "summary.json"}


def test_simulate_outputs_records_summary_and_resume(capsys, gt_dir, tmp_path, tiny_sd1_dir):
    out = tmp_path / "out"
    args = ["--task", "sr", "--scale", "2", "--solver", "ldps", "--steps", STEPS, "--simulate",
            "--seed", "3", "--batch-size", "2", "--model", tiny_sd1_dir, "--grid",
            "--input", gt_dir, "--output", out]
    rc, err = _restore(capsys, *args)
    assert rc == 0, err
    assert "restore [" in err and "ETA" in err
    recs = _records(out)
    assert sorted(recs) == ["img0", "img1", "img2"]
    for stem, rec in recs.items():
        assert rec["status"] == "ok" and rec["identity"] == stem and rec["seed"] == 3
        img = np.asarray(Image.open(out / f"{stem}.png"))
        assert img.shape == (64, 64, 3)
        assert np.asarray(Image.open(out / "grid" / f"{stem}.png")).shape == (64, 192, 3)
        assert rec["metrics"]["psnr"] is not None and -1 <= rec["metrics"]["ssim"] <= 1
        assert rec["residual_final"] >= 0 and rec["config"]["num_steps"] == int(STEPS)
    assert "greyscale" in " ".join(recs["img2"]["input_info"]["converted"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 3 and summary["failed"] == []
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["identity"] for r in rows] == ["img0", "img1", "img2"]
    assert float(rows[0]["psnr"]) == pytest.approx(recs["img0"]["metrics"]["psnr"])

    # Simulated kill: one output lost, a stale temp file left behind; the rerun redoes only it.
    mtimes = {s: (out / f"{s}.png").stat().st_mtime_ns for s in ("img0", "img2")}
    (out / "img1.json").unlink()
    (out / ".img1.png.123.tmp").write_bytes(b"partial")
    before = np.asarray(Image.open(out / "img1.png"))
    rc, err = _restore(capsys, *args)
    assert rc == 0, err
    assert "2 already done, 1 to run" in err
    assert {s: (out / f"{s}.png").stat().st_mtime_ns for s in mtimes} == mtimes
    np.testing.assert_array_equal(np.asarray(Image.open(out / "img1.png")), before)
    assert _records(out)["img1"]["status"] == "ok"
    assert not (out / ".img1.png.123.tmp").exists()

    # Same outputs folder, different settings: refused instead of mixing results.
    msg = _error(capsys, *[a if a != "3" else "4" for a in args])
    assert "different settings" in msg


def test_restore_degrade_outputs_matches_simulate(capsys, tmp_path, tiny_sd1_dir):
    """degrade -> restore equals restore --simulate: same noise, same key per identity."""
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "face.png", 5)
    assert main(["degrade", "--task", "sr", "--scale", "2", "--sigma", "0.05", "--seed", "1",
                 "--input", str(src / "face.png"), "--output", str(tmp_path / "deg")]) == 0
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "deg").iterdir()}
    common = ["--solver", "ldps", "--steps", STEPS, "--seed", "1", "--model", tiny_sd1_dir,
              "--batch-size", "2"]  # the program of the test above: nothing new to compile
    rc, err = _restore(capsys, *common, "--input", tmp_path / "deg", "--output", tmp_path / "a")
    assert rc == 0, err
    rc, err = _restore(capsys, *common, "--task", "sr", "--scale", "2", "--simulate",
                       "--sigma", "0.05", "--input", src, "--output", tmp_path / "b")
    assert rc == 0, err
    a = np.asarray(Image.open(tmp_path / "a" / "face.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "b" / "face.png"), np.int16)
    assert np.abs(a - b).max() <= 1
    rec = _records(tmp_path / "a")["face"]
    assert rec["ground_truth"].endswith("face.png") and rec["metrics"]["psnr"] is not None
    assert {p.name: p.read_bytes() for p in (tmp_path / "deg").iterdir()} == snapshot



# ------------------------------------------------------------------------------ Python API
def test_pipeline_keys_follow_identity_not_position(tiny_sd1_dir):
    """P2LPipeline: swapping two images (and their identities) swaps the results exactly."""
    from p2l_jax.operators import SuperResolution
    from p2l_jax.pipeline import P2LPipeline
    from p2l_jax.solvers import LDPSConfig

    pipe = P2LPipeline.from_pretrained(tiny_sd1_dir)  # the CLI's model: its program is reused
    x = np.stack([np.asarray(Image.open(_png_mem(i)), np.float32) / 127.5 - 1 for i in (0, 1)])
    kw = dict(operator=SuperResolution(2), config=LDPSConfig(num_steps=int(STEPS)), seed=3,
              sigma=0.05)
    ab = pipe(images=x, identities=["a", "b"], **kw)
    ba = pipe(images=x[::-1], identities=["b", "a"], **kw)
    np.testing.assert_allclose(ab.images, ba.images[::-1], atol=1e-5)
    assert [r["identity"] for r in ab.records] == ["a", "b"]
    assert ab.records[0]["key"] == ba.records[1]["key"] != ab.records[1]["key"]
    assert ab.records[0]["timing"]["includes_compilation"] is not None
    from p2l_jax.errors import P2LError

    with pytest.raises(P2LError, match="exactly one of"):
        pipe(images=x, measurements=x, identities=["a", "b"], **kw)
    with pytest.raises(P2LError, match="unique"):
        pipe(images=x, identities=["a", "a"], **kw)
    with pytest.raises(P2LError, match="images: image size 40x64"):
        pipe(images=np.zeros((2, 40, 64, 3), np.float32), identities=["a", "b"], **kw)


def test_restore_on_the_embedded_default_model(tmp_path):
    """The README's main job at 2 steps: no --model, the packaged example images, SR x4."""
    examples = Path(__file__).resolve().parents[1] / "docs" / "examples"
    image = sorted(examples.glob("*.png"))[0]
    out = tmp_path / "out"
    assert main(["restore", "--task", "sr", "--scale", "4", "--sigma", "0.01", "--simulate",
                 "--steps", "2", "--input", str(image), "--output", str(out)]) == 0
    record = json.loads((out / f"{image.stem}.json").read_text())
    assert record["status"] == "ok" and np.isfinite(record["metrics"]["psnr"])
    assert record["model"]["path"].endswith("embedded_model")
    restored = np.asarray(Image.open(out / f"{image.stem}.png"))
    assert restored.shape == (64, 64, 3)


def _png_mem(seed: int):
    import io

    buf = io.BytesIO()
    _png(buf, seed)
    buf.seek(0)
    return buf


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_eight_fake_devices_match_one_device(capsys, gt_dir, tmp_path, tiny_sd1_dir, mode):
    """The CLI on 8 fake CPU devices (batch 2 padded to 8) writes the 1-device images."""
    import subprocess
    import sys

    args = ["--task", "sr", "--scale", "2", "--solver", "ldps", "--steps", STEPS, "--simulate",
            "--seed", "3", "--batch-size", "2", "--model", tiny_sd1_dir, "--input", gt_dir]
    rc, err = _restore(capsys, *args, "--output", tmp_path / "one")
    assert rc == 0, err
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "p2l_jax", "restore", *map(str, args),
                           "--parallel", mode, "--output", str(tmp_path / "eight")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, eight = _records(tmp_path / "one"), _records(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == ["img0", "img1", "img2"]
    for stem in one:
        assert eight[stem]["devices"] == 8 and one[stem]["devices"] == 1
        assert eight[stem]["residual_final"] == pytest.approx(one[stem]["residual_final"],
                                                              rel=1e-5, abs=1e-5)
        a = np.asarray(Image.open(tmp_path / "one" / f"{stem}.png"), np.int16)
        b = np.asarray(Image.open(tmp_path / "eight" / f"{stem}.png"), np.int16)
        assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_two_process_cli_restores_each_image_once(tmp_path, gt_dir, tiny_sd1_dir):
    """``restore`` under jax.distributed (2 CPU processes): shares partition the inputs, the
    summary written by process 0 is complete."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "out"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "p2l_jax", "restore", "--task", "sr", "--scale", "2", "--solver",
         "ldps", "--steps", STEPS, "--simulate", "--model", str(tiny_sd1_dir), "--input",
         str(gt_dir), "--output", str(out), "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        errs = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "3 images, 2 in this process" in errs[0] and "3 images, 1 in this process" in errs[1]
    recs = _records(out)
    assert {s: r["process"] for s, r in recs.items()} == {"img0": 0, "img1": 1, "img2": 0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 3 and [r["identity"] for r in summary["per_image"]] == sorted(recs)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_set_overrides_solver_config_fields():
    import argparse

    from p2l_jax.cli.restore import solver_config

    def config(*overrides, solver="p2l"):
        return solver_config(argparse.Namespace(solver=solver, steps=7, prompt=None,
                                                overrides=list(overrides)))

    c = config("rho=0.5", "project_every=4", "optimizer.learning_rate=1e-3", "tune_prompt=false")
    assert (c.num_steps, c.rho, c.project_every, c.optimizer.learning_rate, c.tune_prompt) == (
        7, 0.5, 4, 1e-3, False)
    assert config("omega=0.1", solver="psld").omega == 0.1
    for bad, message in [("foo=1", "not an option of --solver p2l"), ("rho=abc", "expected float"),
                         ("lam", "expected FIELD=VALUE"), ("project_every=0", "project_every"),
                         ("gamma=4", "not an option of --solver p2l"),
                         ("rho.x=1", "has no options to vary")]:
        with pytest.raises(P2LError, match=message):
            config(bad)
