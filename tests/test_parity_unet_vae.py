"""Parity of the Flax UNet and VAE with diffusers' PyTorch modules on the same random weights.

Two layouts (see ``sd_fixtures.tiny_components``): ``sd1`` (conv projections, one head count)
and ``sd2`` (linear projections, per-block head list, upcast_attention). Weights go through
``p2l_jax.weights.state_from_torch``, the loader's real path. Latents are non-square; the sd2
case uses an odd width (8 x 5) so the UNet's up path must resize to the skip shape
(diffusers' ``upsample_size``).

Checked, as relative error ||jax - torch|| / ||torch|| in float32 at "highest" matmul precision:
UNet eps, VAE posterior mean and log-variance, VAE decode (<= 1e-5); and the gradients with
respect to the latent z and the text embedding C of

    L(z, C) = || D((z - sqrt(1 - ab) eps(z, t, C)) / sqrt(ab)) - y ||^2,   D(z) = vae.decode(z / s)

(UNet -> Tweedie -> decoder), with torch autograd as the reference (<= 1e-4).
Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig
from p2l_jax.models.attention import ATTENTION_IMPLEMENTATIONS, attention
from p2l_jax.weights import state_from_torch

torch = pytest.importorskip("torch")

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
ALPHA_BAR = 0.3
LATENT_HW = {"sd1": (8, 6), "sd2": (8, 5)}  # non-square; sd2 also odd (upsample_size path)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: "torch.Tensor") -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def load_flax(cls, config, torch_module, component):
    """Build ``cls`` under eval_shape and fill it through the loader's ``state_from_torch``."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    tensors = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    return graphdef, state_from_torch(abstract, tensors, component)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request):
    """Torch modules, their Flax twins, inputs, and the torch reference outputs."""
    from sd_fixtures import tiny_components

    layout = request.param
    torch.manual_seed(7)
    t_unet, t_vae, *_ = tiny_components(layout, seed=3)
    unet_cfg = UNetConfig.from_dict(dict(t_unet.config))
    vae_cfg = VAEConfig.from_dict(dict(t_vae.config))
    f = vae_cfg.downscale_factor
    h, w = LATENT_HW[layout]
    rng = np.random.default_rng(0)
    inputs = dict(
        z=rng.standard_normal((2, h, w, 4)).astype(np.float32),
        t=np.array([17, 640], np.int64),
        C=rng.standard_normal((2, 7, unet_cfg.cross_attention_dim)).astype(np.float32),
        x=rng.uniform(-1, 1, (2, h * f, w * f, 3)).astype(np.float32),
        y=rng.uniform(-1, 1, (2, h * f, w * f, 3)).astype(np.float32),
    )
    ref = torch_reference(t_unet, t_vae, inputs, vae_cfg.scaling_factor)
    return dict(layout=layout, unet=load_flax(UNet2DConditionModel, unet_cfg, t_unet, "unet"),
                vae=load_flax(AutoencoderKL, vae_cfg, t_vae, "vae"), inputs=inputs, ref=ref,
                scaling_factor=vae_cfg.scaling_factor)


def torch_reference(t_unet, t_vae, inp, s):
    z = nchw(inp["z"]).requires_grad_(True)
    C = torch.from_numpy(inp["C"]).requires_grad_(True)
    t = torch.from_numpy(inp["t"])
    eps = t_unet(z, t, C).sample
    z0 = (z - math.sqrt(1 - ALPHA_BAR) * eps) / math.sqrt(ALPHA_BAR)
    loss = ((t_vae.decode(z0 / s).sample - nchw(inp["y"])) ** 2).sum()
    grad_z, grad_C = torch.autograd.grad(loss, (z, C))
    with torch.no_grad():
        posterior = t_vae.encode(nchw(inp["x"])).latent_dist
        decoded = t_vae.decode(nchw(inp["z"])).sample
    return dict(eps=nhwc(eps), mean=nhwc(posterior.mean), logvar=nhwc(posterior.logvar),
                decoded=nhwc(decoded), grad_z=nhwc(grad_z), grad_C=grad_C.numpy())


def flax_outputs(c):
    """All compared quantities from one jitted function (one compile per layout)."""
    (ug, us), (vg, vs) = c["unet"], c["vae"]
    s = c["scaling_factor"]

    @jax.jit
    def run(unet_state, vae_state, z, t, C, x, y):
        unet, vae = nnx.merge(ug, unet_state), nnx.merge(vg, vae_state)

        def loss(z, C):
            eps = unet(z, t, C)
            z0 = (z - math.sqrt(1 - ALPHA_BAR) * eps) / math.sqrt(ALPHA_BAR)
            return jnp.sum((vae.decode(z0 / s) - y) ** 2), eps

        (_, eps), (grad_z, grad_C) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(z, C)
        mean, logvar = vae.encode(x)
        return dict(eps=eps, mean=mean, logvar=logvar, decoded=vae.decode(z),
                    grad_z=grad_z, grad_C=grad_C)

    i = c["inputs"]
    with jax.default_matmul_precision("highest"):
        return run(us, vs, i["z"], i["t"], i["C"], i["x"], i["y"])


