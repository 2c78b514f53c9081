"""benchmarks.position_probe: the readout, centroid and feature helpers on data with a known
answer, and the three probes end to end on the tiny random checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import position_probe as probe
from benchmarks import quality


def test_pooled_features_are_cell_means_of_z_and_z_squared():
    z = np.arange(2 * 4 * 4 * 1, dtype=np.float64).reshape(2, 4, 4, 1)
    f = probe.pooled_features(z, grid=2)
    assert f.shape == (2, 2 * 2 * 2 * 1)
    top_left = z[0, :2, :2, 0]
    assert f[0, 0] == pytest.approx(top_left.mean())
    assert f[0, 4] == pytest.approx((top_left ** 2).mean())
    with pytest.raises(ValueError, match="not divisible by grid 3"):
        probe.pooled_features(z, grid=3)


def test_lda_reads_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(5, size=1500)
    centres = rng.normal(size=(5, 12)) * 3.0
    f = centres[labels] + rng.normal(size=(1500, 12))
    assert probe.lda_accuracy(f[:1000], labels[:1000], f[1000:], labels[1000:]) > 0.95
    shuffled = rng.permutation(labels)
    acc = probe.lda_accuracy(f[:1000], shuffled[:1000], f[1000:], shuffled[1000:])
    assert acc < 0.3   # chance is 0.2


def test_centroid_finds_a_blob_relative_to_the_centre():
    image = np.full((32, 32, 3), -0.5)
    image[4:10, 20:26] = 0.8                   # rows 4..9, columns 20..25
    x, y = probe.centroid(image)
    assert x == pytest.approx(22.5 - 15.5) and y == pytest.approx(6.5 - 15.5)
    assert probe.centroid(np.zeros((8, 8, 3))) == (0.0, 0.0)


def test_anchors_follow_the_dataset_drawing():
    a = probe.anchors_px(64)
    assert a["center"] == [0.0, 0.0]
    assert a["left"][0] < 0 == a["left"][1] and a["bottom"][1] > 0 == a["bottom"][0]


@pytest.fixture(scope="module")
def tiny(tiny_sd1_dir):
    pytest.importorskip("diffusers")
    return str(tiny_sd1_dir), quality.load(str(tiny_sd1_dir))


def test_probes_run_end_to_end_and_finetuning_changes_the_layout(tiny, tmp_path):
    path, model = tiny
    out = tmp_path / "probe"
    md_file = tmp_path / "RESULTS.md"
    md_file.write_text("# R\n\n<!-- BEGIN position_probe -->\nold\n<!-- END position_probe -->\n")
    assert probe.main(["--model", path, "--quick", "--finetune-steps", "3", "--output", str(out),
                       "--results-md", str(md_file)]) == 0
    record = json.loads((out / "position_probe.json").read_text())
    assert set(record["readout"]) == {"999", "400"}
    assert all(0.0 <= v <= 1.0 for v in record["readout"].values())
    for table in (record["layout"], record["finetune"]["layout"]):
        assert set(table) == {"999", "900"}
        assert all(set(row) == set(probe.POSITIONS) for row in table.values())
    # three Adam steps at lr 1e-3 change the networks, so the predicted layout moves
    before, after = record["layout"]["999"]["left"], record["finetune"]["layout"]["999"]["left"]
    assert before != after
    md = md_file.read_text()
    assert "old" not in md and "Position probe" in md and "After fine-tuning" in md
    # the model on disk is untouched: a fresh load predicts the first layout again
    again = probe.layout(quality.load(path), probe.get_config(True), seed=0)
    assert again[999]["left"] == pytest.approx(before)


def test_negative_finetune_steps_is_an_error(tiny, capsys):
    with pytest.raises(SystemExit):
        probe.main(["--model", tiny[0], "--finetune-steps", "-1"])
    assert "--finetune-steps must be >= 0" in capsys.readouterr().err
