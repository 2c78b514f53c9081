"""Plain DDIM sampling with classifier-free guidance (no measurement), to check a model:

    eps = eps(z_t, C_neg) + w (eps(z_t, C) - eps(z_t, C_neg)),  z0hat = Tweedie,
    z_prev = DDIM(z0hat, eps).

If a measurement is given, the residual r = ||y - A D(z0hat)|| is recorded (not used).
"""

from __future__ import annotations

import jax.numpy as jnp

from p2l_jax.schedule import tweedie
from p2l_jax.solvers.common import (Problem, State, StepInput, StepRecord, ddim_transition,
                                    residual)


def step(problem: Problem, state: State, inp: StepInput):
    z, C = state.z, state.C
    eps = problem.eps(z, inp.t, C)  # guided when guidance_scale != 1 (program.make_problem)
    z0hat = tweedie(z, eps, inp.ab_t)
    z_prev = ddim_transition(problem, state, inp, z0hat, eps)
    nan = jnp.full(z.shape[:1], jnp.nan, jnp.float32)
    r = residual(problem, problem.decode(z0hat)) if problem.y is not None else nan
    return State(z_prev, C, state.opt_state), StepRecord(r, nan)
