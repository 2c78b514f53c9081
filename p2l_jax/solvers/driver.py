"""``solve(model, operator, y, key, config)``: check the arguments, split the config into its
static structure and its settings (:func:`p2l_jax.solvers.configs.split`) and hand the
run to the one runner (:func:`p2l_jax.solvers.resumable.run`), whole or in chunks.

Randomness is per sample: sample b's z_T and DDIM noise come from its own key (a batch of B
keys, or one key folded with the sample index b), so a sample's result does not depend on
the other samples of its batch. The output image is D(z_0), the decoded final latent
(:mod:`p2l_jax.solvers.program`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from p2l_jax.errors import P2LError
from p2l_jax.jit import jit
from p2l_jax.operators.base import measurement_shape
from p2l_jax.solvers import program
from p2l_jax.solvers.common import State
from p2l_jax.solvers.configs import Structure, split
from p2l_jax.solvers.gradients import VARIANTS
from p2l_jax.solvers.guided import fidelity_objective
from p2l_jax.solvers.program import SolveResult, make_problem, step_inputs
from p2l_jax.solvers.prompt_space import prompt_start, space_of, start_variable
from p2l_jax.solvers.registry import solver_of
from p2l_jax.solvers.resumable import Programs, run, run_identity


def per_sample_keys(key, batch_size: int) -> jax.Array:
    """B keys: ``key`` itself if it is a batch of B keys, else fold_in(key, b) for b < B."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == 0 if typed else key.shape == (2,)
    if single:
        return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch_size))
    if key.shape[0] != batch_size or (not typed and key.shape[1:] != (2,)):
        raise P2LError(f"option key: expected one key or {batch_size} keys, got shape "
                       f"{tuple(key.shape)}")
    return key


def solve(model, operator, y, key, config, *, latent_size: tuple[int, int] | None = None,
          embedding=None, negative_embedding=None, chunk_steps: int | None = None,
          on_chunk=None, checkpoint=None, checkpoint_every: int | None = None) -> SolveResult:
    """Run the solver ``config`` on measurement ``y = A x + n`` of operator ``operator``.

    Args:
      model: a :class:`p2l_jax.model.LatentDiffusionModel` or
        :class:`p2l_jax.pixel_model.PixelDiffusionModel` (a pytree).
      operator: the forward operator A (a pytree with forward/adjoint/prox); None for DDIM.
      y: the measurement (B, ...); None for DDIM sampling (then B = number of keys).
      key: one PRNG key (split per sample by index) or a batch of B keys.
      config: P2LConfig, LDPSConfig, GMLDPSConfig, PSLDConfig, DPSConfig or DDIMConfig (the
        configs of :data:`p2l_jax.solvers.registry.SOLVERS`). Its settings
        (rho, lam, eta, learning rate, ...) are arrays of the program: another value
        reuses the compiled program; its structure (num_steps, gradient, K, ...) is static.
      latent_size: (h, w) of the latents; default the model's native sample size.
      embedding: starting text embedding C0, (1 or B, 77, d), instead of ``config.prompt``'s;
        an array argument, so per-sample captions share one compiled program. With
        ``prompt_space="tokens"`` it is the starting token embeddings e_0 instead
        (:meth:`~p2l_jax.model.LatentDiffusionModel.token_embeddings`).
      negative_embedding: DDIM guidance's unconditional embedding, instead of
        ``config.negative_prompt``'s.
      chunk_steps: None (default): one jitted program, one ``lax.scan`` over all steps.
        k: jitted calls of one "advance k steps" program, then a decode, with
        ``on_chunk(steps_done, num_steps)`` called between chunks and, given a
        ``checkpoint`` directory, the in-flight state saved every ``checkpoint_every`` steps
        (default k) and resumed on a rerun (:mod:`p2l_jax.solvers.resumable`).
    Returns:
      :class:`SolveResult`; its images are D(z_0).
    """
    p = prepare(model, operator, y, key, config, latent_size=latent_size, embedding=embedding,
                negative_embedding=negative_embedding)
    s, settings = p.structure, p.settings
    inputs = (model, operator, p.y, p.keys)
    programs = Programs(
        whole=lambda: program.solve_prepared(*inputs, p.C0, p.C_neg, settings, structure=s,
                                             latent_shape=p.latent_shape),
        start=lambda k: program.jit_start(*inputs, p.C0, p.C_neg, settings, structure=s,
                                          latent_shape=p.latent_shape, k=k),
        advance=lambda carry, first, k: program.jit_advance(*inputs, p.C_neg, settings, carry,
                                                            first, structure=s, k=k),
        finish=lambda carry: program.jit_finish(model, operator, p.y, carry, structure=s))
    return run(programs, config.num_steps, chunk_steps=chunk_steps, on_chunk=on_chunk,
               checkpoint=checkpoint, checkpoint_every=checkpoint_every,
               identity=run_identity(model, operator, config, p.latent_shape, p.y, p.keys,
                                     p.C0, p.C_neg))


