"""Layers shared by the UNet and the VAE, named after their diffusers counterparts.

Attribute names mirror the diffusers PyTorch state-dict keys (``norm1``, ``conv1``,
``time_emb_proj``, ``to_q``, ``to_out.0``, ``ff.net.0.proj``, ...), so the generic loader maps
``a.b.0.c.weight`` to the NNX path ``('a', 'b', 0, 'c', 'kernel')``. Torch modules without
parameters that sit inside a ``ModuleList`` (Dropout in ``to_out`` and ``ff.net``) keep their
slot here as :class:`Identity` so that list indices line up.

All activations are NHWC (images, feature maps) or (B, L, C) (token sequences). Norms are
computed in float32 and cast back to the activation dtype; attention logits and softmax are
float32 (see :mod:`p2l_jax.models.attention`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.models.attention import attention, check_attention_impl
from p2l_jax.models.conv import conv2d, upsample2x_conv2d


@dataclasses.dataclass(frozen=True)
class Build:
    """What every layer constructor needs: compute/parameter dtypes, attention kernel, rngs.

    Used only while constructing (normally under ``nnx.eval_shape``); never stored on a module.
    """

    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str
    rngs: nnx.Rngs

    def __post_init__(self):
        check_attention_impl(self.attention_impl)

    def conv(self, cin: int, cout: int, kernel: int = 3, stride: int = 1,
             padding: tuple[tuple[int, int], tuple[int, int]] | None = None) -> "Conv2d":
        """Conv2d; ``padding`` defaults to torch's symmetric (kernel - 1) // 2."""
        p = (kernel - 1) // 2
        return Conv2d(cin, cout, kernel, stride,
                      padding if padding is not None else ((p, p), (p, p)),
                      dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

    def linear(self, cin: int, cout: int, bias: bool = True) -> nnx.Linear:
        return nnx.Linear(cin, cout, use_bias=bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, rngs=self.rngs)

    def group_norm(self, groups: int, channels: int, eps: float) -> "GroupNorm":
        return GroupNorm(groups, channels, eps, param_dtype=self.param_dtype)

    def layer_norm(self, features: int, eps: float = 1e-5) -> "LayerNorm":
        return LayerNorm(features, eps, param_dtype=self.param_dtype)


class Conv2d(nnx.Module):
    """torch ``Conv2d`` on NHWC maps: y = conv2d(x, kernel) + bias with kernel (k, k, I, O),
    computed in ``dtype`` by :func:`p2l_jax.models.conv.conv2d` (plain XLA convolution on
    accelerators; on the CPU the forms XLA:CPU runs with its fast kernel, see that module)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int,
                 padding: tuple[tuple[int, int], tuple[int, int]], *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.strides, self.padding, self.dtype = (stride, stride), padding, dtype
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, cin, cout), param_dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.strides,
                   self.padding)
        return y + self.bias[...].astype(self.dtype)

    def upsampled(self, x: jax.Array) -> jax.Array:
        """self(nearest_resize(x, 2x)) for this 3x3, stride 1, padding 1 conv, computed on the
        small map (:func:`p2l_jax.models.conv.upsample2x_conv2d`)."""
        y = upsample2x_conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class Identity(nnx.Module):
    """Parameter-free slot (torch Dropout at inference) that keeps ModuleList indices aligned."""

    def __call__(self, x):
        return x


class GroupNorm(nnx.Module):
    """Group normalization over the last (channel) axis, computed in float32.

    For x with channels split into G groups, per sample b and group g:
        y = (x - mean_{b,g}) / sqrt(var_{b,g} + eps) * scale + bias
    with mean/var (biased) over all spatial positions and the C/G channels of the group.
    The input is cast to float32 and the output back to the input dtype.

    Both moments are summed per channel over the spatial axes first, then over the channels
    of each group: sum_{b,g} = sum_{c in g} (sum_{positions} x[b, ..., c]). On the VAE's
    large maps XLA:CPU runs these per-channel reductions, and their gradients, faster than one
    reduction over (positions, channels of a group) of the grouped view (B, HW, G, C/G)
    (measured together with the up-sampler change in docs/BENCHMARKS.md); the result differs
    by float rounding only.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float, *,
                 param_dtype=jnp.float32):
        if num_channels % num_groups:
            raise P2LError(f"GroupNorm: {num_channels} channels are not divisible into "
                           f"norm_num_groups={num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        b, c, groups = x.shape[0], x.shape[-1], self.num_groups
        spatial = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (c // groups)

        def group_mean(per_channel: jax.Array) -> jax.Array:
            """(B, C) per-channel sums -> each channel's group mean, broadcastable to x."""
            mean = per_channel.reshape(b, groups, c // groups).sum(-1) / count
            return jnp.repeat(mean, c // groups, axis=-1).reshape(b, *(1,) * len(spatial), c)

        centred = x32 - group_mean(x32.sum(spatial))
        var = group_mean(jnp.square(centred).sum(spatial))
        y = centred * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer normalization over the last axis, in float32:
    y = (x - mean) / sqrt(var + eps) * scale + bias."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (pre-norm, "default" time embedding, SiLU):

        h   = conv1(silu(norm1(x)))
        h   = h + time_emb_proj(silu(temb))[:, None, None, :]        (if temb_channels)
        h   = conv2(silu(norm2(h)))                                   (dropout: identity)
        out = (conv_shortcut(x) if C_in != C_out else x) + h
    """

    def __init__(self, b: Build, in_channels: int, out_channels: int,
                 temb_channels: int | None, groups: int, eps: float):
        self.dtype = b.dtype
        self.norm1 = b.group_norm(groups, in_channels, eps)
        self.conv1 = b.conv(in_channels, out_channels)
        self.time_emb_proj = b.linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = b.group_norm(groups, out_channels, eps)
        self.conv2 = b.conv(out_channels, out_channels)
        self.conv_shortcut = (b.conv(in_channels, out_channels, kernel=1)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb.astype(self.dtype)))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=1``: symmetric (UNet); ``padding=0``: pad right and bottom
    by one then convolve unpadded, as diffusers does for the VAE (``F.pad(x, (0, 1, 0, 1))``)."""

    def __init__(self, b: Build, channels: int, padding: int):
        if padding not in (0, 1):
            raise P2LError(f"Downsample2D: downsample_padding must be 0 or 1, got {padding}")
        pads = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
        self.conv = b.conv(channels, channels, stride=2, padding=pads)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC ``x`` to ``size`` = (H', W'), as torch
    ``F.interpolate(mode="nearest")``: output index i reads input floor(i * H / H')."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(size[0]) * h) // size[0]
    cols = (jnp.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 (or to ``size``, for odd skip shapes) followed by a 3x3 conv."""

    def __init__(self, b: Build, channels: int):
        self.conv = b.conv(channels, channels)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        size = tuple(size) if size is not None else (2 * x.shape[1], 2 * x.shape[2])
        if size == (2 * x.shape[1], 2 * x.shape[2]):
            return self.conv.upsampled(x)
        return self.conv(nearest_resize(x, size))


class Attention(nnx.Module):
    """diffusers ``Attention`` (self or cross), multi-head with H heads of size D:

        x_n = group_norm(x)                 (if norm_groups; VAE mid block)
        q = to_q(x_n), k = to_k(ctx), v = to_v(ctx)      ctx = context or x_n
        out = to_out.0(attention(q, k, v))
        out = (out + x) / rescale_output_factor            (if residual_connection)

    Logits and softmax are float32 always, which is what ``upcast_attention`` /
    ``upcast_softmax`` ask for, so the flag needs no separate code path. NHWC input is
    flattened to (B, H*W, C) tokens and reshaped back.
    """

    def __init__(self, b: Build, query_dim: int, heads: int, dim_head: int, *,
                 cross_attention_dim: int | None = None, qkv_bias: bool = False,
                 norm_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.attention_impl = heads, b.attention_impl
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = b.group_norm(norm_groups, query_dim, eps) if norm_groups else None
        self.to_q = b.linear(query_dim, inner, bias=qkv_bias)
        self.to_k = b.linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = b.linear(kv_dim, inner, bias=qkv_bias)
        self.to_out = nnx.List([b.linear(inner, query_dim), Identity()])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual, shape = x, x.shape
        tokens = x.reshape(shape[0], -1, shape[-1])
        if self.group_norm is not None:
            tokens = self.group_norm(tokens)
        ctx = tokens if context is None else context
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1)
        out = attention(split(self.to_q(tokens)), split(self.to_k(ctx)), split(self.to_v(ctx)),
                        impl=self.attention_impl)
        out = self.to_out[1](self.to_out[0](out.reshape(out.shape[0], out.shape[1], -1)))
        out = out.reshape(shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class GEGLU(nnx.Module):
    """Gated GELU: (a, g) = split(proj(x)); a * gelu(g) with the exact (erf) GELU."""

    def __init__(self, b: Build, dim_in: int, dim_out: int):
        self.proj = b.linear(dim_in, 2 * dim_out)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, gate = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``net = [GEGLU(dim, 4 dim), Dropout, Linear(4 dim, dim)]`` as diffusers FeedForward."""

    def __init__(self, b: Build, dim: int, mult: int = 4):
        self.net = nnx.List([GEGLU(b, dim, mult * dim), Identity(), b.linear(mult * dim, dim)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm transformer block on tokens x with text context c:

        x = x + attn1(norm1(x))          (self attention)
        x = x + attn2(norm2(x), c)       (cross attention)
        x = x + ff(norm3(x))             (GEGLU feed-forward)
    """

    def __init__(self, b: Build, dim: int, heads: int, dim_head: int, cross_attention_dim: int):
        self.norm1 = b.layer_norm(dim)
        self.attn1 = Attention(b, dim, heads, dim_head)
        self.norm2 = b.layer_norm(dim)
        self.attn2 = Attention(b, dim, heads, dim_head, cross_attention_dim=cross_attention_dim)
        self.norm3 = b.layer_norm(dim)
        self.ff = FeedForward(b, dim)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer on an NHWC feature map x (continuous input, as in SD 1.x / 2.x):

        h = proj_in(group_norm(x))  ->  tokens (B, H*W, inner)   (1x1 conv or Linear)
        h = transformer_blocks(h, context)
        out = proj_out(h) + x                                     (1x1 conv or Linear)

    ``use_linear_projection`` picks Linear (SD 2.x) or 1x1 Conv (SD 1.x) projections; both act
    per position, so with NHWC layout they differ only in the parameter shape.
    """

    def __init__(self, b: Build, heads: int, dim_head: int, in_channels: int, num_layers: int,
                 cross_attention_dim: int, norm_groups: int, use_linear_projection: bool):
        inner = heads * dim_head
        self.norm = b.group_norm(norm_groups, in_channels, 1e-6)
        proj = b.linear if use_linear_projection else (lambda i, o: b.conv(i, o, kernel=1))
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(b, inner, heads, dim_head, cross_attention_dim)
            for _ in range(num_layers)])
        self.proj_out = proj(inner, in_channels)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        bsz, height, width, _ = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(bsz, height * width, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h.reshape(bsz, height, width, h.shape[-1]))
        return h + x
