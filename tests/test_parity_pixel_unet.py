"""Parity of the Flax ``UNet2DModel`` with diffusers' PyTorch module on the same random weights.

Two layouts (see ``pixel_fixtures.LAYOUTS``): ``attn`` (self attention in two levels and the mid
block, head size 4, separate attention group count) and ``plain`` (no attention, two resnets
per level, sin-first embedding with freq_shift 1). Inputs are non-square (16 x 8). Weights go
through ``p2l_jax.weights.state_from_torch``, the loader's real path.

Checked, as relative error ||jax - torch|| / ||torch|| in float32 at "highest" precision: the
eps output (<= 1e-5) and the gradient with respect to x of the DPS loss

    L(x) = || (x - sqrt(1 - ab) eps(x, t)) / sqrt(ab) - y ||^2     (UNet -> Tweedie)

with torch autograd as the reference (<= 1e-4). Run with ``-s`` to see the errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.models.unet_pixel import UNet2DConfig, UNet2DModel
from p2l_jax.weights import state_from_torch

torch = pytest.importorskip("torch")

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
ALPHA_BAR = 0.3
HW = (16, 8)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("layout", ["attn", "plain"])
def test_pixel_unet_forward_and_gradient_parity(layout):
    from pixel_fixtures import tiny_pixel_unet

    t_unet = tiny_pixel_unet(layout, seed=3)
    cfg = UNet2DConfig.from_dict(dict(t_unet.config))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet2DModel(cfg, rngs=nnx.Rngs(0))))
    state = state_from_torch(abstract, {k: v.numpy() for k, v in t_unet.state_dict().items()},
                             "unet")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *HW, 3)).astype(np.float32)
    y = rng.standard_normal((2, *HW, 3)).astype(np.float32)
    t = np.array([17, 640], np.int64)

    xt = nchw(x).requires_grad_(True)
    eps_ref = t_unet(xt, torch.from_numpy(t)).sample
    x0 = (xt - math.sqrt(1 - ALPHA_BAR) * eps_ref) / math.sqrt(ALPHA_BAR)
    (grad_ref,) = torch.autograd.grad(((x0 - nchw(y)) ** 2).sum(), (xt,))

    @jax.jit
    def run(state, x, t, y):
        unet = nnx.merge(graphdef, state)

        def loss(x):
            eps = unet(x, t)
            x0 = (x - math.sqrt(1 - ALPHA_BAR) * eps) / math.sqrt(ALPHA_BAR)
            return jnp.sum((x0 - y) ** 2), eps

        (_, eps), grad = jax.value_and_grad(loss, has_aux=True)(x)
        return eps, grad

    with jax.default_matmul_precision("highest"):
        eps, grad = run(state, x, t, y)
    e_eps, e_grad = rel_err(eps, nhwc(eps_ref)), rel_err(grad, nhwc(grad_ref))
    print(f"\n[{layout}] relative errors: eps={e_eps:.2e} grad_x={e_grad:.2e}")
    assert eps.shape == x.shape and e_eps <= FWD_TOL
    assert grad.shape == x.shape and e_grad <= GRAD_TOL


BASE = dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=4,
            _class_name="UNet2DModel", some_future_key=1)


def test_config_from_dict_ignores_unknown_keys_and_is_hashable():
    cfg = UNet2DConfig.from_dict(BASE)
    assert cfg.block_out_channels == (8, 16) and cfg.downscale_factor == 2
    assert hash(cfg) == hash(UNet2DConfig.from_dict(dict(BASE)))


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("time_embedding_type", "fourier"), ("num_class_embeds", 10),
    ("resnet_time_scale_shift", "scale_shift"), ("center_input_sample", True),
    ("attention_head_dim", 32),
])
def test_unsupported_or_invalid_option_names_key(key, value):
    with pytest.raises(P2LError, match=key) as err:
        UNet2DConfig.from_dict({**BASE, key: value}, source="unet/config.json")
    assert "unet/config.json" in str(err.value)


def test_sample_side_not_divisible_is_refused_with_shape():
    unet = nnx.eval_shape(lambda: UNet2DModel(UNet2DConfig.from_dict(BASE), rngs=nnx.Rngs(0)))
    with pytest.raises(P2LError, match=r"\(1, 8, 5, 3\)"):
        unet(jnp.zeros((1, 8, 5, 3)), 3)
