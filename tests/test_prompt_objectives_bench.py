"""benchmarks.prompt_objectives: each method's P2L settings, and an end-to-end --quick run on
the embedded model (2 images, 2 steps, box inpainting, the paper's objective) whose record
agrees with its own per-image scores and whose rerun takes every piece from the journal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import prompt_objectives as po
from benchmarks import quality


def test_methods_map_to_their_prompt_settings():
    cfg = po.ObjectiveBenchConfig(steps=25, budgets=(0.1, 0.5))
    assert po.methods(cfg) == ["null", "oracle", "tweedie-abs", "tweedie-budget",
                               "tweedie-budget0.5", "renoised-budget", "renoised-budget0.5",
                               "marginal-budget", "marginal-budget0.5"]
    assert not po.method_config("oracle", cfg).tune_prompt
    absolute = po.method_config("tweedie-abs", cfg)
    assert absolute.optimizer.learning_rate == 1e-4 and not absolute.optimizer.per_run
    wide = po.method_config("marginal-budget0.5", cfg)
    assert wide.prompt_objective == "marginal" and wide.num_steps == 25
    assert wide.optimizer.per_run and wide.optimizer.learning_rate == 0.5
    assert wide.prompt_space == "embedding"


def test_token_space_rows():
    cfg = po.ObjectiveBenchConfig(steps=25, budgets=(0.1, 0.5), objectives=("tweedie",),
                                  prompt_spaces=("embedding", "tokens"))
    assert po.methods(cfg) == ["null", "oracle", "tweedie-abs", "tweedie-budget",
                               "tweedie-budget0.5", "tweedie-tokens-budget",
                               "tweedie-tokens-budget0.5"]
    tok = po.method_config("tweedie-tokens-budget0.5", cfg)
    assert (tok.prompt_space, tok.prompt_objective) == ("tokens", "tweedie")
    assert tok.optimizer.per_run and tok.optimizer.learning_rate == 0.5
    assert po.objective_of("tweedie-tokens-budget") == "tweedie"
    # the spaces are the table's extent: a journal of embedding rows serves a tokens run
    assert po.journal_identity(cfg, 0, "m", "d") == po.journal_identity(
        po.ObjectiveBenchConfig(steps=25), 0, "m", "d")


def test_quick_run_records_gains_ranks_and_resumes(tmp_path):
    from p2l_jax.solvers import compiled_programs

    out, md = tmp_path / "po", tmp_path / "RESULTS.md"
    args = ["--quick", "--n", "2", "--steps", "2", "--tasks", "inpaint-box", "--objectives",
            "tweedie", "--output", str(out), "--results-md", str(md)]
    assert po.main(args) == 0
    record = json.loads((out / "prompt_objectives.json").read_text())
    names = ["null", "oracle", "tweedie-abs", "tweedie-budget"]
    by = {c["name"]: c for c in record["cells"]}
    assert list(by) == names and record["reused"] == 0
    null, oracle = by["null"]["scores"]["psnr"], by["oracle"]["scores"]["psnr"]
    assert len(null) == 2 and by["null"]["gain"]["psnr"]["mean"] == 0
    for name in names[2:]:
        c = by[name]
        gain = np.mean(np.subtract(c["scores"]["psnr"], null))
        assert c["gain"]["psnr"]["mean"] == pytest.approx(gain)
        oracle_gain = np.mean(np.subtract(oracle, null))
        if oracle_gain > 0:
            assert c["oracle_fraction"]["mean"] == pytest.approx(gain / oracle_gain)
        else:  # a ratio to a loss would turn losses into positive fractions
            assert c["oracle_fraction"] is None
        assert c["metrics"]["lpips"]["n"] in (0, 2)
    # untuned methods keep their starting embedding: cos 1 to the true caption for the oracle
    assert by["oracle"]["cos_after"] == pytest.approx([1.0, 1.0])
    assert by["null"]["cos_after"] == pytest.approx(record["cos_before"])
    (rank,) = record["ranks"]
    assert rank["name"] == "tweedie" and set(rank["ranks"]) == {"step0", "mid"}
    assert all(1 <= r <= 2 for v in rank["ranks"].values() for r in v)
    assert rank["summary"]["step0"]["chance_mean_rank"] == 1.5
    text = md.read_text()
    assert "<!-- BEGIN prompt_objectives -->" in text and record["command"] in text
    assert all(f"| {m} |" in text for m in names) and "Machine:" in text

    before = compiled_programs()
    assert po.main(args) == 0  # resume: every cell and rank from the journal
    again = json.loads((out / "prompt_objectives.json").read_text())
    assert compiled_programs() == before and again["reused"] == len(names) + 1
    assert [c["scores"] for c in again["cells"]] == [c["scores"] for c in record["cells"]]
    journal = (out / "prompt_objectives.journal.jsonl").read_text().splitlines()
    assert len(journal) == 1 + len(names) + 1
    assert json.loads(journal[0])["weights"] == quality.model_digest(quality.EMBEDDED)
