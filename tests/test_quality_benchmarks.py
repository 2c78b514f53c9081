"""The quality harnesses (generation score, restoration table, default tuning, README grid) run
end to end on the tiny random checkpoint and write well-formed JSON / markdown / PNG whose
numbers agree with their own per-image records; interval, verdict, sweep and section helpers.

The end-to-end test shares one compiled P2L program (2 steps, box inpainting, batch 1) between
the restoration table, the grid and the tuning sweep, and asserts that sharing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import quality
from p2l_jax.solvers.configs import DEFAULT_RHO

TASK = "inpaint-box"


# ---- helpers: no model ----------------------------------------------------------------
def test_interval_is_student_t_and_drops_undefined_values():
    c = quality.interval([1.0, 2.0, None, 3.0, float("inf")])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert c["n"] == 3 and c["mean"] == pytest.approx(2.0)
    assert (c["lo"], c["hi"]) == pytest.approx((2 - half, 2 + half))
    assert quality.interval([None])["mean"] is None and quality.interval([5.0])["lo"] is None
    d = quality.paired_interval([3.0, 5.0, None], [1.0, 2.0, 0.0])
    assert d["n"] == 2 and d["mean"] == pytest.approx(2.5)


def test_verdict_needs_the_interval_to_exclude_zero():
    assert quality.verdict({"lo": 0.1, "hi": 1.0}) == "better"
    assert quality.verdict({"lo": 0.1, "hi": 1.0}, higher_is_better=False) == "worse"
    assert quality.verdict({"lo": -0.1, "hi": 1.0}) == "tie"
    assert quality.verdict({"lo": None, "hi": None}) == "n/a"
    w = quality.wilson(0, 10)
    assert w["mean"] == 0 and w["lo"] == 0 and 0.2 < w["hi"] < 0.35


def test_update_section_replaces_only_its_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n")
    quality.update_section(path, "a", "first\n")
    quality.update_section(path, "b", "other\n")
    quality.update_section(path, "a", "second\n")
    text = path.read_text()
    assert "intro" in text and "other" in text and "second" in text and "first" not in text
    assert text.count("<!-- BEGIN a -->") == 1 and text.index("second") < text.index("other")


def test_coordinate_sweep_keeps_the_best_value_of_each_axis():
    from benchmarks.tune_defaults import sweep
    from p2l_jax.solvers import P2LConfig

    calls = []

    def evaluate(solver, base, points):  # joint optimum rho 1, period 4 (value 0); one axis
        calls.extend(dict(p) for p in points)   # at a time, all its values in one call
        return [-(p["rho"] - 1) ** 2 - (p["project_every"] - 4) ** 2 / p["rho"] for p in points]

    grid = (("rho", (0.3, 1.0, 3.0)), ("project_every", (2, 4, 8)))
    # one axis at a time: at period 8, rho 3 scores -9.3 (rho 1: -16), then period 4
    base = P2LConfig(num_steps=4, project_every=8)
    best = sweep(evaluate, "p2l", base, grid, lower_is_better=False)
    assert best == {"rho": 3.0, "project_every": 4}
    assert calls[0] == {"rho": 0.3, "project_every": 8}   # other axes at the base's values
    assert all(c["rho"] == 3.0 for c in calls[3:])        # later axes use the winner
    best = sweep(evaluate, "p2l", base, grid, lower_is_better=True)
    assert best == {"rho": 0.3, "project_every": 8}


def test_tuning_journal_resumes_same_sweep_and_drops_others(tmp_path):
    from benchmarks.quality import Journal

    path, logs = tmp_path / "out" / "j.jsonl", []
    journal = Journal(path, {"scope": {"n": 8, "tasks": ("sr",)}, "seed": 0}, logs.append)
    assert journal.load() == []
    records = [{"solver": "p2l", "settings": {"rho": 0.3}, "objective": 20.5},
               {"solver": "ldps", "settings": {"rho": 1.0}, "objective": float("nan")}]
    for r in records:
        journal.append(r)
    with open(path, "a") as f:
        f.write('{"solver": "p2l", "sett')           # a record cut by a kill
    again = Journal(path, {"scope": {"n": 8, "tasks": ["sr"]}, "seed": 0}, logs.append)
    assert again.load() == [records[0], {**records[1], "objective": None}]
    other = Journal(path, {"scope": {"n": 16, "tasks": ["sr"]}, "seed": 0}, logs.append)
    assert other.load() == [] and not path.exists()
    assert "reusing 2" in logs[0] and "other settings" in logs[1]


def test_tikhonov_reference_chooses_its_weight_on_validation_images():
    from benchmarks.restoration_quality import TIKHONOV_GRID, choose_tikhonov_lam

    op = quality.operator_for("gaussian-blur", 32)
    lam, scores = choose_tikhonov_lam(op, 0.05, 4, 0, 32)
    assert set(scores) == set(TIKHONOV_GRID) and scores[lam] == max(scores.values())
    # at sigma_y 0.05 the smallest weight amplifies the noise the blur's small singular values
    # let through: the chosen one is larger and clearly better
    assert lam > TIKHONOV_GRID[0] and scores[lam] > scores[TIKHONOV_GRID[0]] + 1.0


def test_model_digest_follows_weights_not_path_or_summary(tmp_path):
    """The journal's model identity: the same files anywhere give the same digest; a changed
    weight file (a retrained model at the same path) a new one; the training summary none."""
    import shutil

    from benchmarks.quality import EMBEDDED, model_digest
    from p2l_jax.model import embedded_model_dir

    copy = tmp_path / "m"
    shutil.copytree(embedded_model_dir(), copy)
    digest = model_digest(str(copy))
    assert digest == model_digest(EMBEDDED)
    (copy / "training_summary.json").write_text("{}")
    assert model_digest(str(copy)) == digest
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_digest(str(copy)) != digest


def test_full_run_estimate_scales_measured_step_times():
    from benchmarks.restoration_quality import RestorationConfig, estimate_full_seconds

    timing = {"first_s": 12.0, "steady_s_per_item": 0.5, "batch_size": 4, "batches": 2}
    cells = [{"method": m, "task": "sr", "timing": timing} for m in ("p2l", "pseudo-inverse")]
    full = RestorationConfig(n=10, tasks=("sr", "motion-blur"), sigmas=(0.01,), steps=20,
                             methods=("p2l", "pseudo-inverse"))
    est = estimate_full_seconds(cells, full, measured_steps=5)
    # compile 12 - 4 x 0.5 = 10 s per task; p2l 0.1 s per image-step
    assert est["per_method"]["p2l"] == pytest.approx({"compile_s": 20.0, "run_s": 40.0})
    assert est["per_method"]["pseudo-inverse"]["run_s"] == pytest.approx(10.0)
    assert est["seconds"] == pytest.approx(20 + 40 + 20 + 10)
    assert estimate_full_seconds(cells[:1], full, 5)["seconds"] is None


# ---- end to end on the tiny checkpoint ---------------------------------------------------
def _md_tables_well_formed(text: str) -> None:
    for block in text.split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|")]
        assert len({r.count("|") for r in rows}) <= 1, block


def _check_interval(cell, n):
    assert cell["n"] == n and cell["lo"] <= cell["mean"] <= cell["hi"]


def _check_restoration(out: Path, model, methods, sigmas) -> dict:
    from p2l_jax import data

    record = json.loads((out / "restoration_quality.json").read_text())
    md = (out / "restoration_quality.md").read_text()
    for field in ("command", "machine", "model", "config", "interval_method", "operators",
                  "indices", "cells", "comparisons", "diagnostics", "timing"):
        assert field in record, field
    n = len(record["indices"])
    assert all(data.split_of(i) == "test" for i in record["indices"])
    cells = {(c["task"], c["sigma"], c["method"]): c for c in record["cells"]}
    assert set(cells) == {(TASK, s, m) for s in sigmas for m in ("ground-truth", *methods)}
    for c in cells.values():
        assert set(c["scores"]) == {"psnr", "ssim", "lpips", "residual", "attributes"}
        assert all(len(v) == n for v in c["scores"].values())
        for metric in ("ssim", "residual", "attributes"):
            _check_interval(c["metrics"][metric], n)
    for s in sigmas:
        truth = cells[(TASK, s, "ground-truth")]
        # the clean image's residual is the noise norm sigma * sqrt(#entries of y)
        noise = s * math.sqrt(model.image_size ** 2 * 3)
        assert truth["metrics"]["residual"]["mean"] == pytest.approx(noise, rel=0.1)
        assert truth["metrics"]["ssim"]["mean"] == pytest.approx(1.0)
        # least squares fits y closer than the truth does
        assert (cells[(TASK, s, "pseudo-inverse")]["metrics"]["residual"]["mean"]
                < truth["metrics"]["residual"]["mean"])
    for comp in record["comparisons"]:
        p2l = cells[(comp["task"], comp["sigma"], "p2l")]["scores"]["psnr"]
        other = cells[(comp["task"], comp["sigma"], comp["versus"])]["scores"]["psnr"]
        assert comp["delta"]["psnr"]["mean"] == pytest.approx(np.mean(np.subtract(p2l, other)))
        assert comp["verdict"]["psnr"] == quality.verdict(comp["delta"]["psnr"])
    assert {c["versus"] for c in record["comparisons"]} == set(methods) - {"p2l"}
    C_null = np.asarray(model.text_embeddings([""]))
    captions = data.batch(record["indices"], model.image_size)[1]
    C_true = np.asarray(model.text_embeddings(captions))
    for d in record["diagnostics"]:
        assert d["cos_before"] == pytest.approx(
            quality.cosine(np.broadcast_to(C_null, C_true.shape), C_true).tolist(), rel=1e-5)
        assert len(d["cos_after"]) == len(d["cos_shift"]) == n
    assert record["command"] in md and "Machine:" in md and "Student-t" in md
    for m in ("ground-truth", *methods):
        assert f"| {m} |" in md
    _md_tables_well_formed(md)
    return record


@pytest.fixture(scope="module")
def tiny(tiny_sd1_dir):
    pytest.importorskip("diffusers")
    return str(tiny_sd1_dir), quality.load(str(tiny_sd1_dir))


def test_harnesses_run_end_to_end_and_share_compiled_programs(tiny, tmp_path):
    from benchmarks import generation_score, restoration_quality, tune_defaults
    from p2l_jax import data
    from p2l_jax.imageio import to_uint8
    from p2l_jax.solvers import compiled_programs

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import make_readme_grid

    model_dir, model = tiny
    results_md = tmp_path / "RESULTS.md"
    common = ["--model", model_dir, "--seed", "3"]

    before = compiled_programs()
    out = tmp_path / "restoration"
    assert restoration_quality.main(
        [*common, "--quick", "--output", str(out), "--n", "2", "--batch-size", "1",
         "--steps", "2", "--tasks", TASK, "--sigmas", "0.01", "0.05",
         "--methods", "pseudo-inverse", "p2l", "--results-md", str(results_md)]) == 0
    assert compiled_programs() - before == 1   # one program: both sigmas, both batches
    record = _check_restoration(out, model, ("pseudo-inverse", "p2l"), (0.01, 0.05))
    assert record["full_run_estimate"]["seconds"] is None  # not every method was measured
    assert "<!-- BEGIN restoration_quality -->" in results_md.read_text()

    # The journal: a widened table (one more noise level) computes only its new cells ...
    table = [*common, "--quick", "--output", str(out), "--n", "2", "--batch-size", "1",
             "--steps", "2", "--tasks", TASK, "--methods", "pseudo-inverse", "p2l"]
    journal = out / "restoration_quality.journal.jsonl"
    assert len(journal.read_text().splitlines()) == 1 + 4      # identity + 4 cells
    assert restoration_quality.main([*table, "tikhonov", "--sigmas", "0.01", "0.05", "0.1"]) == 0
    wide = json.loads((out / "restoration_quality.json").read_text())
    assert wide["reused_cells"] == 4 and len(journal.read_text().splitlines()) == 1 + 9
    tik = next(c for c in wide["cells"] if c["method"] == "tikhonov" and c["sigma"] == 0.05)
    val = {float(k): v for k, v in tik["config"]["validation_psnr"].items()}
    assert tik["config"]["lam"] == max(val, key=val.get)   # the best weight on validation

    def scores(rec, sigma):
        return next(c["scores"] for c in rec["cells"]
                    if c["method"] == "p2l" and c["sigma"] == sigma)

    assert scores(wide, 0.05) == scores(record, 0.05)
    assert len(wide["diagnostics"]) == 3
    assert "4 of 9 method cells taken from an earlier run" in (
        out / "restoration_quality.md").read_text()
    # ... an earlier record of the same settings seeds a missing journal ...
    journal.unlink()
    assert restoration_quality.main([*table, "--sigmas", "0.05"]) == 0
    seeded = json.loads((out / "restoration_quality.json").read_text())
    assert seeded["reused_cells"] == 2 and scores(seeded, 0.05) == scores(record, 0.05)
    assert seeded["diagnostics"][0]["cos_after"] == record["diagnostics"][1]["cos_after"]
    # ... and other settings (here, the number of images) start afresh.
    assert restoration_quality.main([*table[:-3], "--methods", "pseudo-inverse",
                                     "--sigmas", "0.05", "--n", "1"]) == 0
    assert json.loads((out / "restoration_quality.json").read_text())["reused_cells"] == 0
    assert len(journal.read_text().splitlines()) == 1 + 1
    assert compiled_programs() - before == 1   # still the one program

    grid_out = tmp_path / "grid"
    assert make_readme_grid.main([*common, "--output", str(grid_out), "--tasks", TASK,
                                  "--methods", "pseudo-inverse", "p2l", "--images", "1",
                                  "--steps", "2", "--zoom", "1"]) == 0
    grid = json.loads((grid_out / "restoration_grid.json").read_text())
    assert grid["columns"] == ["ground truth", "measurement", "pseudo-inverse", "p2l"]
    assert [r["task"] for r in grid["rows"]] == [TASK] and set(grid["rows"][0]["psnr"]) == {
        "pseudo-inverse", "p2l"}
    png = np.asarray(Image.open(grid_out / "restoration_grid.png"))
    S, pad = model.image_size, 2
    top, left = make_readme_grid.HEADER_PX + pad, make_readme_grid.ROW_LABEL_PX + pad
    assert png.shape == (top + S + pad, left + 4 * (S + pad), 3)
    truth = data.sample(int(data.split_indices("test", 1)[0]), S)[0]
    assert np.array_equal(png[top:top + S, left:left + S], to_uint8(truth))

    tune_out = tmp_path / "tune"
    assert tune_defaults.main([*common, "--output", str(tune_out), "--n", "1", "--steps", "2",
                               "--tasks", TASK, "--p2l-grid", f"rho={DEFAULT_RHO}", "--ldps-grid"]) == 0
    tune = json.loads((tune_out / "tune_defaults.json").read_text())
    assert tune["best"] == {"p2l": {"rho": DEFAULT_RHO}, "ldps": {}}
    assert all(data.split_of(i) == "validation" for i in tune["indices"])
    (ev,) = tune["evaluations"]
    assert ev["programs_compiled"] == 0        # the grid point reused the table's program
    assert compiled_programs() - before == 1   # ... still the one program
    journal = (tune_out / "tune_defaults.journal.jsonl").read_text().splitlines()
    assert len(journal) == 2 and json.loads(journal[1])["objective"] == ev["objective"]
    assert ev["objective"] == pytest.approx(ev["per_task"][TASK]["mean"])
    assert f"Chosen defaults: p2l: rho={DEFAULT_RHO:g}" in (tune_out / "tune_defaults.md").read_text()
    # a new axis whose only value is the base (num_steps = --steps) is the same solver config:
    # the journal's evaluation is reused, nothing runs
    assert tune_defaults.main([*common, "--output", str(tune_out), "--n", "1", "--steps", "2",
                               "--tasks", TASK, "--p2l-grid", f"rho={DEFAULT_RHO}",
                               "num_steps=2", "--ldps-grid"]) == 0
    assert len((tune_out / "tune_defaults.journal.jsonl").read_text().splitlines()) == 2
    again = json.loads((tune_out / "tune_defaults.json").read_text())
    assert [e["objective"] for e in again["evaluations"]] == [ev["objective"]]

    gen_out = tmp_path / "generation"
    assert generation_score.main([*common, "--output", str(gen_out), "--n", "2", "--steps", "2",
                                  "--batch-size", "2", "--results-md", str(results_md)]) == 0
    gen = json.loads((gen_out / "generation_score.json").read_text())
    acc = gen["generated"]["accuracy"]
    assert set(acc) == set(data.ATTRIBUTES) | {"all"}
    assert acc["all"] == pytest.approx(np.mean([acc[a] for a in data.ATTRIBUTES]))
    for a in data.ATTRIBUTES:  # the accuracy is the per-image record's share of hits
        assert acc[a] == pytest.approx(np.mean([a not in s["missed"] for s in gen["samples"]]))
    assert gen["meets_target"] == (acc["all"] >= 0.8)
    assert [s["caption"] for s in gen["samples"]] == data.batch(
        data.split_indices("test", 2), S)[1]
    md = (gen_out / "generation_score.md").read_text()
    assert "| **overall**" in md and gen["command"] in md
    _md_tables_well_formed(md)
    # two samples: one row of two tiles, 2 px apart
    assert Image.open(gen_out / "generation_samples.png").size == (2 * (S + 2) + 2, S + 4)
    text = results_md.read_text()
    assert "<!-- BEGIN restoration_quality -->" in text
    assert "<!-- BEGIN generation_score -->" in text


@pytest.mark.slow
def test_restoration_table_with_every_method(tiny, tmp_path):
    from benchmarks import restoration_quality

    model_dir, model = tiny
    out = tmp_path / "all"
    assert restoration_quality.main(
        ["--model", model_dir, "--quick", "--output", str(out), "--n", "2", "--batch-size", "1",
         "--steps", "2", "--tasks", TASK, "--sigmas", "0.05"]) == 0
    record = _check_restoration(out, model, restoration_quality.METHODS, (0.05,))
    assert record["full_run_estimate"]["seconds"] > 0
    md = (out / "restoration_quality.md").read_text()
    assert "Prompt diagnostics" in md and "| p2l-no-prompt |" in md


def test_conditioning_check_swaps_one_word_and_scores_every_column(tiny):
    from benchmarks import conditioning_check
    from p2l_jax import data

    attrs = {"size": "large", "color": "magenta", "texture": "solid", "shape": "cross",
             "background": "dark", "position": "center"}
    assert conditioning_check.swapped(attrs, "color")["color"] == "red"      # wraps around
    assert conditioning_check.swapped(attrs, "shape")["shape"] == "circle"
    assert conditioning_check.swapped(attrs, None) == attrs
    _, model = tiny
    idx = data.split_indices("validation", 2)
    images, _, attributes = data.batch(idx, model.image_size)
    table = conditioning_check.losses(model, images, attributes, [10, 900])
    assert list(table) == ["true", *data.ATTRIBUTES, "null"]
    assert all(len(v) == 2 and np.all(np.isfinite(v)) for v in table.values())
    # the null prompt's embedding differs from the captions', so its loss differs
    assert table["null"] != table["true"]
