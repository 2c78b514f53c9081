"""GML-DPS: LDPS whose latent loss adds the autoencoder-consistency ("goodness modulated")
term, loss = r + gamma_ae || z0hat - E(D(z0hat)) ||  (flash-diffusion's GML_DPS)."""

from __future__ import annotations

from p2l_jax.solvers.common import Problem, State, StepInput, latent_norm, residual
from p2l_jax.solvers.guided import guided_step


def step(problem: Problem, state: State, inp: StepInput):
    gamma_ae = problem.settings["gamma_ae"]

    def objective(z0hat):
        x = problem.decode(z0hat)
        r = residual(problem, x)
        return r + gamma_ae * latent_norm(z0hat - problem.model.encode(x)), r

    return guided_step(problem, state, inp, objective)
