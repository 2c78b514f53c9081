"""The guided reverse step shared by P2L, LDPS, GML-DPS and PSLD (docs/algorithm.md):

    1.-3. (C*, S), eps, z0hat, g_z       <- the configured gradient variant (gradients.py)
    4.    z0hat, eps <- projection onto the encoder's range (P2L only, every project_every
          steps)
    5.    z_prev = DDIM(z0hat, eps) - rho_t g_z

The solvers differ only in their latent objective, whether they tune C, and the projection.
"""

from __future__ import annotations

from p2l_jax.solvers.common import (Problem, State, StepInput, StepRecord, ddim_transition,
                                    project_to_encoder_range, residual)
from p2l_jax.solvers.gradients import VARIANTS


def guided_step(problem: Problem, state: State, inp: StepInput, objective):
    """One guided step; ``objective(z0hat) -> (loss (B,), r (B,))`` is the solver's loss.
    Prompt tuning (``tune_prompt``, ``K``) and the projection follow the structure."""
    s = problem.structure
    tune = getattr(s, "tune_prompt", False)
    g = VARIANTS[s.gradient](problem, state, inp, objective, tune, getattr(s, "K", 1))
    z0hat, eps = project_to_encoder_range(problem, state.z, inp.ab_t, g.z0hat, g.eps, inp.project)
    z_prev = ddim_transition(problem, state, inp, z0hat, eps, g.g_z)
    return State(z_prev, g.C, g.opt_state), StepRecord(g.residual, g.prompt_loss)


def fidelity_objective(problem: Problem):
    """The plain objective r(z0hat) = ||y - A D(z0hat)|| (LDPS, P2L)."""

    def objective(z0hat):
        r = residual(problem, problem.decode(z0hat))
        return r, r

    return objective
