"""scripts/train_pixel_model.py at a reduced ``tiny`` preset: a run killed mid-training resumes
from its checkpoint, the export is a diffusers DDIMPipeline directory that diffusers (PyTorch)
and ``p2l_jax.load_model`` read as the same network, and the wall time adds up over both runs.

One training (killed, then resumed) serves every test. Each run of the script jits its own
training step and evaluation; a persistent compilation cache (this module only) lets the
resumed run and the export-only run load the programs the first run compiled."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from script_loader import load_script


class Killed(Exception):
    pass


def tiny_config(script):
    """The ``tiny`` preset with 2 images per batch and for evaluation and 4 steps, a
    checkpoint every 2: the same code paths (attention level, EMA, min-SNR loss) for less
    compute."""
    cfg = script.get_config("tiny")
    stage = dataclasses.replace(cfg.stage, batch_size=2, steps=4)
    return dataclasses.replace(cfg, eval_size=2, ckpt_every=2, stage=stage)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    new = (str(tmp_path_factory.mktemp("xla_cache")), 0.0, 0)
    for name, value in zip(names, new):
        jax.config.update(name, value)
    cc.reset_cache()
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compilation_cache):
    """A run killed after its step-2 checkpoint (during step 3's log), then rerun to the end."""
    script = load_script("train_pixel_model")
    root = tmp_path_factory.mktemp("train_pixel")
    out, work, first, second = root / "model", root / "work", [], []
    cfg = tiny_config(script)
    kill_at = cfg.ckpt_every + 1

    def killing_log(msg):
        first.append(msg)
        if msg.startswith(f"pixel: step {kill_at}/"):
            raise Killed

    with pytest.raises(Killed):
        script.run(cfg, out, work, killing_log)
    wall_first = json.loads(next(work.glob("wall_*.json")).read_text())["wall_s"]
    summary = script.run(cfg, out, work, second.append)
    return script, cfg, out, summary, first, second, wall_first


def test_killed_run_resumes_at_its_checkpoint(trained):
    _, cfg, out, summary, first, second, wall_first = trained
    steps, saved = cfg.stage.steps, cfg.ckpt_every
    assert not [m for m in first if "resumed" in m]
    resumed = [m for m in second if "resumed" in m]
    assert len(resumed) == 1 and resumed[0].startswith("pixel: resumed"), second
    assert resumed[0].endswith(f"at step {saved}"), resumed
    trained_steps = [int(m.split()[2].split("/")[0]) for m in second
                     if m.startswith("pixel: step ") and "loss" in m]
    assert trained_steps == list(range(saved + 1, steps + 1)), second
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert len(losses) == steps and np.all(np.isfinite(losses))  # history survives the resume
    assert summary["trained_steps"] == steps
    assert summary["timings"]["wall_s_all_runs"] > wall_first > 0


def test_export_is_a_ddim_pipeline_that_diffusers_and_p2l_read_alike(trained):
    script, _, out, summary, *_ = trained
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
    script, cfg, out, summary, *_ = trained
    work = next(p for p in out.parent.iterdir() if p.name == "work")
    logs = []
    again = script.run(cfg, tmp_path / "export", work, logs.append, stop_at=0)
    assert not [m for m in logs if m.startswith("pixel: step ")], logs
    assert again["trained_steps"] == summary["trained_steps"] == cfg.stage.steps
    part = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "export" / part).read_bytes() == (out / part).read_bytes()
