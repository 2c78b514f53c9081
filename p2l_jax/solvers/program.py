"""One run of a solver as traceable pieces: ``start``, ``advance`` k steps, ``finish``.

Every way of running a solver is built from these three, inside some jitted function: the
one-scan program (:func:`run_whole`: start, advance all N steps, finish), the chunked
programs of :mod:`p2l_jax.solvers.resumable`, the sharded bodies of :mod:`p2l_jax.pipeline`
and the settings sweep (:func:`sweep_whole`, a vmap of :func:`run_whole` over settings).
Their arguments are the static :class:`~p2l_jax.solvers.configs.Structure` and the settings
pytree of arrays (:func:`p2l_jax.solvers.configs.split`): another setting compiles nothing.

Per step i (0-based) the scan feeds t_i, ab_t = alpha_bar_{t_i}, ab_p (the previous DDIM
timestep's alpha_bar, or the final alpha), rho_i (the settings' (N,) schedule) and the
projection flag ((i + 1) % project_every == 0, computed here from the traced period) to the
solver's ``step`` (:mod:`p2l_jax.solvers.common`). Schedule values come from the model's
scheduler config (diffusers DDIM rules).

Chunks: when k does not divide N the per-step inputs are padded to ``ceil(N/k) k`` steps and
the padded steps are skipped by a ``lax.cond`` (state unchanged, NaN records, cut off), so
every chunk runs the same program; ``advance`` takes the chunk's first step as an array. Step
i sees the same inputs and the same noise (fold_in(key_b, 1 + i)) whichever chunk runs it.

The result: the images are D(z_0), the decoded final latent after the last DDIM update, as
diffusers' pipelines and the PSLD / P2L reference code return (not D of the last step's
Tweedie estimate z0hat).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p2l_jax.jit import jit
from p2l_jax.metrics import measurement_residual
from p2l_jax.solvers.common import Problem, State, StepInput, initial_latents
from p2l_jax.solvers.configs import Structure, build_optimizer
from p2l_jax.solvers.prompt_space import prompt_start
from p2l_jax.solvers.registry import solver_of


class SolveResult(NamedTuple):
    """images (B, H, W, 3) = D(z_0); latents (B, h, w, c) = z_0; embedding (B, 77, d) = the
    final C; residual and prompt_loss (B, N) per step and sample (r at that step's z0hat;
    prompt_loss NaN where no prompt is tuned, residual NaN without a measurement);
    residual_final (B,) = ||y - A D(z_0)|| (NaN without a measurement)."""

    images: jax.Array
    latents: jax.Array
    embedding: jax.Array
    residual: jax.Array
    prompt_loss: jax.Array
    residual_final: jax.Array


class Carry(NamedTuple):
    """The in-flight sampler: the scan state and the (B, ceil(N/k) k) per-step records."""

    state: State
    residual: jax.Array
    prompt_loss: jax.Array


def padded_steps(num_steps: int, k: int) -> int:
    return -(-num_steps // k) * k


def _network_fns(model, structure: Structure):
    eps = lambda m, z, t, C: m.eps(z, t, C)
    decode = lambda m, z: m.decode(z)
    if getattr(structure, "clip_decoded", False):
        decode = lambda m, z: jnp.clip(m.decode(z), -1.0, 1.0)
    if getattr(structure, "remat", False):
        eps, decode = jax.checkpoint(eps), jax.checkpoint(decode)
    return functools.partial(eps, model), functools.partial(decode, model)


def guided_eps(eps, C_neg, w):
    """Classifier-free guidance: eps_w(z, t, C) = eps(z, t, C_neg) + w (eps(z, t, C) -
    eps(z, t, C_neg)), both branches in one doubled batch."""

    def guided(z, t, C):
        t2 = jnp.concatenate([t, t]) if jnp.ndim(t) else t
        both = eps(jnp.concatenate([z, z]), t2, jnp.concatenate([C_neg, C]))
        neg, pos = jnp.split(both, 2)
        return neg + w * (pos - neg)

    return guided


def make_problem(model, operator, y, keys, structure: Structure, settings, C_neg=None) -> Problem:
    """The :class:`Problem` of a run (call inside a jitted function). With guidance on,
    ``problem.eps`` is the guided prediction, so every solver step and prompt objective sees
    the same eps."""
    eps, decode = _network_fns(model, structure)
    kind = getattr(structure, "optimizer", None)
    optimizer = None if kind is None else build_optimizer(kind, settings["optimizer"])
    if C_neg is not None:
        C_neg = jnp.broadcast_to(C_neg, (keys.shape[0],) + C_neg.shape[1:])
    if getattr(structure, "guidance", False):
        eps = guided_eps(eps, C_neg, settings["guidance_scale"])
    return Problem(model=model, operator=operator, y=y, keys=keys, structure=structure,
                   settings=settings, optimizer=optimizer, eps=eps, decode=decode, C_neg=C_neg)


def step_inputs(model, structure: Structure, settings, k: int) -> StepInput:
    """The scanned per-step inputs, padded to a multiple of k steps: indices continue past N
    (the skip test), the other inputs repeat the last step's (finite, never used)."""
    n = structure.num_steps
    pad = padded_steps(n, k) - n
    extend = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad)]) if pad else a
    sched = model.schedule
    ab_t, ab_p = sched.alpha_bar_pairs(n)
    index = jnp.arange(n + pad, dtype=jnp.int32)
    rho = settings.get("rho", jnp.zeros(n, jnp.float32))
    if getattr(structure, "projection", "none") == "none":
        project = jnp.zeros(n + pad, bool)
    else:
        project = (index + 1) % settings["project_every"] == 0
    return StepInput(index, extend(jnp.asarray(sched.timesteps(n).astype(np.int32))),
                     extend(jnp.asarray(ab_t)), extend(jnp.asarray(ab_p)), extend(rho), project)


