"""CLIP text encoder (the Stable Diffusion prompt encoder) in Flax NNX.

For token ids ``w`` of shape (B, L), with L <= ``max_position_embeddings``:

    h_0 = E_tok[w] + E_pos[0 .. L-1]                       (position ids are arange(L))
    for each layer l = 1 .. N (pre-norm residual blocks):
        a   = LN_1(h_{l-1});   q, k, v = a W_q + b_q, a W_k + b_k, a W_v + b_v
        h'  = h_{l-1} + Attn(q, k, v) W_o + b_o,
              Attn = softmax(q k^T / sqrt(D) + M) v per head,  M_ij = -inf for j > i (causal)
        h_l = h' + act(LN_2(h') W_1 + b_1) W_2 + b_2
    last_hidden_state = LN_final(h_N)                       shape (B, L, d)

with ``act`` either quick_gelu(x) = x * sigmoid(1.702 x) (SD 1.x) or the exact
gelu(x) = x * Phi(x) with the normal CDF Phi (SD 2.x; torch's ``GELUActivation``). Layer norms
are computed in float32 whatever the parameter dtype. SD 2.x ships the encoder already cut to
the penultimate layer (23 layers), so any layer count is accepted.

Attribute names mirror the transformers ``CLIPTextModel`` state-dict keys without the
``text_model.`` prefix (``encoder.layers.0.self_attn.q_proj.weight`` is the NNX path
``('encoder', 'layers', 0, 'self_attn', 'q_proj', 'kernel')``), so the generic loader of
``p2l_jax.weights`` fills it. Construct it under ``nnx.eval_shape`` only (no random init).

Example::

    cfg = CLIPTextConfig.from_dict(json.load(open("text_encoder/config.json")))
    abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from p2l_jax.errors import P2LError
from p2l_jax.models.attention import attention, check_attention_impl

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` that shape the network.

    Defaults are transformers' own defaults, used when a ``config.json`` omits a key.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise P2LError(f"CLIP text config: hidden_act={self.hidden_act!r} is not supported; "
                           f"expected one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise P2LError(f"CLIP text config: hidden_size={self.hidden_size} is not divisible "
                           f"by num_attention_heads={self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *,
                  source: str = "config.json") -> "CLIPTextConfig":
        """Parse a transformers ``config.json`` dict; unknown keys are ignored.

        A value of the wrong type raises ``P2LError`` naming ``source`` and the key.
        """
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in config:
                continue
            value, kind = config[field.name], type(field.default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise P2LError(f"{source}: key {field.name!r} must be {kind.__name__}, "
                               f"got {value!r}")
            values[field.name] = value
        try:
            return cls(**values)
        except P2LError as err:
            raise P2LError(f"{source}: {err}") from None


def _layer_norm(config: CLIPTextConfig, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """A LayerNorm whose statistics and affine map are computed in float32."""
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=param_dtype, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    """h_0 = E_tok[w] + E_pos[arange(L)], in two parts: ``token_embedding(w)`` = E_tok[w] and
    :meth:`with_positions`, so that token embeddings e other than rows of E_tok (textual
    inversion, P2L's ``prompt_space="tokens"``) enter the encoder as ids do."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.with_positions(self.token_embedding(input_ids))

    def with_positions(self, e: jax.Array) -> jax.Array:
        """h_0 = e + E_pos[arange(L)] for token embeddings e (B, L, d)."""
        return e + self.position_embedding(jnp.arange(e.shape[-2]))[None]


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention: softmax(q k^T / sqrt(D) + M) v, then out_proj."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, attention_impl: str,
                 rngs: nnx.Rngs):
        d = config.hidden_size
        linear = lambda: nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = linear(), linear(), linear()
        self.out_proj = linear()
        self.num_heads = config.num_attention_heads
        self.attention_impl = attention_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
        out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                        impl=self.attention_impl, causal=True)
        return self.out_proj(out.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    """act(x W_1 + b_1) W_2 + b_2."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm block: h + Attn(LN_1 h), then h + MLP(LN_2 h)."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, attention_impl: str,
                 rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, dtype=dtype, param_dtype=param_dtype,
                                       attention_impl=attention_impl, rngs=rngs)
        self.layer_norm1 = _layer_norm(config, param_dtype, rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config, param_dtype, rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.self_attn(self.layer_norm1(h).astype(h.dtype))
        return h + self.mlp(self.layer_norm2(h).astype(h.dtype))


class CLIPEncoder(nnx.Module):
    """The stack of ``num_hidden_layers`` encoder layers."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, attention_impl: str,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([
            CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype,
                             attention_impl=attention_impl, rngs=rngs)
            for _ in range(config.num_hidden_layers)])

    def __call__(self, h: jax.Array) -> jax.Array:
        for layer in self.layers:
            h = layer(h)
        return h


class CLIPTextModel(nnx.Module):
    """Token ids (B, L) int -> last_hidden_state (B, L, d) after the final layer norm.

    ``dtype`` is the activation dtype (the output is cast to it), ``param_dtype`` the storage
    dtype of the parameters; ``attention_impl`` selects the kernel of
    :func:`p2l_jax.models.attention.attention`.
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "einsum", rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        check_attention_impl(attention_impl)
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, param_dtype=param_dtype,
                                             rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, param_dtype=param_dtype,
                                   attention_impl=attention_impl, rngs=rngs)
        self.final_layer_norm = _layer_norm(config, param_dtype, rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise P2LError(f"CLIPTextModel: input_ids must be integer (B, L), got "
                           f"{input_ids.dtype} {tuple(input_ids.shape)}")
        return self.encode_token_embeddings(self.embeddings.token_embedding(input_ids))

    def encode_token_embeddings(self, e: jax.Array) -> jax.Array:
        """last_hidden_state from token embeddings e (B, L, d) in place of E_tok[w]:
        positions are added as for ids, so ``encode_token_embeddings(token_embedding(w))``
        is ``self(w)``."""
        if e.ndim != 3 or e.shape[2] != self.config.hidden_size:
            raise P2LError(f"CLIPTextModel: token embeddings must be (B, L, "
                           f"{self.config.hidden_size}), got {tuple(e.shape)}")
        if e.shape[1] > self.config.max_position_embeddings:
            raise P2LError(f"CLIPTextModel: sequence length {e.shape[1]} exceeds "
                           f"max_position_embeddings={self.config.max_position_embeddings}")
        h = self.encoder(self.embeddings.with_positions(e).astype(self.dtype))
        return self.final_layer_norm(h).astype(self.dtype)
