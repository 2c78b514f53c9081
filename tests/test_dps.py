"""DPS (``p2l_jax.solvers.dps``) against an independent PyTorch implementation of the paper's
Algorithm 1, on a tiny diffusers pixel pipeline loaded through ``load_model``.

The reference is written here in torch from the algorithm alone: diffusers' ``UNet2DModel``
gives eps, diffusers' ``DDIMScheduler.step`` (eta, explicit ``variance_noise``) gives the
unguided update x', and torch autograd the gradient of ||y - A x0hat||^2 in x_t:

    x_prev = x' - (zeta' / ||y - A x0hat||) grad_{x_t} ||y - A x0hat||^2

The JAX driver and the reference start from the same x_T and use the same per-step noises
(``p2l_jax.solvers.common``'s streams), so the final x and every step's residual must agree
to float32 round-off after several steps (eta 1, i.e. the ancestral sampler, and eta 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2l_jax.errors import P2LError
from p2l_jax.model import load_model
from p2l_jax.operators import Inpainting, box_mask
from p2l_jax.solvers import solve
from p2l_jax.solvers.common import initial_latents, step_noise
from p2l_jax.solvers.driver import per_sample_keys
from p2l_jax.solvers.dps import DPSConfig

torch = pytest.importorskip("torch")
SIZE, STEPS = 8, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pixel_fixtures import make_tiny_pixel

    path = make_tiny_pixel(tmp_path_factory.mktemp("dps") / "ddim", "attn", seed=4,
                           sample_size=SIZE)
    x = np.random.default_rng(3).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    mask = box_mask(SIZE, 4)
    op = Inpainting(mask)
    y = np.asarray(op.measure(jnp.asarray(x), jax.random.key(0), 0.05))
    return dict(path=path, model=load_model(path), op=op, mask=mask, y=y)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def dps_reference(path, y, mask, x_T, noises, cfg):
    """Algorithm 1 in torch; returns (final x NCHW, residuals (N, B))."""
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(path / "unet").eval()
    sched = DDIMScheduler.from_pretrained(path / "scheduler")
    sched.set_timesteps(cfg.num_steps)
    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    y = nchw(y)
    x, residuals = nchw(x_T), []
    for i, t in enumerate(sched.timesteps):
        x = x.detach().requires_grad_(True)
        eps = unet(x, t).sample
        ab = sched.alphas_cumprod[t]
        x0hat = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        r = (y - m * x0hat).flatten(1).norm(dim=1)
        (grad,) = torch.autograd.grad(r.pow(2).sum(), (x,))
        with torch.no_grad():
            x_prime = sched.step(eps, t, x, eta=cfg.eta,
                                 variance_noise=nchw(noises[i])).prev_sample
            x = x_prime - (cfg.zeta / r)[:, None, None, None] * grad
        residuals.append(r.detach())
    return x.detach(), torch.stack(residuals).numpy()


@pytest.mark.parametrize("eta, zeta", [(1.0, 1.0), (0.0, 0.3)])
def test_dps_matches_torch_algorithm_1(setup, eta, zeta):
    cfg = DPSConfig(num_steps=STEPS, eta=eta, zeta=zeta)
    key = jax.random.key(7)
    with jax.default_matmul_precision("highest"):
        result = solve(setup["model"], setup["op"], setup["y"], key, cfg)
    keys = per_sample_keys(key, 2)
    shape = (SIZE, SIZE, 3)
    x_T = initial_latents(keys, shape)
    noises = [step_noise(keys, i, shape) for i in range(STEPS)]
    x_ref, r_ref = dps_reference(setup["path"], setup["y"], setup["mask"], x_T, noises, cfg)
    x_ref = x_ref.numpy().transpose(0, 2, 3, 1)
    err = np.linalg.norm(np.asarray(result.latents) - x_ref) / np.linalg.norm(x_ref)
    print(f"\n[eta={eta}, zeta={zeta}] final x relative error {err:.2e}")
    assert err < 1e-4
    np.testing.assert_allclose(np.asarray(result.residual), r_ref.T, rtol=1e-4)
    # the guidance moved the sample: the same run without it ends elsewhere
    plain = solve(setup["model"], setup["op"], setup["y"], key,
                  DPSConfig(num_steps=STEPS, eta=eta, zeta=0.0))
    assert np.linalg.norm(np.asarray(plain.latents) - x_ref) / np.linalg.norm(x_ref) > 1e-3


@pytest.mark.parametrize("field, value", [("zeta", -1.0), ("eta", 2.0), ("num_steps", 0),
                                          ("gradient", "nope")])
def test_bad_option_names_it(field, value):
    with pytest.raises(P2LError, match=field):
        DPSConfig(**{field: value})