class Prepared(NamedTuple):
    """``solve``'s checked arguments: y (B, ...) or None, per-sample keys (B,), C0 (1 or B,
    77, d; the starting token embeddings e_0 with ``prompt_space="tokens"``), C_neg (1 or B,
    77, d) or None, the static latent shape (h, w, c), and the config's structure and
    settings."""

    y: jax.Array | None
    keys: jax.Array
    C0: jax.Array
    C_neg: jax.Array | None
    latent_shape: tuple[int, int, int]
    structure: Structure
    settings: Any


def prepare(model, operator, y, key, config, *, latent_size=None, embedding=None,
            negative_embedding=None) -> Prepared:
    """Check ``solve``'s arguments and derive its array inputs (see :func:`solve`)."""
    solver = solver_of(type(config))
    if solver.measured and (operator is None or y is None):
        raise P2LError(f"{type(config).__name__} needs an operator and a measurement y")
    structure, settings = split(config)
    if y is not None:
        y = jnp.asarray(y, jnp.float32)
        batch = y.shape[0]
    else:
        k = jnp.asarray(key) if not isinstance(key, jax.Array) else key
        typed = jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
        batch = (k.shape[0] if k.ndim == 1 else 1) if typed else (k.shape[0] if k.ndim == 2 else 1)
    keys = per_sample_keys(key, batch)
    h, w = latent_size or (model.sample_size, model.sample_size)
    latent_shape = (int(h), int(w), int(model.latent_channels))
    if y is not None and operator is not None:
        image_shape = (batch, h * model.vae_scale_factor, w * model.vae_scale_factor, 3)
        expected = measurement_shape(operator, image_shape)
        if expected != tuple(y.shape):
            raise P2LError(f"measurement y has shape {tuple(y.shape)} but the operator maps "
                           f"images {image_shape} to {expected}")
    C0 = (start_variable(model, config.prompt, space_of(structure)) if embedding is None
          else _embedding(embedding, batch, "embedding"))
    C_neg = None
    if getattr(structure, "guidance", False):
        C_neg = (model.text_embeddings([config.negative_prompt]) if negative_embedding is None
                 else _embedding(negative_embedding, batch, "negative_embedding"))
    return Prepared(y, keys, C0, C_neg, latent_shape, structure, settings)


def _embedding(C, batch: int, name: str) -> jax.Array:
    C = jnp.asarray(C, jnp.float32)
    if C.ndim != 3 or C.shape[0] not in (1, batch):
        raise P2LError(f"option {name}: expected shape (1 or {batch}, L, d), got {tuple(C.shape)}")
    return C


@jit(static_argnames=("structure",))
def _gradients_at(model, operator, y, z_t, C, C_neg, index, settings, *, structure):
    keys = per_sample_keys(jax.random.key(0), z_t.shape[0])
    problem = make_problem(model, operator, y, keys, structure, settings, C_neg)
    inputs = jax.tree_util.tree_map(lambda a: a[index], step_inputs(model, structure, settings, 1))
    state = State(z_t, *prompt_start(problem, C))
    return VARIANTS[structure.gradient](problem, state, inputs, fidelity_objective(problem),
                                        getattr(structure, "tune_prompt", False),
                                        getattr(structure, "K", 1))


def gradients_at(model, operator, y, z_t, C, index: int, config):
    """The configured gradient variant at one point (z_t, C) of step ``index`` with a fresh
    optimizer state and the fidelity objective r: a GradientResult (eps, z0hat, g_z, C*, S,
    prompt loss before tuning, g_C, r at the g_z point). With ``prompt_space="tokens"``, C is
    the token embeddings e (the point is (z_t, T(e))) and g_C is g_e. For tests, research and
    benchmarks."""
    structure, settings = split(config)
    C_neg = (model.text_embeddings([config.negative_prompt])
             if getattr(structure, "guidance", False) else None)
    return _gradients_at(model, operator, jnp.asarray(y, jnp.float32), jnp.asarray(z_t),
                         jnp.asarray(C), C_neg, jnp.int32(index), settings, structure=structure)
