"""UNet2DConditionModel (Stable Diffusion 1.x / 2.x) in Flax NNX, NHWC.

The noise predictor eps_theta(z_t, t, C):

    temb = linear_2(silu(linear_1(sinusoid(t))))           (time_embedding)
    h    = conv_in(z_t);  skips = [h]
    down blocks:  h, s = block(h, temb, C);  skips += s   (resnets [+ transformers], downsample)
    mid block:    h = resnet(transformer(resnet(h)))
    up blocks:    each resnet consumes concat(h, skips.pop()); then upsample
    eps  = conv_out(silu(conv_norm_out(h)))

with sinusoid(t)_k = sin(t w_k), cos(t w_k), w_k = exp(-ln(10000) k / (half - freq_shift)),
k < half = C0 / 2 (cos first when ``flip_sin_to_cos``).

Note the diffusers naming quirk: for these SD blocks ``attention_head_dim`` is the number of
attention HEADS of each block (the head size is channels // heads).

Example (a tiny configuration; parameters come from the loader, here random):
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> cfg = UNetConfig(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
    ...                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ...                  attention_head_dim=2, layers_per_block=1)
    >>> unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    >>> unet(jnp.zeros((1, 8, 6, 4)), 10, jnp.zeros((1, 5, 32))).shape
    (1, 8, 6, 4)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.models.blocks import DownBlock, MidBlock, UpBlock
from p2l_jax.models.configs import check_block_counts, config_from_dict, per_block
from p2l_jax.models.layers import (Build, Downsample2D, ResnetBlock2D, Transformer2DModel,
                                   Upsample2D)

# block type -> has cross attention (diffusers also accepts a "UNetRes" prefix)
DOWN_BLOCK_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UP_BLOCK_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# config keys whose non-default values would change the network in ways not implemented here
_UNSUPPORTED = {
    "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": (1, 1.0), "mid_block_scale_factor": (1, 1.0),
    "num_attention_heads": None, "dual_cross_attention": False, "only_cross_attention": False,
    "mid_block_only_cross_attention": (None, False), "attention_type": "default",
    "cross_attention_norm": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "class_embeddings_concat": False, "reverse_transformer_layers_per_block": None,
    "act_fn": ("silu", "swish"),
}


def _block_type(name: str, known, key: str) -> str:
    name = name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name
    if name not in known:
        raise P2LError(f"{key}: unknown block type {name!r} (supported: "
                       f"{', '.join(repr(k) for k in known)})")
    return name


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet2DConditionModel options that SD 1.x / 2.x checkpoints use (diffusers names).

    Per-block options (``layers_per_block``, ``attention_head_dim`` = heads per block,
    ``cross_attention_dim``, ``transformer_layers_per_block``) take an int or one value per
    down block; the up path uses them reversed, the mid block uses the last.
    ``upcast_attention`` is accepted for completeness: attention logits and softmax are always
    float32 here, which is what the flag asks for.
    """

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    sample_size: Any = None

    def __post_init__(self):
        check_block_counts(self)
        object.__setattr__(self, "down_block_types", tuple(
            _block_type(t, DOWN_BLOCK_TYPES, "down_block_types") for t in self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(
            _block_type(t, UP_BLOCK_TYPES, "up_block_types") for t in self.up_block_types))
        _block_type(self.mid_block_type, MID_BLOCK_TYPES, "mid_block_type")
        for key in ("layers_per_block", "attention_head_dim", "cross_attention_dim",
                    "transformer_layers_per_block"):
            self.per_block(key)
        for ch, heads in zip(self.block_out_channels, self.per_block("attention_head_dim")):
            if ch % self.norm_num_groups or ch % heads:
                raise P2LError(f"block_out_channels {ch} must be divisible by norm_num_groups "
                               f"{self.norm_num_groups} and attention_head_dim (heads) {heads}")

    def per_block(self, key: str) -> tuple:
        """The option ``key`` as one value per down block."""
        return per_block(getattr(self, key), len(self.block_out_channels), key)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "unet/config.json"):
        """Parse a diffusers UNet ``config.json`` dict (unknown keys are ignored)."""
        return config_from_dict(cls, config, source=source, unsupported=_UNSUPPORTED)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim) in float32 (diffusers ``get_timestep_embedding``)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                    / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    """temb = linear_2(silu(linear_1(e)))."""

    def __init__(self, b: Build, in_dim: int, dim: int):
        self.linear_1 = b.linear(in_dim, dim)
        self.linear_2 = b.linear(dim, dim)

    def __call__(self, e: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(e)))


# ---- the UNet skeleton shared with the pixel-space UNet2DModel (models/unet_pixel.py) -------
def build_down_blocks(b: Build, channels, layers, has_attention, downsample_padding: int,
                      resnet, attention) -> nnx.List:
    """Down block i: ``layers[i]`` resnets (channels[i - 1] -> channels[i] first), as many
    attentions ``attention(channels[i], i)`` if ``has_attention[i]``, and a stride-2
    downsampler except on the last block."""
    ch, n, blocks = channels, len(channels), []
    for i in range(n):
        cin = ch[max(i - 1, 0)]
        blocks.append(DownBlock(
            [resnet(cin if j == 0 else ch[i], ch[i]) for j in range(layers[i])],
            [attention(ch[i], i) for _ in range(layers[i])] if has_attention[i] else None,
            Downsample2D(b, ch[i], downsample_padding) if i < n - 1 else None))
    return nnx.List(blocks)


