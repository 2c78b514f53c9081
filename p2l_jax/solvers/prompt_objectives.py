"""P2L's step 1, prompt tuning: the loss L(C) it descends (selected by the config's
``prompt_objective`` name; adding one is a function here and a line in ``OBJECTIVES``), the
window of steps where it runs, and the K optimizer updates per step.

Signature of every objective::

    objective(problem, z_t, inp, C) -> loss (B,)

z_t is the current latent (the objectives stop its gradient), ``inp`` the step's inputs (step
index, t, ab_t), C the embedding (B, 77, d). Each loss is per sample, so sample b's gradient
in C depends on sample b alone. n is the number of measurement entries; sg is stop-gradient.

* ``tweedie`` [paper]: the residual of the one-step Tweedie estimate,
      L(C) = ||y - A D(z0hat(sg(z_t), C))||^2 / n.
  It depends on C through one network call at the current (often very noisy) z_t.
* ``renoised`` [ours]: the same residual averaged over M fresh noisings of the current clean
  estimate at the current noise level, so that C is judged on several noisy versions rather
  than on the one z_t the trajectory happens to be at:
      z0 = sg(z0hat(z_t, C)),  z_m = sqrt(ab_t) z0 + sqrt(1 - ab_t) xi_m,
      L(C) = (1/M) sum_m ||y - A D(z0hat(z_m, C))||^2 / n.
* ``marginal`` [ours, after LATINO-PRO's marginal-likelihood prompt update]: a stochastic
  estimate of -log p(y | C) descended through Fisher's identity
      grad_C log p(y | C) = E_{z0 ~ p(z0 | y, C)} [ grad_C log p(z0 | C) ],
  with one approximate posterior sample z0 = sg(E(prox(D(z0hat(z_t, C)), y, lam))) (the
  current estimate made consistent with y by the operator's prox, lam from the settings) and
  -log p(z0 | C) replaced by its denoising score-matching bound at M random timesteps:
      z_m = sqrt(ab_{s_m}) z0 + sqrt(1 - ab_{s_m}) xi_m,  s_m ~ U{0, ..., T - 1},
      L(C) = (1/M) sum_m ||eps_theta(z_m, s_m, C) - xi_m||^2 / dim(z).
  Unlike the residual objectives it asks which caption makes y's likely images likely, not
  which caption makes one denoising step land on y.

In which variable (structure ``prompt_space``, :mod:`p2l_jax.solvers.prompt_space`): the
objectives read C; :func:`tune_prompt` descends them in C itself [paper] or in the text
encoder's input token embeddings e with C = T(e) [ours].

Where in the schedule (settings ``tune_start``, ``tune_stop``, fractions of the run [ours]):
step i tunes when tune_start <= i / N < tune_stop; (0, 1) is every step (the paper), (0, f)
the first, noisiest fraction f, (w, 1) a warm-up of w N steps without tuning. Outside the
window C and the optimizer state pass through unchanged.

The draws xi_m and s_m come from the sample's own key, folded with the step index and m
(streams apart from z_T's and the DDIM noise), so they never depend on the batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from p2l_jax.schedule import tweedie
from p2l_jax.solvers import prompt_space
from p2l_jax.solvers.common import Problem, prompt_loss_from_residual, prompt_update, residual

#: Stream folded into a sample's key for prompt-objective draws (z_T uses 0, step i's DDIM
#: noise 1 + i; step counts stay far below this).
PROMPT_DRAW_STREAM = 1 << 30


def _draw_keys(problem: Problem, index, m: int) -> jax.Array:
    fold = lambda k: jax.random.fold_in(jax.random.fold_in(
        jax.random.fold_in(k, PROMPT_DRAW_STREAM), index), m)
    return jax.vmap(fold)(problem.keys)


def _normal_like(keys, a):
    return jax.vmap(lambda k: jax.random.normal(k, a.shape[1:], jnp.float32))(keys)


def _bcast(v):
    return jnp.reshape(v, (-1, 1, 1, 1))


def tweedie_residual(problem: Problem, z_t, inp, C):
    z_t = jax.lax.stop_gradient(z_t)
    z0hat = tweedie(z_t, problem.eps(z_t, inp.t, C), inp.ab_t)
    return prompt_loss_from_residual(problem, residual(problem, problem.decode(z0hat)))


def renoised_residual(problem: Problem, z_t, inp, C):
    z_t = jax.lax.stop_gradient(z_t)
    z0 = jax.lax.stop_gradient(tweedie(z_t, problem.eps(z_t, inp.t, C), inp.ab_t))
    total = 0.0
    for m in range(problem.structure.prompt_draws):
        xi = _normal_like(_draw_keys(problem, inp.index, m), z0)
        z_m = jnp.sqrt(inp.ab_t) * z0 + jnp.sqrt(1.0 - inp.ab_t) * xi
        z0hat = tweedie(z_m, problem.eps(z_m, inp.t, C), inp.ab_t)
        total = total + prompt_loss_from_residual(problem, residual(problem,
                                                                    problem.decode(z0hat)))
    return total / problem.structure.prompt_draws


def marginal_likelihood(problem: Problem, z_t, inp, C):
    z_t = jax.lax.stop_gradient(z_t)
    z0hat = tweedie(z_t, problem.eps(z_t, inp.t, C), inp.ab_t)
    x = problem.decode(jax.lax.stop_gradient(z0hat))
    z0 = jax.lax.stop_gradient(problem.model.encode(
        problem.operator.prox(x, problem.y, problem.settings["lam"])))
    alpha_bar = jnp.asarray(problem.model.schedule.alphas_cumprod())
    total = 0.0
    for m in range(problem.structure.prompt_draws):
        keys = _draw_keys(problem, inp.index, m)
        s = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (),
                                                  0, alpha_bar.shape[0]))(keys)
        ab = _bcast(alpha_bar[s])
        xi = _normal_like(keys, z0)
        z_m = jnp.sqrt(ab) * z0 + jnp.sqrt(1.0 - ab) * xi
        d = problem.eps(z_m, s, C) - xi
        total = total + jnp.mean(d.reshape(d.shape[0], -1) ** 2, axis=1)
    return total / problem.structure.prompt_draws


#: name -> objective. Register a new one by adding it here.
OBJECTIVES: dict[str, Callable] = {
    "tweedie": tweedie_residual,
    "renoised": renoised_residual,
    "marginal": marginal_likelihood,
}


def in_window(problem: Problem, index) -> jax.Array:
    """Whether step ``index`` tunes the prompt: tune_start <= index / N < tune_stop."""
    frac = index / problem.structure.num_steps
    return (frac >= problem.settings["tune_start"]) & (frac < problem.settings["tune_stop"])


def tune_prompt(problem: Problem, z_t, inp, C, opt_state, K: int):
    """P2L step 1 inside the window: K times g_v = grad_v sum_b L_b(C(v)); (v, S) = optax
    update, v the tuned variable of the prompt space (C itself, or the token embeddings e with
    C = T(e): :mod:`p2l_jax.solvers.prompt_space`). Outside it, C and S unchanged and the
    losses NaN.

    Returns (C*, S, loss before the first update (B,), last gradient g_v).
    """
    objective = OBJECTIVES[problem.structure.prompt_objective]
    to_C = prompt_space.to_embedding(problem)

    def total(v):
        loss = objective(problem, z_t, inp, to_C(v))
        return loss.sum(), loss

    def one(carry, _):
        v, S = carry
        g, loss = jax.grad(total, has_aux=True)(v)
        v, S = prompt_update(problem, g, v, S)
        return (v, S), (loss, g)

    def tune(args):
        v, S = prompt_space.variable(problem, *args)
        (v, S), (losses, grads) = jax.lax.scan(one, (v, S), None, length=K)
        return (*prompt_space.carried(problem, v, S), losses[0], grads[-1])

    def skip(args):
        C, S = args
        return C, S, jnp.full(C.shape[:1], jnp.nan, jnp.float32), jnp.zeros_like(C)

    return jax.lax.cond(in_window(problem, inp.index), tune, skip, (C, opt_state))