def test_unet_vae_forward_and_gradient_parity(case):
    out = flax_outputs(case)
    errors = {k: rel_err(out[k], case["ref"][k]) for k in case["ref"]}
    print(f"\n[{case['layout']}] relative errors: "
          + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    for key in ("eps", "mean", "logvar", "decoded"):
        assert out[key].shape == case["ref"][key].shape, key
        assert errors[key] <= FWD_TOL, (key, errors[key])
    for key in ("grad_z", "grad_C"):
        assert out[key].shape == case["ref"][key].shape, key
        assert errors[key] <= GRAD_TOL, (key, errors[key])


# ----------------------------------------------------------------------------- configs
UNET_DICT = dict(block_out_channels=[32, 64], norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=2, layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 _class_name="UNet2DConditionModel", some_future_key=123)


def test_unet_config_from_dict_ignores_unknown_keys_and_is_hashable():
    cfg = UNetConfig.from_dict(UNET_DICT)
    assert cfg.block_out_channels == (32, 64) and cfg.down_block_types[0] == "CrossAttnDownBlock2D"
    assert hash(cfg) == hash(UNetConfig.from_dict(dict(UNET_DICT)))
    assert UNetConfig.from_dict({**UNET_DICT, "attention_head_dim": [2, 4]}).per_block(
        "attention_head_dim") == (2, 4)


@pytest.mark.parametrize("key, value, bad", [
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
     "SimpleCrossAttnDownBlock2D"),
    ("up_block_types", ["KUpBlock2D", "CrossAttnUpBlock2D"], "KUpBlock2D"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2DSimpleCrossAttn"),
])
def test_unet_unknown_block_type_names_it(key, value, bad):
    with pytest.raises(P2LError, match=bad) as err:
        UNetConfig.from_dict({**UNET_DICT, key: value}, source="unet/config.json")
    assert "unet/config.json" in str(err.value) and key in str(err.value)


def test_vae_unknown_block_type_names_it():
    with pytest.raises(P2LError, match="AttnDownEncoderBlock2D") as err:
        VAEConfig.from_dict({"down_block_types": ["AttnDownEncoderBlock2D"],
                             "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [32]})
    assert "vae/config.json" in str(err.value)


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"),
                                        ("resnet_time_scale_shift", "scale_shift")])
def test_unet_unsupported_option_names_key(key, value):
    with pytest.raises(P2LError, match=key):
        UNetConfig.from_dict({**UNET_DICT, key: value})


def test_per_block_list_of_wrong_length_names_key():
    with pytest.raises(P2LError, match="attention_head_dim"):
        UNetConfig.from_dict({**UNET_DICT, "attention_head_dim": [2, 4, 8]})


# ----------------------------------------------------------------------------- attention
def numpy_attention(q, k, v, mask):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("impl", [i for i in ATTENTION_IMPLEMENTATIONS if i != "cudnn"])
def test_attention_matches_reference_with_mask_and_causal(impl):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 5, 3, 8)).astype(np.float32) for _ in range(3))
    key_mask = np.array([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]], bool)[:, None, None, :]
    causal = np.tril(np.ones((5, 5), bool))[None, None]
    full = np.ones((1, 1, 1, 1), bool)
    with jax.default_matmul_precision("highest"):
        plain = attention(q, k, v, impl=impl)
        masked = attention(q, k, v, impl=impl, mask=key_mask)
        causal_out = attention(q, k, v, impl=impl, causal=True)
        both = attention(q, k, v, impl=impl, mask=key_mask, causal=True)
    assert rel_err(plain, numpy_attention(q, k, v, full)) < 1e-5
    assert rel_err(masked, numpy_attention(q, k, v, key_mask)) < 1e-5
    assert rel_err(causal_out, numpy_attention(q, k, v, causal)) < 1e-5
    assert rel_err(both, numpy_attention(q, k, v, key_mask & causal)) < 1e-5


def test_attention_unknown_impl_lists_known():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(P2LError, match="flash3.*einsum, xla, cudnn"):
        attention(x, x, x, impl="flash3")
    with pytest.raises(P2LError, match="flash3"):
        nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(block_out_channels=(8,), norm_num_groups=8),
                                             attention_impl="flash3", rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------- input checks
@pytest.fixture(scope="module")
def abstract_unet_vae():
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(UNET_DICT),
                                                       rngs=nnx.Rngs(0)))
    vae = nnx.eval_shape(lambda: AutoencoderKL(
        VAEConfig(block_out_channels=(8, 8), norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2), rngs=nnx.Rngs(0)))
    return unet, vae


@pytest.mark.parametrize("sample, t, ctx, match", [
    ((1, 8, 6, 3), 5, (1, 7, 32), r"4 channels, got shape \(1, 8, 6, 3\)"),
    ((2, 8, 6, 4), [1, 2, 3], (2, 7, 32), r"timesteps .* \(2,\), got \(3,\)"),
    ((2, 8, 6, 4), 5, (2, 7, 16), r"\(B, L, 32\) \(cross_attention_dim\), got \(2, 7, 16\)"),
])
def test_unet_rejects_bad_input_shapes(abstract_unet_vae, sample, t, ctx, match):
    unet, _ = abstract_unet_vae
    with pytest.raises(P2LError, match=match):
        unet(jnp.zeros(sample), jnp.asarray(t), jnp.zeros(ctx))


def test_vae_rejects_bad_input_shapes(abstract_unet_vae):
    _, vae = abstract_unet_vae
    with pytest.raises(P2LError, match=r"divisible by 2; got \(1, 9, 8, 3\)"):
        vae.encode(jnp.zeros((1, 9, 8, 3)))
    with pytest.raises(P2LError, match=r"4 channels; got \(1, 4, 4, 3\)"):
        vae.decode(jnp.zeros((1, 4, 4, 3)))


@pytest.mark.parametrize("src, dst", [((3, 3), (5, 6)), ((4, 3), (7, 5)), ((2, 3), (4, 6))])
def test_nearest_resize_matches_torch_interpolate(src, dst):
    from p2l_jax.models.layers import nearest_resize

    x = np.random.default_rng(2).standard_normal((1, *src, 2)).astype(np.float32)
    ref = nhwc(torch.nn.functional.interpolate(nchw(x), size=dst, mode="nearest"))
    np.testing.assert_array_equal(np.asarray(nearest_resize(jnp.asarray(x), dst)), ref)
