"""UNet2DModel (diffusers' unconditional UNet, as in DDPM / DDIM pipelines) in Flax NNX, NHWC.

The pixel-space noise predictor eps_theta(x_t, t), with no text and no cross attention:

    temb = linear_2(silu(linear_1(sinusoid(t))))            (time_embedding, as the SD UNet)
    h    = conv_in(x_t);  skips = [h]
    down blocks:  resnet [-> self attention] per layer, stride-2 conv;  skips += outputs
    mid block:    h = resnet(attention(resnet(h)))           (attention optional)
    up blocks:    each resnet consumes concat(h, skips.pop()) [-> self attention]; upsample
    eps  = conv_out(silu(conv_norm_out(h)))

The self attention of ``AttnDownBlock2D`` / ``AttnUpBlock2D`` / ``UNetMidBlock2D`` is diffusers'
``Attention`` with its own group norm and a residual connection:
out = x + to_out.0(softmax(q k^T / sqrt(d)) v), q, k, v = to_q/to_k/to_v(group_norm(x)).

Naming quirk, opposite to the conditional UNet: here ``attention_head_dim`` is the size of each
head (heads = channels // attention_head_dim); ``None`` means one head spanning the channels.
diffusers does not pass ``upsample_size`` in this model, so every spatial side must be
divisible by 2 ** (number of blocks - 1).

Example (a tiny configuration; parameters come from the loader, here random):
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> cfg = UNet2DConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    ...                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    >>> UNet2DModel(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 6, 3)), 10).shape
    (1, 8, 6, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.models.blocks import MidBlock
from p2l_jax.models.configs import check_block_counts, config_from_dict
from p2l_jax.models.layers import Attention, Build, ResnetBlock2D
from p2l_jax.models.unet import (TimestepEmbedding, build_down_blocks, build_up_blocks,
                                 timestep_embedding, timestep_vector, unet_forward)

# block type -> has self attention
DOWN_BLOCK_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
UP_BLOCK_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)

# config keys whose non-default values would change the network in ways not implemented here
_UNSUPPORTED = {
    "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "mid_block_scale_factor": (1, 1.0),
    "downsample_type": "conv", "upsample_type": "conv", "act_fn": ("silu", "swish"),
}


def _check_type(name, known, key: str) -> None:
    if name not in known:
        raise P2LError(f"{key}: unknown block type {name!r} (supported: "
                       f"{', '.join(repr(k) for k in known)})")


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """The options of a diffusers ``UNet2DModel`` ``config.json`` this network implements.

    Defaults are diffusers' own. ``attn_norm_num_groups`` sets the group norm of the mid
    block's attention only (None: ``norm_num_groups``, diffusers' rule for the default
    time-embedding mode); the attention of the down/up blocks always uses ``norm_num_groups``. ``dropout`` is accepted and ignored
    (inference only; the training script here uses none).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                         "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                       "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    add_attention: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    dropout: float = 0.0
    sample_size: Any = None

    def __post_init__(self):
        check_block_counts(self)
        for t in self.down_block_types:
            _check_type(t, DOWN_BLOCK_TYPES, "down_block_types")
        for t in self.up_block_types:
            _check_type(t, UP_BLOCK_TYPES, "up_block_types")
        _check_type(self.mid_block_type, MID_BLOCK_TYPES, "mid_block_type")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise P2LError(f"layers_per_block must be a positive int, got "
                           f"{self.layers_per_block!r}")
        for ch, kind in zip(self.block_out_channels, self.down_block_types):
            if ch % self.norm_num_groups or ch % (self.attn_norm_num_groups or 1):
                raise P2LError(f"block_out_channels {ch} must be divisible by norm_num_groups "
                               f"{self.norm_num_groups} (and attn_norm_num_groups)")
            # heads = ch // head size (floor, as diffusers); zero heads would be no attention
            if DOWN_BLOCK_TYPES[kind] and (self.attention_head_dim or ch) > ch:
                raise P2LError(f"attention_head_dim {self.attention_head_dim} (the head size) "
                               f"exceeds the {ch} channels of an attention block")

    @property
    def downscale_factor(self) -> int:
        """Spatial sides must be multiples of this (no upsample_size in diffusers' forward)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "unet/config.json"):
        """Parse a diffusers ``UNet2DModel`` ``config.json`` dict (unknown keys are ignored)."""
        return config_from_dict(cls, config, source=source, unsupported=_UNSUPPORTED)


class UNet2DModel(nnx.Module):
    """eps_theta(sample NHWC, timesteps (B,) or scalar) -> NHWC, computed in ``dtype``."""

    def __init__(self, config: UNet2DConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "einsum", rngs: nnx.Rngs):
        b = Build(dtype, param_dtype, attention_impl, rngs)
        c, n = config, len(config.block_out_channels)
        self.config, self.dtype = c, dtype
        ch, layers = c.block_out_channels, c.layers_per_block
        temb_dim = 4 * ch[0]
        groups, eps = c.norm_num_groups, c.norm_eps

        def resnet(cin, cout):
            return ResnetBlock2D(b, cin, cout, temb_dim, groups, eps)

        def attention(channels, level=None, norm_groups=groups):  # alike at every level
            head = c.attention_head_dim or channels
            return Attention(b, channels, channels // head, head, qkv_bias=True,
                             norm_groups=norm_groups, eps=eps, residual_connection=True)

        self.conv_in = b.conv(c.in_channels, ch[0])
        self.time_embedding = TimestepEmbedding(b, ch[0], temb_dim)

        self.down_blocks = build_down_blocks(
            b, ch, (layers,) * n, [DOWN_BLOCK_TYPES[k] for k in c.down_block_types],
            c.downsample_padding, resnet, attention)

        self.mid_block = (MidBlock([resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])],
                                   [attention(ch[-1], norm_groups=c.attn_norm_num_groups
                                              or groups)]
                                   if c.add_attention else None)
                          if c.mid_block_type is not None else None)

        self.up_blocks = build_up_blocks(b, ch, (layers,) * n,
                                         [UP_BLOCK_TYPES[k] for k in c.up_block_types],
                                         resnet, attention)

        self.conv_norm_out = b.group_norm(groups, ch[0], eps)
        self.conv_out = b.conv(ch[0], c.out_channels)

    def __call__(self, sample: jax.Array, timesteps) -> jax.Array:
        c = self.config
        f = c.downscale_factor
        if (sample.ndim != 4 or sample.shape[-1] != c.in_channels
                or sample.shape[1] % f or sample.shape[2] % f):
            raise P2LError(f"UNet2DModel sample must be NHWC with {c.in_channels} channels and "
                           f"sides divisible by {f}, got shape {tuple(sample.shape)}")
        t = timestep_vector(timesteps, sample.shape[0])
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(emb.astype(self.dtype))
        # sides divisible by 2 ** (blocks - 1) (checked above), so each upsampler's target
        # size is exactly 2x: diffusers' forward for this model, which passes no size
        return unet_forward(self, sample, temb)
