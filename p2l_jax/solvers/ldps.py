"""Latent DPS: eps = eps_theta(z_t, t, C) with the fixed (null) embedding, Tweedie,
g_z = grad_{z_t} ||y - A D(z0hat)||, z_prev = DDIM(z0hat, eps) - rho_t g_z."""

from __future__ import annotations

from p2l_jax.solvers.common import Problem, State, StepInput
from p2l_jax.solvers.guided import fidelity_objective, guided_step


def step(problem: Problem, state: State, inp: StepInput):
    return guided_step(problem, state, inp, fidelity_objective(problem))
