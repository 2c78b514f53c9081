"""PSLD (Rout et al. 2023): LDPS whose latent loss adds the gluing term,
loss = omega r + gamma || E(A^T y + (I - A^T A) D(z0hat)) - z0hat ||."""

from __future__ import annotations

from p2l_jax.solvers.common import Problem, State, StepInput, glue, latent_norm, residual
from p2l_jax.solvers.guided import guided_step


def step(problem: Problem, state: State, inp: StepInput):
    omega, gamma = problem.settings["omega"], problem.settings["gamma"]

    def objective(z0hat):
        x = problem.decode(z0hat)
        r = residual(problem, x)
        return omega * r + gamma * latent_norm(problem.model.encode(glue(problem, x))
                                                       - z0hat), r

    return guided_step(problem, state, inp, objective)
