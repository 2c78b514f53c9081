"""``p2l-jax restore --progress-every / --checkpoint-every``: timestep progress inside a
batch, and a batch killed after its first in-flight checkpoint resumes from it on a rerun."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from p2l_jax.cli import main
from p2l_jax.solvers.resumable import InflightStore
from test_restore_cli import (_error, _png, _records,  # noqa: F401
                               _reuse_loaded_models)


class Killed(Exception):
    pass


def test_restore_resumes_the_inflight_batch(capsys, tmp_path, tiny_sd1_dir, monkeypatch):
    src = tmp_path / "gt"
    src.mkdir()
    for i in range(2):
        _png(src / f"img{i}.png", i)
    base = ["restore", "--task", "sr", "--scale", "2", "--solver", "ldps", "--steps", "4",
            "--simulate", "--seed", "3", "--batch-size", "2", "--model", str(tiny_sd1_dir),
            "--input", str(src), "--progress-every", "2"]
    assert main([*base, "--output", str(tmp_path / "ref")]) == 0  # uninterrupted
    err = capsys.readouterr().err
    assert "img0 (+1): step 2/4" in err and "img0 (+1): step 4/4" in err

    out = tmp_path / "out"
    real_save = InflightStore.save

    def save_then_die(self, carry, step):
        real_save(self, carry, step)
        raise Killed

    monkeypatch.setattr(InflightStore, "save", save_then_die)
    with pytest.raises(Killed):
        main([*base, "--output", str(out), "--checkpoint-every", "2"])
    (batch,) = (out / ".inflight").iterdir()
    assert (batch / "2").is_dir() and not list(out.glob("*.png"))

    monkeypatch.setattr(InflightStore, "save", real_save)
    capsys.readouterr()
    assert main([*base, "--output", str(out), "--checkpoint-every", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming in-flight sampler state at step 2" in err
    assert "step 4/4" in err and "step 2/4" not in err  # only the remaining chunk ran
    assert not (out / ".inflight").exists()
    ref, got = _records(tmp_path / "ref"), _records(out)
    for stem in ("img0", "img1"):
        assert got[stem]["residual_final"] == pytest.approx(ref[stem]["residual_final"],
                                                            rel=1e-5)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}.png")),
                                      np.asarray(Image.open(tmp_path / "ref" / f"{stem}.png")))


@pytest.mark.parametrize("extra, expected", [
    (["--checkpoint-every", "0"], "--checkpoint-every must be a positive integer, got 0"),
    (["--progress-every", "-1"], "--progress-every must be an integer >= 0, got -1"),
])
def test_invalid_chunk_options(capsys, tmp_path, extra, expected):
    msg = _error(capsys, "--task", "denoise", "--steps", "4", "--simulate", "--input",
                 _png(tmp_path / "a.png", 0), "--output", tmp_path / "o", *extra)
    assert expected in msg and not (tmp_path / "o").exists()


def test_chunking_rule():
    from p2l_jax.cli.restore import chunking

    def options(steps, progress=None, save=None):
        args = argparse.Namespace(steps=steps, progress_every=progress, checkpoint_every=save,
                                  output=Path("out"))
        return chunking(args, ["a", "b"])

    assert options(50) == {} and options(1000, progress=0) == {}  # one scan
    assert options(1000)["chunk_steps"] == 100  # automatic: steps // 10 from 100 steps
    both = options(1000, progress=10, save=25)
    assert both["chunk_steps"] == 5 and both["checkpoint_every"] == 25
    assert both["checkpoint"].parent == Path("out/.inflight")
    assert options(1000, progress=0, save=25)["chunk_steps"] == 25
