"""Scaled dot-product attention behind one function, with implementations chosen by name.

Every attention in the networks (UNet self/cross attention, VAE mid-block attention, CLIP
causal self attention) goes through :func:`attention`, so a faster kernel is one new entry in
``_IMPLEMENTATIONS`` rather than an edit of every layer.

For queries ``q`` (B, Lq, H, D), keys ``k`` and values ``v`` (B, Lk, H, D) and head h:

    logits[b, h, i, j] = <q[b, i, h], k[b, j, h]> / sqrt(D)           (float32)
    p[b, h, i, :]      = softmax_j(logits[b, h, i, :] masked)          (float32)
    out[b, i, h]       = sum_j p[b, h, i, j] v[b, j, h]                (cast to q.dtype)

where masked positions (``mask`` False, or j > i when ``causal``) get probability 0.

Implementations:
  - ``"einsum"``: the formula above written out; logits and softmax always in float32.
  - ``"xla"``:    ``jax.nn.dot_product_attention(implementation=None)`` (XLA picks).
  - ``"cudnn"``:  ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only,
    float16/bfloat16 inputs).

Example:
    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 4, 2, 8)); kv = jnp.ones((1, 3, 2, 8))
    >>> attention(q, kv, kv, impl="einsum").shape
    (1, 4, 2, 8)
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from p2l_jax.errors import P2LError


def _causal_mask(lq: int, lk: int) -> jax.Array:
    """Boolean (1, 1, Lq, Lk) mask, True where key j <= query i (top-left aligned)."""
    return jnp.tril(jnp.ones((lq, lk), dtype=bool))[None, None]


def _einsum_attention(q, k, v, mask, causal):
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale
    if causal:
        mask = _causal_mask(q.shape[1], k.shape[1]) if mask is None else (
            mask & _causal_mask(q.shape[1], k.shape[1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _jax_attention(q, k, v, mask, causal, *, implementation):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation=implementation)


_IMPLEMENTATIONS: dict[str, Callable] = {
    "einsum": _einsum_attention,
    "xla": functools.partial(_jax_attention, implementation=None),
    "cudnn": functools.partial(_jax_attention, implementation="cudnn"),
}

ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = tuple(_IMPLEMENTATIONS)


def check_attention_impl(impl: str) -> str:
    """Return ``impl`` if it names a known implementation, else raise :class:`P2LError`."""
    if impl not in _IMPLEMENTATIONS:
        raise P2LError(f"unknown attention implementation {impl!r}; "
                       f"known: {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "einsum",
              mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """Multi-head scaled dot-product attention (see the module docstring for the math).

    Args:
      q: queries (B, Lq, H, D).
      k, v: keys and values (B, Lk, H, D).
      impl: one of :data:`ATTENTION_IMPLEMENTATIONS`.
      mask: optional boolean array broadcastable to (B, H, Lq, Lk); True = attend.
      causal: if True, query i attends only to keys j <= i (combined with ``mask``).

    Returns:
      (B, Lq, H, D) in ``q.dtype``.
    """
    fn = _IMPLEMENTATIONS[check_attention_impl(impl)]
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::2] != k.shape[::2] \
            or q.shape[3] != k.shape[3]:
        raise P2LError(f"attention expects q (B, Lq, H, D) and k, v (B, Lk, H, D); got "
                       f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask is not None:
        full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        try:
            mask = jnp.broadcast_to(jnp.asarray(mask, dtype=bool), full)
        except ValueError as err:
            raise P2LError(f"attention mask of shape {tuple(jnp.shape(mask))} does not "
                           f"broadcast to (B, H, Lq, Lk) = {full}") from err
    return fn(q, k, v, mask, causal)
