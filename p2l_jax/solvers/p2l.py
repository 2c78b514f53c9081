"""P2L (Chung et al., ICML 2024): prompt tuning, latent DPS gradient, projection onto the
encoder's range every ``project_every`` steps, DDIM. See :class:`P2LConfig` for the defaults.

Step at timestep t (carry z_t, C, S):
  1. K times: g_C = grad_C r(stopgrad(z_t), C)^2 / n; (C, S) = optimizer update (warm start).
  2. eps = eps_theta(z_t, t, C*); z0hat = (z_t - sqrt(1 - ab_t) eps) / sqrt(ab_t).
  3. g_z = grad_{z_t} r(z_t, C*), r = ||y - A D(z0hat)||.
  4. if (i + 1) % project_every == 0: x* = argmin ||y - A x||^2 + lam ||x - D(z0hat)||^2,
     z0hat <- E(x*), eps <- (z_t - sqrt(ab_t) z0hat) / sqrt(1 - ab_t).
  5. z_prev = sqrt(ab_p) z0hat + sqrt(1 - ab_p - sigma_t^2) eps + sigma_t noise - rho_t g_z.
"""

from __future__ import annotations

from p2l_jax.solvers.common import Problem, State, StepInput
from p2l_jax.solvers.guided import fidelity_objective, guided_step


def step(problem: Problem, state: State, inp: StepInput):
    return guided_step(problem, state, inp, fidelity_objective(problem))
