"""scripts/train_pixel_model.py at its ``tiny`` preset: a run killed mid-training resumes from
its checkpoint, the export is a diffusers DDIMPipeline directory that diffusers (PyTorch) and
``p2l_jax.load_model`` read as the same network, and the wall time adds up over both runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_pixel_model.py"


class Killed(Exception):
    pass


def _load_script():
    spec = importlib.util.spec_from_file_location("train_pixel_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run killed after its step-3 checkpoint, then rerun to the end."""
    script = _load_script()
    root = tmp_path_factory.mktemp("train_pixel")
    out, work, first, second = root / "model", root / "work", [], []

    def killing_log(msg):
        first.append(msg)
        if msg.startswith("pixel: step 4/"):
            raise Killed

    cfg = script.get_config("tiny")
    with pytest.raises(Killed):
        script.run(cfg, out, work, killing_log)
    wall_first = json.loads(next(work.glob("wall_*.json")).read_text())["wall_s"]
    summary = script.run(cfg, out, work, second.append)
    return script, out, summary, first, second, wall_first


def test_killed_run_resumes_at_its_checkpoint(trained):
    _, out, summary, first, second, wall_first = trained
    assert not out.exists() or any("resumed" in m for m in second)
    assert [m for m in second if "resumed" in m] == [
        m for m in second if m.startswith("pixel: resumed") and m.endswith("at step 3")]
    assert len([m for m in second if "resumed" in m]) == 1, second
    trained_steps = [int(m.split()[2].split("/")[0]) for m in second
                     if m.startswith("pixel: step ") and "loss" in m]
    assert trained_steps == [4, 5, 6], second
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert len(losses) == 6 and np.all(np.isfinite(losses))  # history survives the resume
    assert summary["timings"]["wall_s_all_runs"] > wall_first > 0


def test_export_is_a_ddim_pipeline_that_diffusers_and_p2l_read_alike(trained):
    script, out, summary, *_ = trained
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from p2l_jax import load_model

    index = json.loads((out / "model_index.json").read_text())
    assert (index["_class_name"], index["unet"]) == ("DDIMPipeline", ["diffusers", "UNet2DModel"])
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched == json.loads(json.dumps(script.emb.SCHEDULER))  # the embedded model's
    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    unet, info = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    model = load_model(out)
    assert 0 < summary["shipped"]["fp16_param_rel_err"] < 1e-3  # float16 rounding only
    x = np.random.default_rng(0).standard_normal((2, model.image_size, model.image_size, 3))
    x = x.astype(np.float32)
    t = np.array([999, 10])
    with torch.no_grad():
        ref = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    out_jax = np.asarray(model.eps(x, t, None))
    assert np.linalg.norm(out_jax - ref) / np.linalg.norm(ref) <= 1e-4
    assert summary["size_bytes"] > 0 and summary["params"]["unet"] == sum(
        p.numel() for p in unet.parameters())


def test_stop_at_zero_exports_the_checkpoint_without_training(trained, tmp_path):
    script, out, summary, *_ = trained
    work = next(p for p in out.parent.iterdir() if p.name == "work")
    logs = []
    again = script.run(script.get_config("tiny"), tmp_path / "export", work, logs.append,
                       stop_at=0)
    assert not [m for m in logs if m.startswith("pixel: step ")], logs
    assert again["trained_steps"] == summary["trained_steps"] == 6
    part = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "export" / part).read_bytes() == (out / part).read_bytes()
