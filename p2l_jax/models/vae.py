"""AutoencoderKL (the Stable Diffusion VAE) in Flax NNX, NHWC.

Encoder E and decoder D between images x in [-1, 1] (B, H, W, 3) and UNSCALED latents
(B, H/f, W/f, latent_channels), f = 2 ** (len(block_out_channels) - 1):

    moments      = quant_conv(encoder(x))          (B, h, w, 2 L)
    mean, logvar = split(moments);  logvar clipped to [-30, 20]  (diffusers' posterior)
    x_hat        = decoder(post_quant_conv(z))

encoder: conv_in -> down blocks (resnets, stride-2 conv padded right/bottom) -> mid block
(resnet, single-head self attention with group norm and residual, resnet) -> GroupNorm, SiLU,
conv_out; the decoder mirrors it with nearest-x2 upsamplers. The diffusion model works on
scaled latents s * z with s = ``config.scaling_factor`` (0.18215 for SD); this module does not
apply s (``p2l_jax.model`` does).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> cfg = VAEConfig(block_out_channels=(16, 32), norm_num_groups=8,
    ...                 down_block_types=("DownEncoderBlock2D",) * 2,
    ...                 up_block_types=("UpDecoderBlock2D",) * 2)
    >>> vae = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    >>> mean, logvar = vae.encode(jnp.zeros((1, 16, 12, 3)))
    >>> mean.shape, vae.decode(mean).shape
    ((1, 8, 6, 4), (1, 16, 12, 3))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.models.blocks import DownBlock, MidBlock, UpBlock
from p2l_jax.models.configs import check_block_counts, config_from_dict
from p2l_jax.models.layers import Attention, Build, Downsample2D, ResnetBlock2D, Upsample2D

_EPS = 1e-6  # diffusers hard-codes eps=1e-6 for every VAE norm
_UNSUPPORTED = {"shift_factor": None, "latents_mean": None, "latents_std": None,
                "act_fn": ("silu", "swish"), "norm_type": "group"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL options of SD 1.x / 2.x VAEs (diffusers names and defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: Any = None

    def __post_init__(self):
        check_block_counts(self)
        for key, known in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
            for name in getattr(self, key):
                if name != known:
                    raise P2LError(f"{key}: unknown block type {name!r} (supported: {known!r})")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise P2LError(f"block_out_channels {ch} must be divisible by norm_num_groups "
                               f"{self.norm_num_groups}")

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each axis."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "vae/config.json"):
        """Parse a diffusers AutoencoderKL ``config.json`` dict (unknown keys are ignored)."""
        return config_from_dict(cls, config, source=source, unsupported=_UNSUPPORTED)


def _mid_block(b: Build, ch: int, groups: int, add_attention: bool) -> MidBlock:
    """UNetMidBlock2D: resnet, single-head self attention (group norm, residual), resnet."""
    resnets = [ResnetBlock2D(b, ch, ch, None, groups, _EPS) for _ in range(2)]
    attn = [Attention(b, ch, heads=1, dim_head=ch, qkv_bias=True, norm_groups=groups, eps=_EPS,
                      residual_connection=True)] if add_attention else None
    return MidBlock(resnets, attn)


class Encoder(nnx.Module):
    """x (B, H, W, C_in) -> moments (B, H/f, W/f, 2 L) before quant_conv."""

    def __init__(self, b: Build, c: VAEConfig):
        ch, n, g = c.block_out_channels, len(c.block_out_channels), c.norm_num_groups
        self.conv_in = b.conv(c.in_channels, ch[0])
        self.down_blocks = nnx.List([
            DownBlock([ResnetBlock2D(b, ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], None, g,
                                     _EPS) for j in range(c.layers_per_block)],
                      None, Downsample2D(b, ch[i], padding=0) if i < n - 1 else None)
            for i in range(n)])
        self.mid_block = _mid_block(b, ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = b.group_norm(g, ch[-1], _EPS)
        self.conv_out = b.conv(ch[-1], 2 * c.latent_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """z (B, h, w, L) after post_quant_conv -> image (B, f h, f w, C_out)."""

    def __init__(self, b: Build, c: VAEConfig):
        ch, n, g = c.block_out_channels, len(c.block_out_channels), c.norm_num_groups
        rev = ch[::-1]
        self.conv_in = b.conv(c.latent_channels, ch[-1])
        self.mid_block = _mid_block(b, ch[-1], g, c.mid_block_add_attention)
        self.up_blocks = nnx.List([
            UpBlock([ResnetBlock2D(b, rev[max(i - 1, 0)] if j == 0 else rev[i], rev[i], None, g,
                                   _EPS) for j in range(c.layers_per_block + 1)],
                    None, Upsample2D(b, rev[i]) if i < n - 1 else None)
            for i in range(n)])
        self.conv_norm_out = b.group_norm(g, ch[0], _EPS)
        self.conv_out = b.conv(ch[0], c.out_channels)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    """The KL autoencoder: ``encode(x) -> (mean, logvar)``, ``decode(z) -> x`` (unscaled z).

    Computes in ``dtype`` (norms and attention softmax in float32); returns ``dtype``.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "einsum", rngs: nnx.Rngs):
        b = Build(dtype, param_dtype, attention_impl, rngs)
        self.config, self.dtype = config, dtype
        self.scaling_factor = config.scaling_factor
        lat = config.latent_channels
        self.encoder = Encoder(b, config)
        self.decoder = Decoder(b, config)
        self.quant_conv = b.conv(2 * lat, 2 * lat, kernel=1) if config.use_quant_conv else None
        self.post_quant_conv = b.conv(lat, lat, kernel=1) if config.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, C_in) -> posterior mean and log-variance (B, H/f, W/f, L)."""
        c = self.config
        if x.ndim != 4 or x.shape[-1] != c.in_channels or x.shape[1] % c.downscale_factor \
                or x.shape[2] % c.downscale_factor:
            raise P2LError(f"VAE encode expects NHWC images with {c.in_channels} channels and "
                           f"H, W divisible by {c.downscale_factor}; got {tuple(x.shape)}")
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, L) -> images (B, f h, f w, C_out)."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise P2LError(f"VAE decode expects NHWC latents with "
                           f"{self.config.latent_channels} channels; got {tuple(z.shape)}")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
