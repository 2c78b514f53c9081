"""Analytic FLOP count of the SD networks and of one solver step, from the configs alone.

Counted: convolutions (2 B Ho Wo k^2 Cin Cout), dense layers (2 tokens Cin Cout) and the two
attention products (QK^T and PV: 2 x 2 B Lq Lk inner). Not counted: norms, activations,
softmax, residual adds, the operator A (elementwise or a small matmul): the same convention as
``torch.utils.flop_counter``, so the forward counts equal torch's exactly (tested), while XLA's
cost analysis, which also counts elementwise work, comes out a few percent higher.

A step combines network passes. "bwd" is an input-gradient backward pass: parameters are
constants, so a dense layer or conv costs one forward again (dX only), the attention products
twice (dQ, dK, dV, dP). Per P2L step with K prompt iterations (algorithm.md):

    full:             (K + 1) (U + U' + D + D')       + (D + E) / project_every
    no_unet_jacobian:  K (U + U' + D + D') + U + D + D' + (D + E) / project_every
    joint:                 (U + U' + D + D')          + (D + E) / project_every

with U, D, E the UNet, decoder, encoder forwards and ' their backward. The prompt gradient's
UNet backward is counted whole although the layers before the first cross attention need no
cotangent (an over-count of a few percent). LDPS = P2L without tuning or projection;
GML-DPS and PSLD add E + E' (the encoder inside their loss).
"""

from __future__ import annotations

import math
from collections import Counter


class FlopCount(Counter):
    """FLOPs by kind: ``conv``, ``dense``, ``attention``; ``total`` sums them."""

    @property
    def total(self) -> float:
        return float(sum(self.values()))

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount({k: self.get(k, 0) + other.get(k, 0) for k in {*self, *other}})

    def scaled(self, factor: float) -> "FlopCount":
        return FlopCount({k: v * factor for k, v in self.items()})

    def backward(self) -> "FlopCount":
        """The input-gradient backward pass of a forward with these FLOPs (see module doc)."""
        return FlopCount({k: v * (2 if k == "attention" else 1) for k, v in self.items()})


def _conv(f: FlopCount, b, ho, wo, cin, cout, k=3):
    f["conv"] += 2 * b * ho * wo * k * k * cin * cout


def _dense(f: FlopCount, tokens, cin, cout):
    f["dense"] += 2 * tokens * cin * cout


def _attention(f: FlopCount, b, lq, lk, inner):
    f["attention"] += 4 * b * lq * lk * inner


def _resnet(f, b, hw, cin, cout, temb):
    _conv(f, b, *hw, cin, cout)
    _conv(f, b, *hw, cout, cout)
    if cin != cout:
        _conv(f, b, *hw, cin, cout, k=1)
    if temb:
        _dense(f, b, temb, cout)


def _transformer(f, b, hw, ch, depth, context_len, cross_dim, linear_proj):
    L = hw[0] * hw[1]
    proj = (lambda: _dense(f, b * L, ch, ch)) if linear_proj else (
        lambda: _conv(f, b, *hw, ch, ch, k=1))
    proj()
    for _ in range(depth):
        _dense(f, b * L, ch, 3 * ch)              # attn1 q, k, v
        _attention(f, b, L, L, ch)
        _dense(f, b * L, ch, ch)                  # attn1 out
        _dense(f, b * L, ch, ch)                  # attn2 q
        _dense(f, b * context_len, cross_dim, 2 * ch)  # attn2 k, v
        _attention(f, b, L, context_len, ch)
        _dense(f, b * L, ch, ch)                  # attn2 out
        _dense(f, b * L, ch, 8 * ch)              # GEGLU proj
        _dense(f, b * L, 4 * ch, ch)              # ff out
    proj()


def _halve(hw):
    return (math.ceil(hw[0] / 2), math.ceil(hw[1] / 2))


def unet_forward(cfg, batch: int, hw: tuple[int, int], context_len: int = 77) -> FlopCount:
    """eps_theta at latent size ``hw`` (a :class:`p2l_jax.models.unet.UNetConfig`)."""
    from p2l_jax.models.unet import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES

    f, b, ch, n = FlopCount(), batch, cfg.block_out_channels, len(cfg.block_out_channels)
    temb = 4 * ch[0]
    layers, depth = cfg.per_block("layers_per_block"), cfg.per_block("transformer_layers_per_block")
    cross = cfg.per_block("cross_attention_dim")
    res = [tuple(hw)]
    for _ in range(n - 1):
        res.append(_halve(res[-1]))

    def tr(i, c, at):
        _transformer(f, b, at, c, depth[i], context_len, cross[i], cfg.use_linear_projection)

    _dense(f, b, ch[0], temb)
    _dense(f, b, temb, temb)
    _conv(f, b, *res[0], cfg.in_channels, ch[0])
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(layers[i]):
            _resnet(f, b, res[i], ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], temb)
            if DOWN_BLOCK_TYPES[kind]:
                tr(i, ch[i], res[i])
        if i < n - 1:
            _conv(f, b, *res[i + 1], ch[i], ch[i])
    if cfg.mid_block_type is not None:
        _resnet(f, b, res[-1], ch[-1], ch[-1], temb)
        tr(n - 1, ch[-1], res[-1])
        _resnet(f, b, res[-1], ch[-1], ch[-1], temb)
    for i, kind in enumerate(cfg.up_block_types):
        r = n - 1 - i
        prev, out, skip_in, num = ch[min(r + 1, n - 1)], ch[r], ch[max(r - 1, 0)], layers[r] + 1
        for j in range(num):
            cin = (prev if j == 0 else out) + (skip_in if j == num - 1 else out)
            _resnet(f, b, res[r], cin, out, temb)
            if UP_BLOCK_TYPES[kind]:
                tr(r, out, res[r])
        if i < n - 1:
            _conv(f, b, *res[r - 1], out, out)
    _conv(f, b, *res[0], ch[0], cfg.out_channels)
    return f


