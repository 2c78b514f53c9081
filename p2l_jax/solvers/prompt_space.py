"""Where P2L's step 1 tunes the prompt: the config's ``prompt_space`` names the tuned
variable v and the map v -> C that every network call reads.

* ``embedding`` [paper]: v = C, the text encoder's output (77, d), every coordinate free.
* ``tokens`` [ours, textual-inversion style]: v = e, the text encoder's INPUT token embeddings
  (77, d_tok; before positions are added), started from the prompt's rows of the token table,
  e_0 = E_tok[w(prompt)] (for the null prompt: BOS, EOS and padding), and

      C = T(e) = LN_final(Enc(e + E_pos)),        T the text encoder without its table lookup,

  recomputed from e in each of the K updates, so the objective's gradient reaches e through
  the encoder, g_e = J_T(e)^T grad_C L(T(e)), and the optimizer steps e:
  e <- e + optax_update(g_e). C moves only along the encoder's image of (continuous) token
  sequences, where every caption lies, instead of along any of the 77 d directions of C.
  It needs a model with a text encoder (``model.encode_token_embeddings``).

The optimizer state of a token-space run carries the variable: S = (e, S_e), so the scan
carry (z, C, S), chunked runs, checkpoints and sweeps are the same in both spaces; C is
always T(e) there. The program's starting input is v_0: C_0 in embedding space, e_0 in token
space (:func:`start_variable`; ``solve``'s ``embedding`` argument is v_0).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from p2l_jax.errors import P2LError
from p2l_jax.solvers.common import prompt_init

#: The prompt spaces (P2LConfig.prompt_space).
SPACES = ("embedding", "tokens")


def space_of(structure) -> str:
    """The structure's prompt space; solvers without the option tune (if at all) C."""
    return getattr(structure, "prompt_space", "embedding")


def start_variable(model, prompt: str, space: str):
    """v_0 of ``prompt`` (1, 77, d): its embedding C_0, or its token embeddings e_0."""
    if space == "embedding":
        return model.text_embeddings([prompt])
    if not hasattr(model, "token_embeddings"):
        raise P2LError(f"option prompt_space={space!r} needs a model with a text encoder; "
                       f"{type(model).__name__} has none")
    return model.token_embeddings([prompt])


def to_embedding(problem) -> Callable:
    """v -> C: the identity, or e -> T(e) through the model's text encoder."""
    if space_of(problem.structure) == "embedding":
        return lambda v: v
    return problem.model.encode_token_embeddings


def prompt_start(problem, v0):
    """(C_0, S_0) of the scan carry from the starting variable v_0 (1 or B, 77, d)."""
    B = problem.keys.shape[0]
    v = jnp.broadcast_to(v0, (B,) + v0.shape[1:]).astype(jnp.float32)
    S = prompt_init(problem, v) if problem.optimizer is not None else ()
    if space_of(problem.structure) == "embedding":
        return v, S
    return to_embedding(problem)(v), (v, S)


def variable(problem, C, S):
    """(v, S_v) from the carry's (C, S): (C, S), or (e, S_e) = S in token space."""
    return (C, S) if space_of(problem.structure) == "embedding" else S


def carried(problem, v, S_v):
    """The carry's (C, S) after tuning v: (v, S_v), or (T(e), (e, S_e)) in token space."""
    if space_of(problem.structure) == "embedding":
        return v, S_v
    return to_embedding(problem)(v), (v, S_v)
