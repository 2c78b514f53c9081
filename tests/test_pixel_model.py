"""Loading a diffusers pixel-space pipeline (UNet2DModel + DDIMScheduler) through
``p2l_jax.load_model`` and running the one driver on it (D = E = identity).

The directory is written by diffusers itself (``pixel_fixtures.make_tiny_pixel``), so the test
covers the real path a user's DDPM/DDIM checkpoint takes: config parsing, safetensors, key
mapping, the scheduler. The loaded eps is compared with diffusers' forward on the same input.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2l_jax.errors import P2LError
from p2l_jax.model import load_model
from p2l_jax.operators import Inpainting, box_mask
from p2l_jax.pixel_model import PixelDiffusionModel
from p2l_jax.solvers import LDPSConfig, P2LConfig, solve
from p2l_jax.solvers.dps import DPSConfig

torch = pytest.importorskip("torch")
SIZE = 8


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    from pixel_fixtures import make_tiny_pixel

    return make_tiny_pixel(tmp_path_factory.mktemp("pixel") / "ddim", "attn", seed=1,
                           sample_size=SIZE)


@pytest.fixture(scope="module")
def model(pixel_dir):
    return load_model(pixel_dir)


def test_loads_as_pixel_model_with_identity_autoencoder(model):
    assert isinstance(model, PixelDiffusionModel)
    assert (model.vae_scale_factor, model.latent_channels, model.image_size) == (1, 3, SIZE)
    x = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.decode(x)), x)
    np.testing.assert_array_equal(np.asarray(model.encode(x)), x)
    assert model.text_embeddings(["", "a red square"]).shape == (2, 1, 1)


def test_loaded_eps_matches_diffusers_forward(pixel_dir, model):
    from diffusers import UNet2DModel

    t_unet = UNet2DModel.from_pretrained(pixel_dir / "unet").eval()
    x = np.random.default_rng(1).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    t = np.array([5, 900])
    with torch.no_grad():
        ref = t_unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda m, x, t: m.eps(x, t, jnp.ones((2, 1, 1))))(model, x, t)
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("config", [LDPSConfig(num_steps=3), DPSConfig(num_steps=3),
                                    P2LConfig(num_steps=3)], ids=["ldps", "dps", "p2l"])
def test_solvers_run_in_pixel_space(model, config):
    x = np.random.default_rng(2).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    op = Inpainting(box_mask(SIZE, 4))
    y = op.measure(jnp.asarray(x), jax.random.key(0), 0.05)
    result = solve(model, op, y, jax.random.key(1), config)
    assert result.images.shape == x.shape and result.latents.shape == x.shape
    assert np.all(np.isfinite(np.asarray(result.images)))
    assert result.residual.shape == (2, 3) and np.all(np.isfinite(np.asarray(result.residual)))
    # D = identity: the image is the final x_0 itself, and residual_final is measured on it
    np.testing.assert_array_equal(np.asarray(result.images), np.asarray(result.latents))
    r_final = jnp.sqrt(jnp.sum((y - op.forward(result.images)) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(np.asarray(result.residual_final), np.asarray(r_final),
                               rtol=1e-4)


def test_pixel_directory_without_scheduler_names_it(pixel_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pixel_dir, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(P2LError, match="scheduler"):
        load_model(broken)


def test_unsupported_pixel_unet_option_names_file_and_key(pixel_dir, tmp_path):
    broken = tmp_path / "fourier"
    shutil.copytree(pixel_dir, broken)
    cfg_file = broken / "unet" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "time_embedding_type": "fourier"}))
    with pytest.raises(P2LError, match="time_embedding_type") as err:
        load_model(broken)
    assert "unet/config.json" in str(err.value)