def build_up_blocks(b: Build, channels, layers, has_attention, resnet, attention) -> nnx.List:
    """Up block i mirrors down block r = n - 1 - i: ``layers[r] + 1`` resnets, each taking h
    concatenated with one skip state (the last one the skip of the block below: channels
    channels[r - 1]), as many attentions ``attention(channels[r], r)`` if
    ``has_attention[i]``, and a nearest-x2 upsampler except on the last block."""
    ch, n, blocks = channels, len(channels), []
    for i in range(n):
        r = n - 1 - i  # the down block this up block mirrors
        prev, out, skip_in = ch[min(r + 1, n - 1)], ch[r], ch[max(r - 1, 0)]
        num = layers[r] + 1
        blocks.append(UpBlock(
            [resnet((prev if j == 0 else out) + (skip_in if j == num - 1 else out), out)
             for j in range(num)],
            [attention(out, r) for _ in range(num)] if has_attention[i] else None,
            Upsample2D(b, out) if i < n - 1 else None))
    return nnx.List(blocks)


def timestep_vector(timesteps, batch: int) -> jax.Array:
    """Timesteps as (B,): a scalar or a (1,) / (B,) vector (P2LError otherwise)."""
    t = jnp.asarray(timesteps)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise P2LError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
    return jnp.broadcast_to(t.reshape(-1), (batch,))


def unet_forward(net: nnx.Module, sample: jax.Array, temb: jax.Array, context=None):
    """conv_in, the down blocks (collecting skips), the mid block, the up blocks (each resnet
    consuming one skip, last in first out; each upsampler to the next skip's size, as
    diffusers' ``upsample_size``), then conv_out(silu(conv_norm_out(h)))."""
    h = net.conv_in(sample.astype(net.dtype))
    skips = [h]
    for block in net.down_blocks:
        h, states = block(h, temb, context)
        skips.extend(states)
    if net.mid_block is not None:
        h = net.mid_block(h, temb, context)
    for block in net.up_blocks:
        mine, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        size = tuple(skips[-1].shape[1:3]) if skips else None
        h = block(h, mine, temb, context, size)
    return net.conv_out(jax.nn.silu(net.conv_norm_out(h)))


class UNet2DConditionModel(nnx.Module):
    """eps_theta(sample NHWC, timesteps (B,) or scalar, encoder_hidden_states (B, L, d)) -> NHWC.

    Computes in ``dtype`` (norms, softmax, attention logits in float32); returns ``dtype``.
    """

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "einsum", rngs: nnx.Rngs):
        b = Build(dtype, param_dtype, attention_impl, rngs)
        c, n = config, len(config.block_out_channels)
        self.config, self.dtype = c, dtype
        ch = c.block_out_channels
        temb_dim = 4 * ch[0]
        groups, eps = c.norm_num_groups, c.norm_eps
        layers, heads = c.per_block("layers_per_block"), c.per_block("attention_head_dim")
        cross = c.per_block("cross_attention_dim")
        depth = c.per_block("transformer_layers_per_block")

        def resnet(cin, cout):
            return ResnetBlock2D(b, cin, cout, temb_dim, groups, eps)

        def transformer(channels, i):
            return Transformer2DModel(b, heads[i], channels // heads[i], channels, depth[i],
                                      cross[i], groups, c.use_linear_projection)

        self.conv_in = b.conv(c.in_channels, ch[0])
        self.time_embedding = TimestepEmbedding(b, ch[0], temb_dim)

        self.down_blocks = build_down_blocks(
            b, ch, layers, [DOWN_BLOCK_TYPES[k] for k in c.down_block_types],
            c.downsample_padding, resnet, transformer)

        self.mid_block = (MidBlock([resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])],
                                   [transformer(ch[-1], n - 1)])
                          if c.mid_block_type is not None else None)

        self.up_blocks = build_up_blocks(b, ch, layers,
                                         [UP_BLOCK_TYPES[k] for k in c.up_block_types],
                                         resnet, transformer)

        self.conv_norm_out = b.group_norm(groups, ch[0], eps)
        self.conv_out = b.conv(ch[0], c.out_channels)

    def __call__(self, sample: jax.Array, timesteps, encoder_hidden_states: jax.Array):
        c = self.config
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise P2LError(f"UNet sample must be NHWC with {c.in_channels} channels, got shape "
                           f"{tuple(sample.shape)}")
        t = timestep_vector(timesteps, sample.shape[0])
        cross = c.per_block("cross_attention_dim")[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cross:
            raise P2LError(f"encoder_hidden_states must be (B, L, {cross}) "
                           f"(cross_attention_dim), got {tuple(encoder_hidden_states.shape)}")
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(emb.astype(self.dtype))
        return unet_forward(self, sample, temb, encoder_hidden_states.astype(self.dtype))