def initial_state(problem: Problem, C0, latent_shape) -> State:
    """z_T and (C_0, S_0) from the starting prompt variable C0 (the embedding, or the token
    embeddings e_0 with ``prompt_space="tokens"``: :mod:`p2l_jax.solvers.prompt_space`)."""
    z_T = initial_latents(problem.keys, latent_shape)
    return State(z_T, *prompt_start(problem, C0))


def start(model, operator, y, keys, C0, C_neg, settings, *, structure: Structure,
          latent_shape, k: int) -> Carry:
    """The carry before step 0: z_T, C0, the optimizer state (holding its numbers), NaNs."""
    state = initial_state(make_problem(model, operator, y, keys, structure, settings, C_neg),
                          C0, latent_shape)
    nan = jnp.full((keys.shape[0], padded_steps(structure.num_steps, k)), jnp.nan, jnp.float32)
    return Carry(state, nan, nan)


def advance(model, operator, y, keys, C_neg, settings, carry: Carry, first, *,
            structure: Structure, k: int) -> Carry:
    """Steps first .. first + k - 1 of the scan (those >= N skipped)."""
    problem = make_problem(model, operator, y, keys, structure, settings, C_neg)
    step = solver_of(structure.solver).step
    n = structure.num_steps
    inputs = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, first, k),
                                    step_inputs(model, structure, settings, k))

    def body(state, inp):
        run = lambda s: step(problem, s, inp)
        if n % k == 0:
            return run(state)
        nan = lambda r: jnp.full(r.shape, jnp.nan, r.dtype)
        skip = lambda s: (s, jax.tree_util.tree_map(nan, jax.eval_shape(run, s)[1]))
        return jax.lax.cond(inp.index < n, run, skip, state)

    state, records = jax.lax.scan(body, carry.state, inputs)
    put = lambda buf, r: jax.lax.dynamic_update_slice_in_dim(buf, r.T.astype(buf.dtype),
                                                             first, axis=1)
    return Carry(state, put(carry.residual, records.residual),
                 put(carry.prompt_loss, records.prompt_loss))


def finish(model, operator, y, carry: Carry, *, structure: Structure) -> SolveResult:
    """The result of a finished carry: D(z_0), z_0, C and the first N records."""
    s, n = carry.state, structure.num_steps
    images = model.decode(s.z)
    final = (measurement_residual(operator, images, y) if y is not None and operator is not None
             else jnp.full(s.z.shape[:1], jnp.nan, jnp.float32))
    return SolveResult(images, s.z, s.C, carry.residual[:, :n], carry.prompt_loss[:, :n], final)


def run_whole(model, operator, y, keys, C0, C_neg, settings, *, structure: Structure,
              latent_shape) -> SolveResult:
    """A whole run in one program: start, one scan over all N steps, finish."""
    n = structure.num_steps
    carry = start(model, operator, y, keys, C0, C_neg, settings, structure=structure,
                  latent_shape=latent_shape, k=n)
    carry = advance(model, operator, y, keys, C_neg, settings, carry, 0, structure=structure,
                    k=n)
    return finish(model, operator, y, carry, structure=structure)


def sweep_whole(model, operator, y, keys, C0, C_neg, settings, *, structure: Structure,
                latent_shape, varying: tuple[bool, ...], batched: bool = True) -> SolveResult:
    """:func:`run_whole` at P points: the settings leaves flagged in ``varying`` (flattened
    order) carry a leading axis P, the others are shared. ``batched``: ``vmap`` over the
    points (they run as one P-times bigger batch; numbers equal separate solves up to
    float32's batch-size rounding), else ``lax.map`` (one point after the other, each with a
    solve's shapes: the same numbers as separate solves). Results (P, B, ...). Traceable
    anywhere, e.g. inside a shard_map body (then each shard runs all P points)."""
    leaves, treedef = jax.tree_util.tree_flatten(settings)

    def one(point):  # point: the varying leaves of one point
        it = iter(point)
        s = jax.tree_util.tree_unflatten(treedef, [next(it) if v else leaf
                                                   for leaf, v in zip(leaves, varying)])
        return run_whole(model, operator, y, keys, C0, C_neg, s, structure=structure,
                         latent_shape=latent_shape)

    points = [leaf for leaf, v in zip(leaves, varying) if v]
    return jax.vmap(one)(points) if batched else jax.lax.map(one, points)


# The compiled programs: one per (structure, shapes), whatever the settings.
solve_prepared = jit(run_whole, static_argnames=("structure", "latent_shape"))
solve_prepared.__doc__ = """The one-scan program behind ``solve``: arguments as
:func:`p2l_jax.solvers.driver.prepare` returns them. Public so benchmarks can
``.lower(...).compile()`` it and read XLA's cost and memory analyses of what ``solve`` runs."""
jit_start = jit(start, static_argnames=("structure", "latent_shape", "k"))
jit_advance = jit(advance, static_argnames=("structure", "k"), donate_argnames=("carry",))
jit_finish = jit(finish, static_argnames=("structure",))
sweep_prepared = jit(sweep_whole,
                     static_argnames=("structure", "latent_shape", "varying", "batched"))
_PROGRAMS = (solve_prepared, jit_start, jit_advance, jit_finish, sweep_prepared)


def compiled_programs() -> int:
    """How many solver programs (one-scan, chunked, sweep) this process has compiled."""
    return sum(f._cache_size() for f in _PROGRAMS)
