"""Named Stable-Diffusion architectures with random parameters, for throughput work.

Throughput needs no trained weights: random parameters of the real architecture cost the same
FLOPs and memory. :data:`ARCHITECTURES` holds the configs of each name as diffusers /
transformers ``config.json`` dicts (the same dicts a checkpoint directory carries), so the
JAX networks and any PyTorch reference are built from one source:

* ``tiny``: the test-sized SD 1.x layout of ``tests/sd_fixtures.py`` (64 px native);
* ``sd15``: Stable Diffusion 1.5 (``runwayml/stable-diffusion-v1-5`` configs, 512 px);
* ``sd21``: Stable Diffusion 2.1 (``stabilityai/stable-diffusion-2-1`` configs, 768 px,
  v-prediction, linear projections, per-block heads, OpenCLIP ViT-H text encoder).

Parameters are drawn leaf by leaf onto the shapes ``nnx.eval_shape`` gives (no throwaway
module initialisation): kernels and embeddings ~ N(0, 1/fan_in), norm scales 1, biases 0.

Example::

    m = random_model("sd15", dtype="bfloat16", attention="xla", seed=0)
    eps = m.eps(z, 999, m.text_embeddings([""]))
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2l_jax.errors import P2LError

_SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
                 "clip_sample": False, "prediction_type": "epsilon"}
_SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
           "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
           "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
           "act_fn": "silu", "sample_size": 512}
_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
_SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4,
              "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
              "down_block_types": _SD_DOWN, "up_block_types": _SD_UP,
              "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
              "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
              "downsample_padding": 1, "act_fn": "silu"}
_CLIP_VOCAB = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5}

#: name -> {"unet", "vae", "text_encoder", "scheduler"} config dicts (diffusers format).
ARCHITECTURES: dict[str, dict[str, dict]] = {
    "tiny": {
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4,
                 "block_out_channels": [32, 64], "layers_per_block": 1,
                 "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                 "cross_attention_dim": 32, "attention_head_dim": 2, "norm_num_groups": 8},
        "vae": {**_SD_VAE, "layers_per_block": 1, "block_out_channels": [8, 16, 16, 16],
                "norm_num_groups": 8, "sample_size": 64},
        "text_encoder": {**_CLIP_VOCAB, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 2,
                         "hidden_act": "quick_gelu"},
        "scheduler": _SD_SCHEDULER,
    },
    "sd15": {
        "unet": _SD15_UNET,
        "vae": _SD_VAE,
        "text_encoder": {**_CLIP_VOCAB, "hidden_size": 768, "intermediate_size": 3072,
                         "num_hidden_layers": 12, "num_attention_heads": 12,
                         "hidden_act": "quick_gelu"},
        "scheduler": _SD_SCHEDULER,
    },
    "sd21": {
        "unet": {**_SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024,
                 "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
                 "upcast_attention": True},
        "vae": {**_SD_VAE, "sample_size": 768},
        "text_encoder": {**_CLIP_VOCAB, "hidden_size": 1024, "intermediate_size": 4096,
                         "num_hidden_layers": 23, "num_attention_heads": 16,
                         "hidden_act": "gelu"},
        "scheduler": {**_SD_SCHEDULER, "prediction_type": "v_prediction"},
    },
}


def architecture_configs(arch: str) -> dict:
    """``{"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}`` of ``arch``."""
    from p2l_jax.models.clip import CLIPTextConfig
    from p2l_jax.models.unet import UNetConfig
    from p2l_jax.models.vae import VAEConfig

    if arch not in ARCHITECTURES:
        raise P2LError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    dicts = ARCHITECTURES[arch]
    return {"unet": UNetConfig.from_dict(dicts["unet"], source=f"{arch}/unet"),
            "vae": VAEConfig.from_dict(dicts["vae"], source=f"{arch}/vae"),
            "text_encoder": CLIPTextConfig.from_dict(dicts["text_encoder"],
                                                     source=f"{arch}/text_encoder")}


def _random_leaf(rng: np.random.Generator, path: tuple, shape: tuple) -> np.ndarray:
    leaf = str(path[-1])
    if leaf == "scale":
        return np.ones(shape, np.float32)
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    fan_in = math.prod(shape[:-1]) if leaf == "kernel" else shape[-1]
    return rng.standard_normal(shape, np.float32) / np.float32(math.sqrt(max(fan_in, 1)))


def random_state(abstract_state: nnx.State, seed: int, dtype) -> nnx.State:
    """Fill an abstract (eval_shape) state with random values drawn on the host (numpy, so
    no per-shape device program is compiled), in flat-state order from ``seed``."""
    rng = np.random.default_rng(seed)
    filled = [(path, var.replace(jnp.asarray(_random_leaf(rng, path, tuple(var.shape)), dtype)))
              for path, var in nnx.to_flat_state(abstract_state)]
    return nnx.from_flat_state(filled)


def random_model(arch: str = "tiny", dtype: str = "float32", attention: str = "einsum",
                 seed: int = 0):
    """A :class:`~p2l_jax.model.LatentDiffusionModel` of architecture ``arch`` with random
    parameters (see the module docstring); the tokenizer is the packaged CLIP tokenizer."""
    from p2l_jax.model import DTYPES, LatentDiffusionModel, _Static, abstract_networks
    from p2l_jax.models.attention import check_attention_impl
    from p2l_jax.schedule import ScheduleConfig
    from p2l_jax.tokenizer import default_tokenizer_dir, load_tokenizer

    if dtype not in DTYPES:
        raise P2LError(f"option dtype={dtype!r} is not one of {sorted(DTYPES)}")
    check_attention_impl(attention)
    jdtype = DTYPES[dtype]
    configs = architecture_configs(arch)
    abstract = abstract_networks(configs, jdtype, attention)
    params = {name: random_state(state, seed + i, jdtype)
              for i, (name, (_, state)) in enumerate(sorted(abstract.items()))}
    scheduler_config = dict(ARCHITECTURES[arch]["scheduler"])
    schedule = ScheduleConfig.from_dict(scheduler_config)
    static = _Static(
        graphdefs={k: g for k, (g, _) in abstract.items()},
        unet_config=configs["unet"], vae_config=configs["vae"],
        text_config=configs["text_encoder"], schedule=schedule,
        scheduler_config=scheduler_config, tokenizer=load_tokenizer(default_tokenizer_dir()),
        dtype=jdtype, attention=attention, path=None)
    return LatentDiffusionModel(params, jnp.asarray(schedule.alphas_cumprod()), static)
