"""Pieces every solver shares: the step interface, data fidelity, prompt tuning, projection
and the DDIM transition. Symbols follow docs/algorithm.md.

A solver is one function with the signature (k-diffusion style)::

    step(problem: Problem, state: State, inp: StepInput) -> (State, StepRecord)

run by the single ``lax.scan`` of :mod:`p2l_jax.solvers.program`. A step reads the program's
shape from ``problem.structure`` (static) and every number from ``problem.settings`` (arrays;
see :func:`p2l_jax.solvers.configs.split`). Tweedie and the DDIM update live in
:mod:`p2l_jax.schedule`; the data fidelity r, the prompt update, the projection and the DDIM
transition with the latent gradient step live here, once.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from p2l_jax.schedule import ddim_update, eps_from_x0, tweedie


class Problem(NamedTuple):
    """Everything a step needs that does not change across steps (built inside the jit).

    ``eps(z, t, C)`` and ``decode(z)`` are the model's networks, rematerialized when the
    structure asks; ``keys`` are the per-sample PRNG keys (B,); ``y`` the measurement;
    ``structure`` the static :class:`~p2l_jax.solvers.configs.Structure`, ``settings`` the
    numbers (a dict of arrays); ``optimizer`` built from them.
    """

    model: Any
    operator: Any
    y: jax.Array | None
    keys: jax.Array
    structure: Any
    settings: dict
    optimizer: optax.GradientTransformation | None
    eps: Callable
    decode: Callable
    C_neg: jax.Array | None = None


class State(NamedTuple):
    """The scan carry: z_t (B, h, w, c), C (B, 77, d), optimizer state S."""

    z: jax.Array
    C: jax.Array
    opt_state: Any


class StepInput(NamedTuple):
    """Per-step scanned inputs: step index i, timestep t, ab_t, ab_p, rho_t, project flag."""

    index: jax.Array
    t: jax.Array
    ab_t: jax.Array
    ab_p: jax.Array
    rho: jax.Array
    project: jax.Array


class StepRecord(NamedTuple):
    """Per-step, per-sample scalars: r = ||y - A D(z0hat)|| and the prompt loss r^2 / n."""

    residual: jax.Array
    prompt_loss: jax.Array


# ---- randomness ------------------------------------------------------------------------
#: Stream ids folded into each sample's key: z_T uses stream 0, step i's DDIM noise 1 + i.
INITIAL_NOISE_STREAM = 0


def sample_noise(keys: jax.Array, stream, shape: tuple[int, ...]) -> jax.Array:
    """N(0, I) of shape (B, *shape), sample b's from fold_in(keys[b], stream) alone."""
    draw = lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape, jnp.float32)
    return jax.vmap(draw)(keys)


def initial_latents(keys: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
    """z_T ~ N(0, I), (B, h, w, c)."""
    return sample_noise(keys, INITIAL_NOISE_STREAM, latent_shape)


def step_noise(keys: jax.Array, index, latent_shape: tuple[int, ...]) -> jax.Array:
    """The DDIM noise of step index i, (B, h, w, c) (scaled by sigma_t, 0 when eta = 0)."""
    return sample_noise(keys, 1 + index, latent_shape)


# ---- data fidelity ---------------------------------------------------------------------
def _per_sample_sum(a: jax.Array) -> jax.Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def residual(problem: Problem, x: jax.Array) -> jax.Array:
    """r = ||y - A x||_2 per sample (B,), unsquared as in DPS."""
    d = problem.y - problem.operator.forward(x)
    return jnp.sqrt(_per_sample_sum(d * d))


def prompt_loss_from_residual(problem: Problem, r: jax.Array) -> jax.Array:
    """The prompt loss: r^2 / n, the squared residual's mean over the n measurement entries."""
    n = problem.y[0].size
    return r * r / n


def latent_norm(a: jax.Array) -> jax.Array:
    """||a||_2 per sample (B,)."""
    return jnp.sqrt(_per_sample_sum(a * a))


def glue(problem: Problem, x: jax.Array) -> jax.Array:
    """PSLD's gluing: A^T y + (I - A^T A) x (measured part from y, the rest from x)."""
    op = problem.operator
    return op.adjoint(problem.y) + x - op.adjoint(op.forward(x))


# ---- prompt tuning ---------------------------------------------------------------------
def prompt_update(problem: Problem, g_C, C, opt_state):
    """(C, S) <- optax update, vmapped over samples so any optimizer stays per-sample."""

    def one(g, s, c):
        updates, s = problem.optimizer.update(g, s, c)
        return optax.apply_updates(c, updates), s

    return jax.vmap(one)(g_C, opt_state, C)


def prompt_init(problem: Problem, C):
    """Per-sample optimizer state S for C (B, 77, d)."""
    return jax.vmap(problem.optimizer.init)(C)


# ---- projection and transition ---------------------------------------------------------
def project_to_encoder_range(problem: Problem, z_t, ab_t, z0hat, eps, enabled):
    """P2L step 4, when ``enabled`` (a traced bool): x* from D(z0hat), z0hat <- E(x*),
    eps <- (z_t - sqrt(ab_t) z0hat) / sqrt(1 - ab_t).

    ``structure.projection`` "prox": x* = argmin_x ||y - A x||^2 + lam ||x - D(z0hat)||^2 (the
    operator's prox, lam from the settings); "glue": x* = A^T y + (I - A^T A) D(z0hat);
    "none" (and solvers without a projection): unchanged. Under a vmap whose ``enabled`` is
    batched (a sweep over ``project_every``) the ``lax.cond`` becomes a select: both branches
    run every step.
    """
    mode = getattr(problem.structure, "projection", "none")
    if mode == "none":
        return z0hat, eps

    def project(args):
        z0hat, _ = args
        x = problem.decode(jax.lax.stop_gradient(z0hat))  # clipped if the structure says
        x_star = (problem.operator.prox(x, problem.y, problem.settings["lam"]) if mode == "prox"
                  else glue(problem, x))
        z0_new = problem.model.encode(x_star)
        return z0_new, eps_from_x0(z_t, z0_new, ab_t)

    return jax.lax.cond(enabled, project, lambda args: args, (z0hat, eps))


def ddim_transition(problem: Problem, state: State, inp: StepInput, z0hat, eps, g_z=None):
    """P2L step 5: DDIM update to ab_p with this step's per-sample noise, then
    z_prev <- z_prev - rho_t g_z. Returns the next State's z.

    The noise is drawn whatever eta is (eta is data): sigma_t = 0 at eta = 0 scales it away
    and adds exactly zero, so deterministic DDIM keeps its values."""
    noise = step_noise(problem.keys, inp.index, state.z.shape[1:])
    z_prev = ddim_update(z0hat, eps, inp.ab_t, inp.ab_p, problem.settings["eta"], noise)
    if g_z is not None:
        z_prev = z_prev - inp.rho * g_z
    return z_prev