def _vae_mid(f, b, hw, c):
    _resnet(f, b, hw, c, c, None)
    L = hw[0] * hw[1]
    _dense(f, b * L, c, 3 * c)
    _attention(f, b, L, L, c)
    _dense(f, b * L, c, c)
    _resnet(f, b, hw, c, c, None)


def vae_decoder_forward(cfg, batch: int, hw: tuple[int, int]) -> FlopCount:
    """D at latent size ``hw`` (post_quant_conv and decoder; a VAEConfig)."""
    f, b, rev, n = FlopCount(), batch, cfg.block_out_channels[::-1], len(cfg.block_out_channels)
    lat = cfg.latent_channels
    if cfg.use_post_quant_conv:
        _conv(f, b, *hw, lat, lat, k=1)
    _conv(f, b, *hw, lat, rev[0])
    if cfg.mid_block_add_attention:
        _vae_mid(f, b, hw, rev[0])
    else:
        _resnet(f, b, hw, rev[0], rev[0], None)
        _resnet(f, b, hw, rev[0], rev[0], None)
    for i in range(n):
        for j in range(cfg.layers_per_block + 1):
            _resnet(f, b, hw, rev[max(i - 1, 0)] if j == 0 else rev[i], rev[i], None)
        if i < n - 1:
            hw = (2 * hw[0], 2 * hw[1])
            _conv(f, b, *hw, rev[i], rev[i])
    _conv(f, b, *hw, rev[-1], cfg.out_channels)
    return f


def vae_encoder_forward(cfg, batch: int, hw: tuple[int, int]) -> FlopCount:
    """E at image size ``hw`` (encoder and quant_conv; a VAEConfig)."""
    f, b, ch, n = FlopCount(), batch, cfg.block_out_channels, len(cfg.block_out_channels)
    _conv(f, b, *hw, cfg.in_channels, ch[0])
    for i in range(n):
        for j in range(cfg.layers_per_block):
            _resnet(f, b, hw, ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], None)
        if i < n - 1:
            hw = ((hw[0] - 2) // 2 + 1, (hw[1] - 2) // 2 + 1)  # pad (0, 1), stride 2
            _conv(f, b, *hw, ch[i], ch[i])
    if cfg.mid_block_add_attention:
        _vae_mid(f, b, hw, ch[-1])
    else:
        _resnet(f, b, hw, ch[-1], ch[-1], None)
        _resnet(f, b, hw, ch[-1], ch[-1], None)
    _conv(f, b, *hw, ch[-1], 2 * cfg.latent_channels)
    if cfg.use_quant_conv:
        _conv(f, b, *hw, 2 * cfg.latent_channels, 2 * cfg.latent_channels, k=1)
    return f


def network_forwards(model, batch: int, latent_hw: tuple[int, int]) -> dict[str, FlopCount]:
    """Forward counts ``{"unet", "decoder", "encoder"}`` of a LatentDiffusionModel's networks."""
    f = model.vae_scale_factor
    return {"unet": unet_forward(model.unet_config, batch, latent_hw,
                                 model.text_config.max_position_embeddings),
            "decoder": vae_decoder_forward(model.vae_config, batch, latent_hw),
            "encoder": vae_encoder_forward(model.vae_config, batch,
                                           (latent_hw[0] * f, latent_hw[1] * f))}


def step_flops(forwards: dict[str, FlopCount], config) -> dict[str, float]:
    """Analytic FLOPs of one solver step (see the module docstring).

    Returns ``{"step": without projection, "projection": one projection's extra,
    "step_amortized": step + projection / project_every}``.
    """
    U, D, E = forwards["unet"], forwards["decoder"], forwards["encoder"]
    guided = U + U.backward() + D + D.backward()
    name = type(config).__name__
    if name == "DDIMConfig":
        step = U.scaled(1 if config.guidance_scale == 1.0 else 2)
    else:
        variant = config.gradient
        tune = name == "P2LConfig" and config.tune_prompt
        K = config.K if tune else 0
        latent = U + D + D.backward() if variant == "no_unet_jacobian" else guided
        step = guided if (variant == "joint" and tune) else guided.scaled(K) + latent
        if name in ("GMLDPSConfig", "PSLDConfig"):
            step = step + E + E.backward()
    projects = name == "P2LConfig" and config.projection != "none"
    projection = (D + E).total if projects else 0.0
    every = config.project_every if projects else 1
    return {"step": step.total, "projection": projection,
            "step_amortized": step.total + projection / every}
