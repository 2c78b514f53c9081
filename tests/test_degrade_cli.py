"""``p2l-jax degrade``: round trips through the sidecar, noise keys, and the error cases."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from p2l_jax import imageio, operators
from p2l_jax.cli import main

# Small-image options for every task (kernels and boxes sized for 32 x 48 inputs).
TASK_ARGS = {
    "sr": ["--scale", "4"],
    "gaussian-blur": ["--kernel-size", "9", "--blur-sigma", "1.5"],
    "motion-blur": ["--kernel-size", "9", "--intensity", "0.5"],
    "inpaint-box": ["--box-size", "12"],
    "inpaint-random": ["--fraction", "0.7"],
    "inpaint-freeform": [],
    "denoise": [],
}


def _save_png(path, h=32, w=48, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode).save(path)
    return path


@pytest.fixture()
def inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return [_save_png(src / "alpha.png", seed=1), _save_png(src / "beta.png", seed=2)]


def _degrade(task, inputs, out, sigma="0", seed="3", extra=()):
    return main(["degrade", "--task", task, *TASK_ARGS.get(task, []), *extra, "--sigma", sigma,
                 "--seed", seed, "--input", *map(str, inputs), "--output", str(out)])


@pytest.mark.parametrize("task", list(TASK_ARGS))
def test_noiseless_round_trip(task, inputs, tmp_path):
    out = tmp_path / "out"
    assert _degrade(task, inputs, out) == 0
    for path in inputs:
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert record["task"] == task and record["sigma"] == 0 and record["seed"] == 3
        assert record["input"] == str(path) and record["image_size"] == [32, 48]
        op = operators.from_dict(record["operator"])
        image, _ = imageio.read_image(record["input"])
        saved = np.load(out / f"{path.stem}.npy")
        assert saved.dtype == np.float32 and list(saved.shape) == record["measurement_shape"]
        np.testing.assert_allclose(saved, np.asarray(op.forward(jnp.asarray(image[None])))[0],
                                   atol=1e-6)
        png = np.asarray(Image.open(out / f"{path.stem}.png"))
        assert png.shape == saved.shape and np.abs(png - imageio.to_uint8(saved)).max() == 0
    if task == "sr":
        assert saved.shape == (8, 12, 3)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{p.stem}.{ext}" for p in inputs for ext in ("png", "npy", "json"))


def test_noisy_measurement_is_reproducible_from_sidecar(inputs, tmp_path):
    out = tmp_path / "out"
    assert _degrade("gaussian-blur", inputs, out, sigma="0.05", seed="11") == 0
    for path in inputs:
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert record["noise_key"]["stem"] == path.stem
        op = operators.from_dict(record["operator"])
        x = jnp.asarray(imageio.read_image(record["input"])[0][None])
        saved = np.load(out / f"{path.stem}.npy")
        resid = saved - np.asarray(op.forward(x))[0]
        assert abs(resid.std() / 0.05 - 1) < 0.05          # 4608 samples: 4 std errors ~ 4 %
        key = operators.noise_key(record["noise_key"]["seed"], record["noise_key"]["stem"])
        np.testing.assert_allclose(saved, np.asarray(op.measure(x, key, 0.05))[0], atol=1e-6)


def test_noise_depends_on_stem_not_position(inputs, tmp_path):
    assert _degrade("denoise", inputs, tmp_path / "ab", sigma="0.1") == 0
    assert _degrade("denoise", inputs[::-1], tmp_path / "ba", sigma="0.1") == 0
    assert _degrade("denoise", inputs[1:], tmp_path / "b", sigma="0.1") == 0
    beta = np.load(tmp_path / "ab" / "beta.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "ba" / "beta.npy"), beta)
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "beta.npy"), beta)
    assert not np.allclose(np.load(tmp_path / "ab" / "alpha.npy") - imageio.read_image(
        inputs[0])[0], beta - imageio.read_image(inputs[1])[0])
    assert _degrade("denoise", inputs, tmp_path / "seed4", sigma="0.1", seed="4") == 0
    assert not np.allclose(np.load(tmp_path / "seed4" / "beta.npy"), beta)


def test_grayscale_and_rgba_inputs_are_converted(tmp_path):
    grey = _save_png(tmp_path / "grey.png", mode="L")
    rgba = _save_png(tmp_path / "rgba.png", mode="RGBA")
    out = tmp_path / "out"
    assert _degrade("denoise", [grey, rgba], out) == 0
    g = json.loads((out / "grey.json").read_text())["input_info"]
    r = json.loads((out / "rgba.json").read_text())["input_info"]
    assert g["mode"] == "L" and any("greyscale" in c for c in g["converted"])
    assert r["mode"] == "RGBA" and any("alpha" in c for c in r["converted"])
    y = np.load(out / "grey.npy")
    assert y.shape == (32, 48, 3) and np.array_equal(y[..., 0], y[..., 2])


def _bad_corrupt(tmp_path, inputs):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return ["--task", "denoise", "--input", str(inputs[0]), str(bad)], "broken.png"


def _bad_truncated(tmp_path, inputs):
    bad = tmp_path / "cut.png"
    bad.write_bytes(inputs[1].read_bytes()[:200])
    return ["--task", "denoise", "--input", str(inputs[0]), str(bad)], "cut.png"


ERROR_CASES = {
    "missing-input": lambda tmp, inp: (
        ["--task", "denoise", "--input", str(inp[0]), str(tmp / "nope.png")], "nope.png"),
    "corrupt-image": _bad_corrupt,
    "truncated-image": _bad_truncated,
    "negative-sigma": lambda tmp, inp: (
        ["--task", "denoise", "--sigma", "-0.1", "--input", *map(str, inp)], "--sigma"),
    "scale-not-dividing": lambda tmp, inp: (
        ["--task", "sr", "--scale", "5", "--input", *map(str, inp)], "not divisible by --scale 5"),
    "unknown-task": lambda tmp, inp: (
        ["--task", "deblur", "--input", *map(str, inp)], "unknown --task 'deblur'"),
    "box-too-big": lambda tmp, inp: (
        ["--task", "inpaint-box", "--box-size", "40", "--input", *map(str, inp)], "--box-size 40"),
    "duplicate-stem": lambda tmp, inp: (
        ["--task", "denoise", "--input", str(inp[0]), str(_save_png(tmp / "alpha.jpg"))],
        "same file stem"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_exit_2_with_one_line_and_write_nothing(case, inputs, tmp_path, capsys):
    argv, expected = ERROR_CASES[case](tmp_path, inputs)
    out = tmp_path / "out"
    assert main(["degrade", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2l-jax degrade: error:") and "\n" not in err and expected in err
    assert not out.exists()


def test_atomic_writers_leave_no_partial_file(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(ValueError):
        imageio.write_json(target, {"bad": float("nan")})
    imageio.write_json(target, {"ok": 1})
    with pytest.raises(Exception):
        imageio.write_npy(tmp_path / "y.npy", np.array([object()]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    assert json.loads(target.read_text()) == {"ok": 1}
