"""A pixel-space diffusion model (diffusers ``UNet2DModel``) behind the latent model's interface.

``load_model(path)`` dispatches here when ``unet/config.json`` names a ``UNet2DModel`` (a
``DDPMPipeline`` / ``DDIMPipeline`` directory: ``model_index.json``, ``unet/``, ``scheduler/``).
The returned :class:`PixelDiffusionModel` has the methods the solvers call, with the
autoencoder replaced by the identity and no text:

    D(z) = z,  E(x) = x            (so "latents" are images: vae_scale_factor 1, 3 channels)
    eps(z_t, t, C) = eps_theta(z_t, t)   (C is accepted and ignored)
    text_embeddings(prompts) = zeros (B, 1, 1)

so every solver of the one driver runs on it unchanged: LDPS becomes pixel-space DPS with the
residual r = ||y - A x0hat|| and its gradient through the UNet alone, and P2L's prompt
tuning has nothing to tune (its gradient in C is zero). Like the latent model it is a JAX
pytree (parameter arrays are the leaves) that can be passed into jitted functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.layout import CONVERTED_MARKER
from p2l_jax.model_base import DiffusionModelBase
from p2l_jax.schedule import ScheduleConfig, model_output_to_eps

#: ``unet/config.json`` ``_class_name`` values that load as a pixel-space model.
PIXEL_UNET_CLASSES = ("UNet2DModel",)


@dataclasses.dataclass(eq=False, frozen=True)
class _PixelStatic:
    """Everything about a pixel model that is not an array. Hashed by identity."""

    graphdef: Any
    unet_config: Any
    schedule: ScheduleConfig
    scheduler_config: dict
    dtype: Any
    attention: str
    path: str | None


@jax.tree_util.register_pytree_node_class
class PixelDiffusionModel(DiffusionModelBase):
    """An unconditional pixel-space diffusion model with the latent model's interface.

    Attributes:
      params: ``{"unet": State}``.
      alphas_cumprod: alpha_bar_t for t = 0..T-1 (float32), from the scheduler config.
    """

    # -- static facts beyond DiffusionModelBase's (names as LatentDiffusionModel's)
    vae_config = text_config = tokenizer = None  # no autoencoder, no text
    scaling_factor = 1.0
    vae_scale_factor = 1
    embedding_dim = 1

    @property
    def latent_channels(self) -> int:
        """Channels of the diffused variable: the image's."""
        return int(self._static.unet_config.in_channels)

    @property
    def sample_size(self) -> int:
        """Native image side (the UNet config's ``sample_size``)."""
        size = self._static.unet_config.sample_size
        return int(size[0] if isinstance(size, tuple) else size)

    @property
    def image_size(self) -> int:
        return self.sample_size

    # -- the interface the solvers use
    def text_embeddings(self, prompts: str | Sequence[str]) -> jax.Array:
        """A placeholder C = zeros (B, 1, 1): the prior is unconditional, so C is ignored."""
        n = 1 if isinstance(prompts, str) else len(prompts)
        return jnp.zeros((n, 1, 1), jnp.float32)

    def eps(self, z_t: jax.Array, t, C: jax.Array | None = None) -> jax.Array:
        """eps_theta(x_t, t), NHWC float32, whatever the checkpoint's ``prediction_type``.

        ``C`` is ignored (unconditional prior); ``t`` an int scalar or (B,) vector.
        """
        del C
        z_t = jnp.asarray(z_t, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), z_t.shape[:1])
        unet = nnx.merge(self._static.graphdef, self.params["unet"])
        out = unet(z_t.astype(self.dtype), t).astype(jnp.float32)
        if self.schedule.prediction_type == "epsilon":
            return out
        ab_t = self.alphas_cumprod[t][:, None, None, None]
        return model_output_to_eps(out, z_t, ab_t, self.schedule.prediction_type)

    def decode(self, z: jax.Array) -> jax.Array:
        """D = identity: the diffused variable is the image (float32)."""
        return jnp.asarray(z, jnp.float32)

    def encode(self, x: jax.Array) -> jax.Array:
        """E = identity (float32)."""
        return jnp.asarray(x, jnp.float32)

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
        return (f"PixelDiffusionModel(path={self.path!r}, params={n / 1e6:.2f}M, "
                f"dtype={jnp.dtype(self.dtype).name}, image_size={self.image_size})")


def is_pixel_model(path: Path, read_json) -> bool:
    """True if ``path/unet/config.json`` names a pixel-space UNet class."""
    file = path / "unet" / "config.json"
    return file.is_file() and read_json(file).get("_class_name") in PIXEL_UNET_CLASSES


def load_pixel_model(path: Path, jdtype, attention: str, read_json, scheduler_file,
                     allow_pickle: bool = False) -> PixelDiffusionModel:
    """Build the UNet2DModel under ``nnx.eval_shape`` and fill it from ``path/unet``.

    ``read_json`` and ``scheduler_file`` are :mod:`p2l_jax.model`'s helpers (same messages).
    """
    from p2l_jax.models.unet_pixel import UNet2DConfig, UNet2DModel
    from p2l_jax.weights import normalize_keys, read_component_tensors, state_from_torch

    for sub in ("unet", "scheduler"):
        if not (path / sub).is_dir():
            raise P2LError(f"{path} is missing component folder(s): {sub}")
    if (path / CONVERTED_MARKER).is_file():
        raise P2LError(f"{path}: converted (orbax) directories of pixel-space models are not "
                       "supported; load the diffusers directory")
    source = str(path / "unet" / "config.json")
    config = UNet2DConfig.from_dict(read_json(path / "unet" / "config.json"), source=source)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet2DModel(
        config, dtype=jdtype, param_dtype=jdtype, attention_impl=attention, rngs=nnx.Rngs(0))))
    tensors = read_component_tensors(path / "unet", allow_pickle=allow_pickle)
    # Old DDPM checkpoints name the self attention query/key/value/proj_attn, as old VAEs do.
    tensors = normalize_keys(tensors, "vae")
    params = {"unet": state_from_torch(abstract, tensors, "unet", dtype=jdtype,
                                       source=str(path / "unet"))}
    scheduler_config = read_json(scheduler_file(path))
    schedule = ScheduleConfig.from_dict(scheduler_config)
    static = _PixelStatic(graphdef=graphdef, unet_config=config, schedule=schedule,
                          scheduler_config=scheduler_config, dtype=jdtype, attention=attention,
                          path=str(path))
    return PixelDiffusionModel(params, jnp.asarray(schedule.alphas_cumprod()), static)
