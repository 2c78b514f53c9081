"""Resolution blocks shared by the UNet and the VAE: containers of already-built layers.

The network files decide what goes in each block (``unet.py``: DownBlock2D,
CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D; ``vae.py``:
DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D); the blocks here only hold the
``resnets`` / ``attentions`` / ``downsamplers`` / ``upsamplers`` lists under the diffusers names
and run them in the diffusers order. Every attention module is called as ``attn(h, context)``
(a Transformer2DModel uses the text context; the VAE's self attention gets ``None``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _as_list(modules: Sequence[nnx.Module] | None) -> nnx.List | None:
    return nnx.List(list(modules)) if modules else None


class DownBlock(nnx.Module):
    """h <- resnet_i(h, temb) [-> attention_i(h, context)] for each layer i, then an optional
    stride-2 downsampler. Returns h and the skip states: the output of every layer and of the
    downsampler (the UNet's up path consumes them in reverse)."""

    def __init__(self, resnets, attentions=None, downsampler=None):
        self.resnets = _as_list(resnets)
        self.attentions = _as_list(attentions)
        self.downsamplers = _as_list([downsampler] if downsampler is not None else None)

    def __call__(self, h, temb=None, context=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nnx.Module):
    """h <- resnets[0](h, temb); then h <- resnets[i+1](attentions[i](h, context), temb)."""

    def __init__(self, resnets, attentions):
        self.resnets = _as_list(resnets)
        self.attentions = _as_list(attentions)

    def __call__(self, h, temb=None, context=None):
        h = self.resnets[0](h, temb)
        for i in range(1, len(self.resnets)):
            if self.attentions is not None:
                h = self.attentions[i - 1](h, context)
            h = self.resnets[i](h, temb)
        return h


class UpBlock(nnx.Module):
    """For each layer i: h <- concat(h, skips.pop()) (UNet only; channels last), then
    resnet_i(h, temb) [-> attention_i(h, context)]; finally an optional nearest-x2 upsampler
    (to ``size`` when given, so odd skip shapes line up as diffusers' ``upsample_size``)."""

    def __init__(self, resnets, attentions=None, upsampler=None):
        self.resnets = _as_list(resnets)
        self.attentions = _as_list(attentions)
        self.upsamplers = _as_list([upsampler] if upsampler is not None else None)

    def __call__(self, h, skips: list[jax.Array] | None = None, temb=None, context=None,
                 size: tuple[int, int] | None = None):
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h
