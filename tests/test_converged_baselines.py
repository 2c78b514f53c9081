"""benchmarks.converged_baselines: the choice of N*, the equal-time step count, and one run
end to end on the tiny random checkpoint (curve, tuning, test; journal reuse; the section)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import converged_baselines as cb
from benchmarks import quality

TASK = "inpaint-box"


def _point(solver, steps, rho, residual):
    return {"solver": solver, "steps": steps, "rho": rho, "residual": {"mean": residual}}


def test_n_star_is_the_first_step_count_where_every_baseline_fits_y():
    curve = [_point("ldps", 100, 0.1, 9.0), _point("ldps", 100, 0.3, 6.0),
             _point("psld", 100, 0.1, 7.0),
             _point("ldps", 250, 0.1, 5.5), _point("psld", 250, 0.1, 7.0),
             _point("psld", 250, 0.3, 6.2),
             _point("ldps", 500, 0.1, 5.0), _point("psld", 500, 0.1, 5.0)]
    # noise 5: at 100 PSLD misses 6.25 (7.0); at 250 each baseline's best rho is within
    assert cb.choose_steps(curve, 5.0, 1.25) == (250, True)
    assert cb.choose_steps(curve, 5.0, 1.0) == (500, True)
    assert cb.choose_steps(curve, 5.0, 0.5) == (500, False)    # none: the largest, flagged
    # a step count where one baseline was not run does not count
    assert cb.choose_steps(curve[:3] + curve[6:7], 5.0, 100.0) == (100, True)
    assert cb.choose_steps([_point("ldps", 100, 0.1, 1.0)], 5.0, 2.0) == (100, False)


def test_equal_time_steps_divides_the_baselines_time_by_p2ls_step_time():
    assert cb.equal_time_steps(12.0, 0.15) == 80
    assert cb.equal_time_steps(0.01, 0.15) == 1


def test_configs_come_from_the_library_with_psld_box_weights():
    from p2l_jax.solvers import LDPSConfig, P2LConfig, PSLDConfig

    assert cb.config_for("ldps", "sr", 100, 0.3) == LDPSConfig(num_steps=100, rho=0.3)
    assert cb.config_for("psld", TASK, 50, 0.03) == PSLDConfig(num_steps=50, rho=0.03,
                                                               omega=0.1, gamma=0.01)
    assert cb.config_for("psld", "sr", 50) == PSLDConfig(num_steps=50)
    assert cb.config_for("p2l", "sr", 25) == P2LConfig(num_steps=25)


@pytest.fixture(scope="module")
def tiny(tiny_sd1_dir):
    pytest.importorskip("diffusers")
    return str(tiny_sd1_dir)


def test_runs_end_to_end_and_resumes_from_its_journal(tiny, tmp_path):
    from p2l_jax.solvers import compiled_programs

    out, md = tmp_path / "out", tmp_path / "RESULTS.md"
    args = ["--model", tiny, "--output", str(out), "--tasks", TASK, "--steps-grid", "2",
            "--curve-rhos", "0.1", "--rho-grid", "0.1", "0.3", "--p2l-steps", "2",
            "--n-curve", "1", "--n-tune", "2", "--n", "2", "--batch-size", "1"]
    assert cb.main([*args, "--tolerance", "1e9", "--results-md", str(md)]) == 0
    record = json.loads((out / f"{cb.NAME}.json").read_text())
    journal = (out / f"{cb.NAME}.journal.jsonl").read_text().splitlines()
    assert len(journal) == 1 + record["computed_batches"]
    batches = [json.loads(line) for line in journal[1:]]

    curve = record["curve"][TASK]
    assert curve["steps"] == 2 and curve["reached"]
    truth = quality.load_images("validation", 1, quality.load(tiny).image_size, 0)
    assert curve["noise"]["mean"] == pytest.approx(0.05 * np.sqrt(truth.truth[0].size), rel=0.1)

    # tuning (per task): the mean PSNR of the journal's per-image scores; the best wins
    def psnrs(split, solver, rho, steps=2):
        rows = [b for b in batches if b["split"] == split and b["config"]["rho"] == rho
                and b["config"]["solver"] == solver and b["config"]["num_steps"] == steps]
        return sum((b["scores"]["psnr"] for b in sorted(rows, key=lambda b: b["start"])), [])

    names = {"ldps": "LDPSConfig", "psld": "PSLDConfig"}
    for e in record["tuning"]:
        assert e["task"] == TASK
        assert e["psnr"]["mean"] == pytest.approx(np.mean(psnrs("validation",
                                                                names[e["solver"]], e["rho"])))
    for s in cb.BASELINES:
        scored = {e["rho"]: e["psnr"]["mean"] for e in record["tuning"] if e["solver"] == s}
        assert sorted(scored) == [0.1, 0.3]
        assert record["rho"][s][TASK] == max(scored, key=scored.get)
    # the curve's image is the tuning's first batch: computed once
    keys = [(b["split"], json.dumps(b["config"], sort_keys=True), b["start"]) for b in batches]
    assert len(keys) == len(set(keys))

    test = record["test"][TASK]
    rows = test["rows"]
    assert set(rows) == {"ldps@N*", "psld@N*", "p2l@N*", "p2l@2", "p2l@N_eq", "ldps@2",
                         "psld@2"}
    assert rows["ldps@N*"]["rho"] == record["rho"]["ldps"][TASK]
    assert all(len(r["scores"]["psnr"]) == 2 for r in rows.values())
    base = np.mean([rows[f"{s}@N*"]["wall_s_per_image"] for s in cb.BASELINES])
    assert test["equal_time_steps"] == cb.equal_time_steps(
        base, rows["p2l@N*"]["wall_s_per_image"] / 2)
    for c in test["comparisons"]:
        diff = np.subtract(rows[c["p2l"]]["scores"]["psnr"], rows[c["versus"]]["scores"]["psnr"])
        assert c["delta"]["psnr"]["mean"] == pytest.approx(diff.mean())
        assert c["verdict"]["psnr"] == quality.verdict(c["delta"]["psnr"])
    text = md.read_text()
    assert f"<!-- BEGIN {cb.NAME} -->" in text and record["command"] in text
    for block in text.split("\n\n"):  # every table has one column count
        assert len({r.count("|") for r in block.splitlines() if r.startswith("|")}) <= 1

    # a rerun computes and compiles nothing; a stricter tolerance is read off the same curve
    before = compiled_programs()
    assert cb.main([*args, "--tolerance", "1e-9"]) == 0
    again = json.loads((out / f"{cb.NAME}.json").read_text())
    assert again["computed_batches"] == 0 and compiled_programs() == before
    assert again["curve"][TASK]["steps"] == 2 and not again["curve"][TASK]["reached"]
    assert again["test"][TASK]["rows"]["p2l@N*"]["scores"] == rows["p2l@N*"]["scores"]
    assert "not reached" in (out / f"{cb.NAME}.md").read_text()
