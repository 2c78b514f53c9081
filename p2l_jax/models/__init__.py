"""Flax NNX networks of Stable Diffusion, named and laid out like their diffusers originals.

- :mod:`p2l_jax.models.attention`: the one attention function (implementations by name).
- :mod:`p2l_jax.models.layers`: norms, resnet, samplers, attention and transformer layers.
- :mod:`p2l_jax.models.blocks`: down / mid / up resolution blocks shared by UNet and VAE.
- :mod:`p2l_jax.models.unet`: ``UNetConfig``, ``UNet2DConditionModel``.
- :mod:`p2l_jax.models.vae`: ``VAEConfig``, ``AutoencoderKL``.
- :mod:`p2l_jax.models.clip`: the CLIP text encoder.

Constructors take ``(config, *, dtype, param_dtype, attention_impl, rngs)`` and are meant to be
called under ``nnx.eval_shape`` (parameters come from ``p2l_jax.weights``).
"""

from p2l_jax.models.attention import ATTENTION_IMPLEMENTATIONS, attention
from p2l_jax.models.unet import UNet2DConditionModel, UNetConfig
from p2l_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = ["ATTENTION_IMPLEMENTATIONS", "attention", "UNet2DConditionModel", "UNetConfig",
           "AutoencoderKL", "VAEConfig"]
