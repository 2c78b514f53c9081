"""The one driver: ``solve(model, operator, y, key, config)`` runs any solver as a single
jitted function whose timestep loop is ``lax.scan``.

Per step i (0-based) the scan feeds t_i, ab_t = alpha_bar_{t_i}, ab_p (the previous DDIM
timestep's alpha_bar, or the final alpha), rho_i and the projection flag
((i + 1) % gamma == 0) to the solver's ``step`` (see :mod:`p2l_jax.solvers.common`).
Schedule values come from the model's scheduler config (diffusers DDIM rules).

Randomness is per sample: sample b's z_T and DDIM noise come from its own key (a batch of B
keys, or one key folded with the sample index b), so a sample's result does not depend on
the other samples of its batch. The output image is D(z0hat) of the last step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p2l_jax.errors import P2LError
from p2l_jax.solvers.common import Problem, State, StepInput, initial_latents, prompt_init
from p2l_jax.solvers.configs import DDIMConfig, build_optimizer
from p2l_jax.solvers.registry import MEASURED, SOLVERS


class SolveResult(NamedTuple):
    """images (B, H, W, 3) = D(z0hat_last); latents (B, h, w, c) = the final z;
    embedding (B, 77, d) = the final C; residual and prompt_loss (B, N) per step and sample
    (prompt_loss is NaN where no prompt is tuned, residual NaN without a measurement)."""

    images: jax.Array
    latents: jax.Array
    embedding: jax.Array
    residual: jax.Array
    prompt_loss: jax.Array


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


def schedule_inputs(model, config) -> StepInput:
    """The scanned per-step inputs (numpy; static per config and model)."""
    sched = model.schedule
    n = config.num_steps
    ts = sched.timesteps(n)
    ab_t, ab_p = sched.alpha_bar_pairs(n)
    rho = np.asarray(getattr(config, "rho", 0.0), np.float32) * np.ones(n, np.float32)
    gamma = getattr(config, "gamma", None) if hasattr(config, "projection") else None
    project = ((np.arange(n) + 1) % gamma == 0) if gamma else np.zeros(n, bool)
    return StepInput(np.arange(n, dtype=np.int32), ts.astype(np.int32), ab_t, ab_p, rho, project)


def _network_fns(remat: bool):
    eps = lambda m, z, t, C: m.eps(z, t, C)
    decode = lambda m, z: m.decode(z)
    if remat:
        eps, decode = jax.checkpoint(eps), jax.checkpoint(decode)
    return eps, decode


def make_problem(model, operator, y, keys, config, C_neg=None) -> Problem:
    """The :class:`Problem` of a run (call inside a jitted function)."""
    eps, decode = _network_fns(getattr(config, "remat", False))
    optimizer = build_optimizer(config.optimizer) if hasattr(config, "optimizer") else None
    return Problem(model=model, operator=operator, y=y, keys=keys, config=config,
                   optimizer=optimizer, eps=functools.partial(eps, model),
                   decode=functools.partial(decode, model), C_neg=C_neg)


def initial_state(problem: Problem, C0, latent_shape) -> State:
    B = problem.keys.shape[0]
    z_T = initial_latents(problem.keys, latent_shape)
    C = jnp.broadcast_to(C0, (B,) + C0.shape[1:]).astype(jnp.float32)
    opt_state = prompt_init(problem, C) if problem.optimizer is not None else ()
    return State(z_T, C, opt_state, jnp.zeros_like(z_T))


@functools.partial(jax.jit, static_argnames=("config", "latent_shape"))
def solve_prepared(model, operator, y, keys, C0, C_neg, *, config, latent_shape):
    """The one compiled program behind :func:`solve`: arguments as :func:`prepare` returns
    them (per-sample ``keys``, starting embedding ``C0``, DDIM's ``C_neg`` or None) and the
    static latent shape (h, w, c). Public so benchmarks can ``.lower(...).compile()`` it and
    read XLA's cost and memory analyses of exactly what ``solve`` runs."""
    problem = make_problem(model, operator, y, keys, config, C_neg)
    step = SOLVERS[type(config)]
    state = initial_state(problem, C0, latent_shape)
    inputs = jax.tree_util.tree_map(jnp.asarray, schedule_inputs(model, config))
    state, records = jax.lax.scan(lambda s, inp: step(problem, s, inp), state, inputs)
    images = model.decode(state.z0hat)
    return SolveResult(images, state.z, state.C, records.residual.T, records.prompt_loss.T)


def solve(model, operator, y, key, config, *, latent_size: tuple[int, int] | None = None,
          embedding=None, negative_embedding=None, chunk_steps: int | None = None,
          on_chunk=None, checkpoint=None, checkpoint_every: int | None = None) -> SolveResult:
    """Run the solver ``config`` on measurement ``y = A x + n`` of operator ``operator``.

    Args:
      model: a :class:`p2l_jax.model.LatentDiffusionModel` (a pytree).
      operator: the forward operator A (a pytree with forward/adjoint/prox); None for DDIM.
      y: the measurement (B, ...); None for DDIM sampling (then B = number of keys).
      key: one PRNG key (split per sample by index) or a batch of B keys.
      config: P2LConfig, LDPSConfig, GMLDPSConfig, PSLDConfig or DDIMConfig.
      latent_size: (h, w) of the latents; default the model's native sample size.
      embedding: starting text embedding C0, (1 or B, 77, d), instead of ``config.prompt``'s;
        an array argument, so per-sample captions share one compiled program.
      negative_embedding: DDIM guidance's unconditional embedding, instead of
        ``config.negative_prompt``'s.
      chunk_steps: None (default): one jitted program, one ``lax.scan`` over all steps.
        k: the chunked mode of :mod:`p2l_jax.solvers.resumable` (jitted calls of one
        "advance k steps" program, then a decode), with ``on_chunk(steps_done, num_steps)``
        called between chunks and, given a ``checkpoint`` directory, the in-flight state
        saved every ``checkpoint_every`` steps (default k) and resumed on a rerun.
    Returns:
      :class:`SolveResult`.
    """
    if chunk_steps is not None or checkpoint is not None or on_chunk is not None:
        from p2l_jax.solvers.resumable import solve_chunked

        return solve_chunked(model, operator, y, key, config, chunk_steps, on_chunk=on_chunk,
                             checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                             latent_size=latent_size, embedding=embedding,
                             negative_embedding=negative_embedding)
    p = prepare(model, operator, y, key, config, latent_size=latent_size, embedding=embedding,
                negative_embedding=negative_embedding)
    return solve_prepared(model, operator, p.y, p.keys, p.C0, p.C_neg, config=config,
                  latent_shape=p.latent_shape)


class Prepared(NamedTuple):
    """``solve``'s checked arguments: y (B, ...) or None, per-sample keys (B,), C0 (1 or B,
    77, d), C_neg (B, 77, d) or None, and the static latent shape (h, w, c)."""

    y: jax.Array | None
    keys: jax.Array
    C0: jax.Array
    C_neg: jax.Array | None
    latent_shape: tuple[int, int, int]


def prepare(model, operator, y, key, config, *, latent_size=None, embedding=None,
            negative_embedding=None) -> Prepared:
    """Check ``solve``'s arguments and derive its array inputs (see :func:`solve`); works on
    concrete arrays and inside a trace."""
    if type(config) not in SOLVERS:
        raise P2LError(f"option config: {type(config).__name__} is not a solver config; "
                       f"known: {', '.join(c.__name__ for c in SOLVERS)}")
    measured = isinstance(config, MEASURED)
    if measured and (operator is None or y is None):
        raise P2LError(f"{type(config).__name__} needs an operator and a measurement y")
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
        expected = jax.eval_shape(operator.forward, jax.ShapeDtypeStruct(image_shape, jnp.float32))
        if tuple(expected.shape) != tuple(y.shape):
            raise P2LError(f"measurement y has shape {tuple(y.shape)} but the operator maps "
                           f"images {image_shape} to {tuple(expected.shape)}")
    C0 = model.text_embeddings([config.prompt]) if embedding is None else _embedding(
        embedding, batch, "embedding")
    C_neg = None
    if isinstance(config, DDIMConfig) and config.guidance_scale != 1.0:
        C_neg = (model.text_embeddings([config.negative_prompt]) if negative_embedding is None
                 else _embedding(negative_embedding, batch, "negative_embedding"))
        C_neg = jnp.broadcast_to(C_neg, (batch,) + C0.shape[1:])
    return Prepared(y, keys, C0, C_neg, latent_shape)


def _embedding(C, batch: int, name: str) -> jax.Array:
    C = jnp.asarray(C, jnp.float32)
    if C.ndim != 3 or C.shape[0] not in (1, batch):
        raise P2LError(f"option {name}: expected shape (1 or {batch}, L, d), got {tuple(C.shape)}")
    return C


def compiled_programs() -> int:
    """How many programs the driver has compiled so far in this process."""
    return solve_prepared._cache_size()


@functools.partial(jax.jit, static_argnames=("config",))
def _gradients_at(model, operator, y, z_t, C, index, *, config):
    keys = per_sample_keys(jax.random.key(0), z_t.shape[0])
    problem = make_problem(model, operator, y, keys, config)
    inputs = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[index],
                                    schedule_inputs(model, config))
    state = State(z_t, C, prompt_init(problem, C) if problem.optimizer is not None else (),
                  jnp.zeros_like(z_t))
    from p2l_jax.solvers.guided import fidelity_objective
    from p2l_jax.solvers.gradients import VARIANTS

    tune = getattr(config, "tune_prompt", False)
    return VARIANTS[config.gradient](problem, state, inputs, fidelity_objective(problem), tune,
                                     getattr(config, "K", 1))


def gradients_at(model, operator, y, z_t, C, index: int, config):
    """The configured gradient variant at one point (z_t, C) of step ``index`` with a fresh
    optimizer state and the fidelity objective r: a GradientResult (eps, z0hat, g_z, C*, S,
    prompt loss before tuning, g_C, r at the g_z point). For tests, research and benchmarks."""
    return _gradients_at(model, operator, jnp.asarray(y, jnp.float32), jnp.asarray(z_t),
                         jnp.asarray(C), jnp.int32(index), config=config)
