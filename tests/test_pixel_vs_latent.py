"""benchmarks.pixel_vs_latent on tiny random models: both parts (training size and 2x), the
zeta' choice, the artifact indicators, the paired comparisons, and resuming from the journal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks import pixel_vs_latent as pvl
from benchmarks import quality

pytest.importorskip("torch")
CFG = pvl.PixelVsLatentConfig(n=2, tasks=("inpaint-box",), sigmas=(0.05,), steps=2,
                              batch_size=2, hires_tasks=("inpaint-box",), hires_n=2,
                              methods=("p2l", "dps-pixel", "autoencoder"),
                              zeta_grid=(0.1, 1.0), tune_n=2, tune_tasks=("inpaint-box",))


def test_artifact_indicators_see_background_structure_not_offsets():
    truth = np.full((1, 32, 32, 3), -0.2, np.float32)
    truth[0, 12:20, 12:20] = [0.8, -0.8, -0.8]  # a red square on grey
    offset = truth + 0.05                       # smooth everywhere: no high frequencies
    blob = truth.copy()
    blob[0, 2:6, 2:6] = [0.8, -0.8, -0.8]       # a second red object in the background
    ref = pvl.artifact_scores(truth, truth, 2)
    assert ref == {"hf_bg": [0.0], "spurious_bg": [0.0]}
    smooth = pvl.artifact_scores(offset, truth, 2)
    assert smooth["hf_bg"][0] < 1e-6 and smooth["spurious_bg"] == [0.0]
    bad = pvl.artifact_scores(blob, truth, 2)
    bg = pvl.background_mask(truth, 2)[0]
    assert bad["spurious_bg"][0] == pytest.approx(16 / bg.sum())
    # the blob's edges carry high-frequency error; a uniform offset carries none
    assert bad["hf_bg"][0] > 0.01 and bad["hf_bg"][0] > 1e4 * smooth["hf_bg"][0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pixel_fixtures import make_tiny_pixel
    from sd_fixtures import make_tiny_sd

    root = tmp_path_factory.mktemp("pvl")
    latent = quality.load(str(make_tiny_sd(root / "sd", "sd1", seed=0, sample_size=8)))
    pixel = quality.load(str(make_tiny_pixel(root / "px", "plain", seed=0, sample_size=64)))
    return latent, pixel


@pytest.mark.slow  # ~3 min on the loaded 2-core VM: 8 compiled solver programs
def test_run_both_parts_then_resume_from_journal(models, tmp_path, monkeypatch):
    latent, pixel = models
    assert (latent.image_size, pixel.image_size) == (64, 64)
    journal = quality.Journal(tmp_path / "j.jsonl", {"test": 1})
    logs = []
    result = pvl.summarize(pvl.run(latent, pixel, CFG, 0, logs.append, journal,
                                   grid_dir=tmp_path / "grid"))
    tuned = result["zeta_tuning"]
    assert set(tuned) == set(CFG.zeta_grid) and result["zeta"] == max(tuned, key=tuned.get)
    by = {(c["part"], c["size"], c["method"]): c for c in result["cells"]}
    assert set(by) == {(p, s, m) for p, s in (("table", 64), ("hires", 128))
                       for m in ("ground-truth", *CFG.methods)}
    truth = by[("table", 64, "ground-truth")]["scores"]
    assert truth["hf_bg"] == [0.0, 0.0] and truth["spurious_bg"] == [0.0, 0.0]
    for cell in result["cells"]:
        assert len(cell["scores"]["psnr"]) == 2
        assert all(0.0 <= v <= 1.0 for v in cell["scores"]["spurious_bg"] if v is not None)
    versus = {(c["part"], c["versus"]) for c in result["comparisons"]}
    assert versus == {(p, m) for p in ("table", "hires") for m in ("dps-pixel", "autoencoder")}
    change = {c["versus"]: c["change"]["psnr"] for c in result["advantage_change"]}
    assert set(change) == {"dps-pixel", "autoencoder"} and change["dps-pixel"]["n"] == 2
    # the advantage change is the paired difference of the two parts' per-image advantages
    adv = lambda part, size: np.subtract(by[(part, size, "p2l")]["scores"]["psnr"],
                                         by[(part, size, "dps-pixel")]["scores"]["psnr"])
    assert change["dps-pixel"]["mean"] == pytest.approx(
        np.mean(adv("hires", 128) - adv("table", 64)))
    assert len(list((tmp_path / "grid").glob("*.npy"))) == len(CFG.methods)
    md = pvl.markdown(quality.plain({
        **result, "config": CFG, "command": "x", "model": "a", "model_digest": "1",
        "pixel_model": "b", "pixel_digest": "2", "seed": 0, "timing": {"total_s": 1.0},
        "machine": quality.machine()}))
    assert "hires: 128 px" in md and "dps-pixel" in md

    def no_restore(*args, **kwargs):
        raise AssertionError("a journaled cell was recomputed")

    monkeypatch.setattr(pvl, "restore", no_restore)
    again = pvl.summarize(pvl.run(latent, pixel, CFG, 0, logs.append, journal,
                                  grid_dir=tmp_path / "grid"))
    assert again["zeta"] == result["zeta"]
    assert [c["scores"] for c in again["cells"]] == [c["scores"] for c in result["cells"]]
    pvl.write_grid(tmp_path / "grid.png", again["grids"], CFG.methods)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_quick_preset_and_fixed_zeta_skip_the_choice():
    cfg = dataclasses.replace(pvl.get_config(True), zeta=0.5)
    assert pvl.choose_zeta(None, cfg, 0, {}, None, print) == (0.5, {})


def test_a_zeta_at_the_grid_edge_is_flagged():
    tuning = {"0.1": 20.0, "1.0": 22.0, "10.0": 21.0}  # JSON keys, as a reloaded record has
    assert pvl._edge_note({"zeta": 1.0, "zeta_tuning": tuning}) == ""
    assert "edge of the grid" in pvl._edge_note({"zeta": 10.0, "zeta_tuning": tuning})
    assert "edge of the grid" in pvl._edge_note({"zeta": 0.1, "zeta_tuning": tuning})
    assert pvl._edge_note({"zeta": 1.0, "zeta_tuning": {}}) == ""
