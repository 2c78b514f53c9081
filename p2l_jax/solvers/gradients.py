"""Gradient variants: how a guided step gets eps, z0hat, the latent gradient g_z and the
tuned prompt C*. Selected by name through ``VARIANTS``; adding one is one function here.

Signature of every variant::

    variant(problem, state, inp, objective, tune: bool, K: int) -> GradientResult

``objective(z0hat) -> (loss (B,), r (B,))`` is the solver's per-sample latent loss (r for
LDPS/P2L, plus the GML-DPS / PSLD terms) and the residual r = ||y - A D(z0hat)||. Each loss is
a per-sample sum, so the gradients of sample b depend on sample b alone.

* ``full`` [paper]: prompt tuning (K alternating steps, at stopgrad(z_t)), then
  eps = eps_theta(z_t, t, C*), g_z = grad_{z_t} loss(z0hat(z_t, C*)) through UNet and decoder.
* ``no_unet_jacobian``: eps treated as constant, so dz0hat/dz_t = 1/sqrt(ab_t) and
  g_z = grad_{z0hat} loss / sqrt(ab_t): no UNet backward pass.
* ``joint``: one forward and one backward at (z_t, C) give g_z and g_C together (simultaneous
  rather than alternating updates); g_C = 2 r / n * grad_C r by the chain rule, which holds
  because P2L's objective is r. eps (for the DDIM step) is the one at the un-updated C.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from p2l_jax.schedule import tweedie
from p2l_jax.solvers.common import prompt_loss_from_residual, prompt_update
from p2l_jax.solvers.prompt_objectives import in_window, tune_prompt


class GradientResult(NamedTuple):
    """eps and z0hat for the DDIM step; g_z; tuned (C, S); the prompt loss before tuning
    (B,) (NaN without tuning); the last prompt gradient g_C; r at the g_z point (B,)."""

    eps: jax.Array
    z0hat: jax.Array
    g_z: jax.Array
    C: jax.Array
    opt_state: Any
    prompt_loss: jax.Array
    g_C: jax.Array
    residual: jax.Array


def _no_tuning(state):
    nan = jnp.full(state.z.shape[:1], jnp.nan, jnp.float32)
    return state.C, state.opt_state, nan, jnp.zeros_like(state.C)


def _maybe_tune(problem, state, inp, tune, K):
    if not tune:
        return _no_tuning(state)
    return tune_prompt(problem, state.z, inp, state.C, state.opt_state, K)


def full(problem, state, inp, objective, tune, K) -> GradientResult:
    C, S, ploss, g_C = _maybe_tune(problem, state, inp, tune, K)

    def loss_of_z(z):
        eps = problem.eps(z, inp.t, C)
        z0hat = tweedie(z, eps, inp.ab_t)
        loss, r = objective(z0hat)
        return loss.sum(), (eps, z0hat, r)

    g_z, (eps, z0hat, r) = jax.grad(loss_of_z, has_aux=True)(state.z)
    return GradientResult(eps, z0hat, g_z, C, S, ploss, g_C, r)


def no_unet_jacobian(problem, state, inp, objective, tune, K) -> GradientResult:
    C, S, ploss, g_C = _maybe_tune(problem, state, inp, tune, K)
    eps = jax.lax.stop_gradient(problem.eps(state.z, inp.t, C))
    z0hat = tweedie(state.z, eps, inp.ab_t)
    g_0, r = jax.grad(lambda z0: (lambda l, r: (l.sum(), r))(*objective(z0)), has_aux=True)(z0hat)
    return GradientResult(eps, z0hat, g_0 / jnp.sqrt(inp.ab_t), C, S, ploss, g_C, r)


def joint(problem, state, inp, objective, tune, K) -> GradientResult:
    if not tune:
        return full(problem, state, inp, objective, tune, K)

    def loss_of(z, C):
        eps = problem.eps(z, inp.t, C)
        z0hat = tweedie(z, eps, inp.ab_t)
        loss, r = objective(z0hat)
        return loss.sum(), (eps, z0hat, r)

    (g_z, g_Cr), (eps, z0hat, r) = jax.grad(loss_of, argnums=(0, 1), has_aux=True)(
        state.z, state.C)
    ploss = prompt_loss_from_residual(problem, r)
    n = problem.y[0].size
    g_C = (2.0 * r / n)[:, None, None] * g_Cr
    C, S = prompt_update(problem, g_C, state.C, state.opt_state)
    on = in_window(problem, inp.index)  # outside the tuning window: C, S unchanged
    C, S, ploss = jax.tree_util.tree_map(lambda new, old: jnp.where(on, new, old),
                                         (C, S, ploss), (state.C, state.opt_state,
                                                         jnp.full_like(ploss, jnp.nan)))
    return GradientResult(eps, z0hat, g_z, C, S, ploss, g_C, r)


#: name -> variant function. Register a new variant by adding it here.
VARIANTS: dict[str, Callable[..., GradientResult]] = {
    "full": full,
    "no_unet_jacobian": no_unet_jacobian,
    "joint": joint,
}
