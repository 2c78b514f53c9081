"""scripts/train_embedded_model.py at its ``tiny`` preset: a few real training steps of both
stages, the diffusers-layout export, and that diffusers / transformers (PyTorch) and
``p2l_jax.load_model`` read the same directory and compute the same networks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from script_loader import load_script

PROMPTS = ["a large red striped circle on a dark background, left", ""]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run the tiny preset once: (script module, model dir, workdir, summary, log lines)."""
    script = load_script("train_embedded_model")
    root = tmp_path_factory.mktemp("train_embedded")
    out, work, logs = root / "model", root / "work", []
    summary = script.run(script.get_config("tiny"), out, work, logs.append)
    return script, out, work, summary, logs


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_losses_are_finite_and_decrease(trained):
    _, _, _, summary, _ = trained
    for stage, key, better in (("vae", "psnr_db", np.greater), ("diffusion", "eps_mse", np.less)):
        history = summary[stage]["history"]
        train = [h["loss"] for h in history if "loss" in h]
        evals = [h["eval"][key] for h in history if "eval" in h]
        assert len(train) == 6 and np.all(np.isfinite(train)), (stage, train)
        assert np.mean(train[-2:]) < np.mean(train[:2]), (stage, train)
        # held-out metric before training vs after the last step
        assert len(evals) == 2 and better(evals[-1], evals[0]), (stage, evals)


def test_directory_layout_configs_and_size(trained):
    script, out, _, summary, _ = trained
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["_class_name"], sched["beta_schedule"], sched["beta_start"], sched["beta_end"],
            sched["steps_offset"], sched["set_alpha_to_one"], sched["clip_sample"]) == (
        "DDIMScheduler", "scaled_linear", 0.00085, 0.012, 1, False, False)
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(summary["scaling_factor"])
    assert 0.05 < vae["scaling_factor"] < 20
    text = json.loads((out / "text_encoder" / "config.json").read_text())
    assert text["architectures"] == ["CLIPTextModel"] and text["vocab_size"] == 49408
    from safetensors import safe_open

    with safe_open(str(out / "text_encoder" / "model.safetensors"), "np") as f:
        keys = list(f.keys())
        assert keys and all(k.startswith("text_model.") for k in keys)
        assert f.get_tensor(keys[0]).dtype == np.float16
    packaged = script.default_tokenizer_dir()
    for name in ("vocab.json", "merges.txt"):
        assert (out / "tokenizer" / name).read_bytes() == (packaged / name).read_bytes()
    assert summary["size_bytes"] == script.directory_size(out) < 10_000_000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_generation_check_scores_samples_of_the_written_model(trained):
    """The final check samples the exported directory with the library's DDIM solver and
    scores every attribute plus the mean (a value in [0, 1], not a placeholder)."""
    script, out, _, summary, _ = trained
    gen = summary["generation"]
    cfg = script.get_config("tiny")
    assert (gen["samples"], gen["ddim_steps"], gen["guidance"]) == (
        cfg.gen_samples, cfg.gen_steps, cfg.guidance)
    acc = gen["attribute_accuracy"]
    from p2l_jax.data import ATTRIBUTES

    assert set(acc) == set(ATTRIBUTES) | {"all"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["all"] == pytest.approx(np.mean([acc[a] for a in ATTRIBUTES]))
    recorded = json.loads((out / "training_summary.json").read_text())
    assert recorded["generation"] == gen


def test_diffusers_transformers_and_p2l_agree(trained):
    _, out, _, _, _ = trained
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextModel

    from p2l_jax import load_model

    model = load_model(out)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    text, info = CLIPTextModel.from_pretrained(out, subfolder="text_encoder",
                                               output_loading_info=True)
    unet, uinfo = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet",
                                                                 output_loading_info=True)
    vae = diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae")
    for loading in (info, uinfo):  # transformers silently random-initialises missing keys
        assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    assert unet.dtype == text.dtype == vae.dtype == torch.float32

    rng = np.random.default_rng(0)
    ids = model.tokenize(PROMPTS)
    s, f = model.scaling_factor, model.vae_scale_factor
    z = rng.standard_normal((2, model.sample_size, model.sample_size, 4)).astype(np.float32)
    x = rng.uniform(-1, 1, (2, model.image_size, model.image_size, 3)).astype(np.float32)
    t = np.array([999, 10])
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    nhwc = lambda a: a.detach().numpy().transpose(0, 2, 3, 1)
    with torch.no_grad():
        C_ref = text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
        eps_ref = nhwc(unet(nchw(z), torch.from_numpy(t), C_ref).sample)
        dec_ref = nhwc(vae.decode(nchw(z)).sample)
        enc_ref = nhwc(vae.encode(nchw(x)).latent_dist.mean)
    C = model.encode_text(ids)
    assert _rel_err(C, C_ref.numpy()) <= 1e-4
    assert _rel_err(model.eps(z, t, C_ref.numpy()), eps_ref) <= 1e-4
    assert _rel_err(model.decode(s * z), dec_ref) <= 1e-4
    assert _rel_err(model.encode(x), s * enc_ref) <= 1e-4
    assert dec_ref.shape[1] == f * z.shape[1]


def test_rerun_resumes_from_checkpoints(trained, tmp_path):
    """A second run with the same workdir trains no step and writes the same weights."""
    script, out, work, _, _ = trained
    logs = []
    script.run(script.get_config("tiny"), tmp_path / "again", work, logs.append)
    assert sum("resumed" in line and "at step 6" in line for line in logs) == 2, logs
    assert not any("/6 loss" in line for line in logs)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "vae/config.json"):
        assert (tmp_path / "again" / part).read_bytes() == (out / part).read_bytes(), part


def test_new_diffusion_config_reuses_the_autoencoder(trained, tmp_path):
    """The autoencoder checkpoint is keyed by the autoencoder's own fields: a changed diffusion
    stage resumes the finished autoencoder and trains the diffusion stage from scratch."""
    import dataclasses
    import shutil

    script, out, work, _, _ = trained
    cfg = script.get_config("tiny")
    changed = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, lr=1e-3))
    assert script.fingerprint(changed, "vae") == script.fingerprint(cfg, "vae")
    assert script.fingerprint(changed) != script.fingerprint(cfg)
    shutil.copytree(work, tmp_path / "work")
    logs = []
    script.run(changed, tmp_path / "model", tmp_path / "work", logs.append)
    assert [line for line in logs if "resumed" in line] == \
        [f"vae: resumed from {tmp_path / 'work' / 'vae_ckpt.npz'} at step 6"], logs
    assert any("diffusion: step 6/6 loss" in line for line in logs)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "model" / vae).read_bytes() == (out / vae).read_bytes()
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "model" / unet).read_bytes() != (out / unet).read_bytes()
