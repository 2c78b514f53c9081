"""p2l_jax.solvers on the tiny random SD 1.x checkpoint: parity with the plain PyTorch
reference (benchmarks/torch_reference.py), batch independence, determinism, compile reuse, prompt
tuning, gradient variants. Compiled programs are shared between tests (module fixtures)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import p2l_jax
from p2l_jax.errors import P2LError
from p2l_jax.solvers import (DDIMConfig, GMLDPSConfig, LDPSConfig, OptimizerConfig, P2LConfig,
                             PSLDConfig, compiled_programs, gradients_at, solve)
from p2l_jax.solvers.common import initial_latents, step_noise

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from benchmarks import torch_reference as ref  # noqa: E402
from sd_fixtures import inpainting_setup  # noqa: E402

STEPS = 5
# project_every 2: projections at steps 1 and 3; lr 1e-2 so tuning moves C visibly within 5 steps
P2L = P2LConfig(num_steps=STEPS, eta=0.5, project_every=2, optimizer=OptimizerConfig(learning_rate=1e-2))
LDPS = LDPSConfig(num_steps=STEPS)


pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def setup(tiny_sd1_dir):
    s = inpainting_setup(p2l_jax.load_model(tiny_sd1_dir), batch=3, key_seed=7)
    mask = np.asarray(s["op"].mask)[0, :, :, 0]  # (64, 64)
    torch_mods = dict(
        unet=diffusers.UNet2DConditionModel.from_pretrained(tiny_sd1_dir, subfolder="unet").eval(),
        vae=diffusers.AutoencoderKL.from_pretrained(tiny_sd1_dir, subfolder="vae").eval(),
        scheduler=diffusers.DDIMScheduler.from_pretrained(tiny_sd1_dir, subfolder="scheduler"))
    return dict(s, mask=mask, torch=torch_mods)


def _t(a):  # NHWC jax -> NCHW torch
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()  # writable copy


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _torch_inputs(s, cfg):
    shape = (8, 8, 4)
    z_T = initial_latents(s["keys"], shape)
    noises = torch.stack([_t(step_noise(s["keys"], i, shape)) for i in range(cfg.num_steps)])
    A = ref.TorchInpainting(torch.from_numpy(np.array(s["mask"]))[None, None])
    C0 = torch.from_numpy(np.array(s["C0"]))
    return dict(C0=C0, y=_t(s["y"]), A=A, z_T=_t(z_T), noises=noises)


@pytest.fixture(scope="module")
def p2l_run(setup):
    return solve(setup["model"], setup["op"], setup["y"], setup["keys"], P2L)


def test_p2l_matches_torch_reference(setup, p2l_run):
    out = ref.p2l_reference(**setup["torch"], **_torch_inputs(setup, P2L), cfg=P2L)
    lat = out["latents"].permute(0, 2, 3, 1).numpy()
    assert _rel(p2l_run.latents, lat) <= 1e-4
    assert _rel(p2l_run.embedding, out["embedding"].numpy()) <= 1e-4
    np.testing.assert_allclose(p2l_run.residual, out["residual"].numpy(), rtol=1e-4)
    np.testing.assert_allclose(p2l_run.prompt_loss, out["prompt_loss"].numpy(), rtol=1e-4)
    # the projection is active: switching it off changes the torch result markedly
    no_proj = ref.p2l_reference(**setup["torch"], **_torch_inputs(setup, P2L),
                                cfg=dataclasses.replace(P2L, projection="none"))
    assert _rel(no_proj["latents"].numpy(), out["latents"].numpy()) > 1e-2


def test_ldps_matches_torch_reference(setup):
    res = solve(setup["model"], setup["op"], setup["y"], setup["keys"], LDPS)
    out = ref.ldps_reference(**setup["torch"], **_torch_inputs(setup, LDPS), cfg=LDPS)
    assert _rel(res.latents, out["latents"].permute(0, 2, 3, 1).numpy()) <= 1e-4
    np.testing.assert_allclose(res.residual, out["residual"].numpy(), rtol=1e-4)
    assert np.isnan(np.asarray(res.prompt_loss)).all()
    np.testing.assert_array_equal(res.embedding, jnp.broadcast_to(setup["C0"], res.embedding.shape))


def test_prompt_tuning_changes_C(setup, p2l_run):
    C0 = np.broadcast_to(np.asarray(setup["C0"]), p2l_run.embedding.shape)
    assert np.abs(np.asarray(p2l_run.embedding) - C0).max() > 1e-3
    assert p2l_run.images.shape == (3, 64, 64, 3) and np.isfinite(p2l_run.images).all()


def test_no_recompilation_and_determinism(setup, p2l_run):
    before = compiled_programs()
    again = solve(setup["model"], setup["op"], setup["y"] * 0.5, setup["keys"], P2L)
    same = solve(setup["model"], setup["op"], setup["y"], setup["keys"], P2L)
    assert compiled_programs() == before
    np.testing.assert_array_equal(same.latents, p2l_run.latents)  # same key: identical
    assert _rel(again.latents, p2l_run.latents) > 1e-3


def test_batch_independence_same_shape(setup, p2l_run):
    """Sample 0 keeps its key and measurement; its batch mates change: sample 0 is unchanged."""
    k = setup["keys"]
    keys = jnp.stack([k[0], jax.random.key(99), jax.random.key(98)])
    y = setup["y"][jnp.array([0, 2, 1])]
    other = solve(setup["model"], setup["op"], y, keys, P2L)
    np.testing.assert_allclose(other.latents[0], p2l_run.latents[0], atol=1e-5)
    np.testing.assert_allclose(other.embedding[0], p2l_run.embedding[0], atol=1e-5)
    assert _rel(other.latents[1], p2l_run.latents[1]) > 1e-3


@pytest.mark.slow
def test_batch_independence_alone(setup, p2l_run):
    """Sample i alone (B = 1, its own key) equals sample i of the batch of 3 (a new compile).

    A batch of 1 is a different XLA program from a batch of 3 (other conv/matmul blockings), so
    float32 sums are reassociated; the comparison is the relative error of the whole sample,
    ||alone - batched|| / ||batched|| <= 1e-5, as for every other parity check here."""
    for i in (0, 2):
        alone = solve(setup["model"], setup["op"], setup["y"][i:i + 1], setup["keys"][i:i + 1], P2L)
        assert _rel(alone.latents[0], p2l_run.latents[i]) <= 1e-5
        assert _rel(alone.images[0], p2l_run.images[i]) <= 1e-5
        assert _rel(alone.embedding[0], p2l_run.embedding[i]) <= 1e-5


def _point(setup):
    z = jax.random.normal(jax.random.key(3), (3, 8, 8, 4))
    C = jnp.broadcast_to(setup["C0"], (3,) + setup["C0"].shape[1:])
    return z, C


def _torch_step(setup, z, C, index, cfg):
    sch = setup["torch"]["scheduler"]
    sch.set_timesteps(cfg.num_steps)
    t = int(sch.timesteps[index])
    Ct = torch.from_numpy(np.array(C)).requires_grad_(True)
    opt = torch.optim.Adam([Ct], lr=cfg.optimizer.learning_rate)
    A = ref.TorchInpainting(torch.from_numpy(np.array(setup["mask"]))[None, None])
    return ref.guided_step_reference(setup["torch"]["unet"], setup["torch"]["vae"], sch, _t(z), t,
                                     Ct, opt, _t(setup["y"]), A, tune=True, K=1, project=False,
                                     lam=1.0)


GRAD_CFG = dataclasses.replace(P2L, gradient="full")


def test_full_gradient_matches_torch_and_tuning_lowers_prompt_loss(setup):
    z, C = _point(setup)
    g = gradients_at(setup["model"], setup["op"], setup["y"], z, C, 1, GRAD_CFG)
    out = _torch_step(setup, z, C, 1, GRAD_CFG)
    assert _rel(g.g_C, out["g_C"].numpy()) <= 1e-4
    assert _rel(g.C, out["C"].numpy()) <= 1e-5
    assert _rel(g.g_z, out["g_z"].permute(0, 2, 3, 1).numpy()) <= 1e-4
    np.testing.assert_allclose(g.residual, out["residual"].numpy(), rtol=1e-5)
    # one Adam step on C lowers every sample's prompt loss r^2 / n at this z_t
    n = setup["y"][0].size
    assert (np.asarray(g.residual) ** 2 / n < np.asarray(g.prompt_loss)).all()


@pytest.mark.parametrize("variant", ["no_unet_jacobian", "joint"])
def test_other_gradient_variants(setup, variant):
    z, C = _point(setup)
    cfg = dataclasses.replace(GRAD_CFG, gradient=variant)
    g = gradients_at(setup["model"], setup["op"], setup["y"], z, C, 1, cfg)
    full = gradients_at(setup["model"], setup["op"], setup["y"], z, C, 1, GRAD_CFG)
    assert np.isfinite(g.g_z).all() and np.isfinite(g.g_C).all()
    if variant == "joint":  # g_C at (z_t, C0) is the alternating variant's first g_C
        assert _rel(g.g_C, full.g_C) <= 1e-4
        assert _rel(g.C, full.C) <= 1e-5
        np.testing.assert_allclose(g.prompt_loss, full.prompt_loss, rtol=1e-5)
    else:  # same tuning; g_z drops the UNet Jacobian: different from full, same scale
        np.testing.assert_allclose(g.g_C, full.g_C, rtol=1e-5, atol=1e-9)
        ratio = np.linalg.norm(g.g_z) / np.linalg.norm(full.g_z)
        assert 0.1 < ratio < 10 and _rel(g.g_z, full.g_z) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [
    dataclasses.replace(P2L, gradient="no_unet_jacobian"),
    dataclasses.replace(P2L, gradient="joint"),
    dataclasses.replace(P2L, remat=True, projection="glue"),
    GMLDPSConfig(num_steps=STEPS), PSLDConfig(num_steps=STEPS),
], ids=["no_unet_jacobian", "joint", "remat-glue", "gml-dps", "psld"])
def test_every_solver_and_variant_runs_in_the_driver(setup, cfg):
    res = solve(setup["model"], setup["op"], setup["y"], setup["keys"], cfg)
    assert np.isfinite(res.latents).all() and np.isfinite(res.residual).all()


@pytest.mark.slow
def test_remat_does_not_change_the_result(setup, p2l_run):
    res = solve(setup["model"], setup["op"], setup["y"], setup["keys"],
                dataclasses.replace(P2L, remat=True))
    np.testing.assert_allclose(res.latents, p2l_run.latents, atol=1e-5)


@pytest.mark.slow
def test_ddim_sampling_with_guidance_matches_torch(setup):
    cfg = DDIMConfig(num_steps=STEPS, prompt="a photo", guidance_scale=3.0)
    res = solve(setup["model"], None, None, setup["keys"], cfg)
    sch, unet = setup["torch"]["scheduler"], setup["torch"]["unet"]
    sch.set_timesteps(STEPS)
    C = torch.from_numpy(np.asarray(jnp.concatenate(
        [setup["model"].text_embeddings([""])] * 3 + [setup["model"].text_embeddings(["a photo"])] * 3)))
    z = _t(initial_latents(setup["keys"], (8, 8, 4)))
    with torch.no_grad():
        for t in sch.timesteps:
            e = unet(torch.cat([z, z]), t, encoder_hidden_states=C).sample
            e = e[:3] + 3.0 * (e[3:] - e[:3])
            z = sch.step(e, t, z).prev_sample
    assert _rel(res.latents, z.permute(0, 2, 3, 1).numpy()) <= 1e-4


@pytest.mark.parametrize("bad, option", [
    (dict(projection="gluing"), "projection"), (dict(gradient="adjoint"), "gradient"),
    (dict(rho=(1.0, 2.0)), "rho"), (dict(K=0), "K"),
    (dict(project_every=0), "project_every"), (dict(gamma=2), "project_every"),
    (dict(eta=2.0), "eta"), (dict(gradient="joint", K=2), "K"),
    (dict(optimizer="adam"), "optimizer"),
])
def test_bad_options_raise_naming_the_option(bad, option):
    with pytest.raises(P2LError, match=option):
        P2LConfig(**bad)


def test_wrong_measurement_shape_and_key_count_raise(setup):
    with pytest.raises(P2LError, match="measurement"):
        solve(setup["model"], setup["op"], setup["y"][:, :32], setup["keys"], LDPS)
    with pytest.raises(P2LError, match="key"):
        solve(setup["model"], setup["op"], setup["y"], setup["keys"][:2], LDPS)
