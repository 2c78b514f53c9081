"""DPS, diffusion posterior sampling (Chung, Kim, Mccann, Klasky, Ye; ICLR 2023), Algorithm 1.

One reverse step at timestep t (x_t the diffused variable: the image for a pixel-space model
loaded by :mod:`p2l_jax.pixel_model`, where D = E = identity; the latent otherwise):

    eps    = eps_theta(x_t, t)
    x0hat  = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)                           (Tweedie)
    x'     = DDIM(x0hat, eps; eta) to ab_p                   (eta = 1: the ancestral DDPM step)
    r      = ||y - A D(x0hat)||_2
    x_prev = x' - zeta_t grad_{x_t} r^2,     zeta_t = zeta' / r                 (per sample)

The gradient runs through the UNet (and the decoder, for a latent model) to x_t, as in the
paper. Since zeta_t is a number computed at the current point (not differentiated),
zeta_t grad r^2 = 2 zeta' grad r: the official code's ``x_t -= scale * grad ||y - A x0hat||``
is this rule with zeta' = scale / 2 (its configs: scale 0.3 for SR x4 and Gaussian deblur, 0.5
for inpainting; 1.0 when unset). Where r = 0 the correction is zero (0/0 avoided).
The norm is per sample (the official code takes one norm over its batch of one). x0hat is
not clipped, as in Algorithm 1 (the official code clips it to [-1, 1] inside its DDPM mean).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from p2l_jax.errors import P2LError
from p2l_jax.solvers.common import (Problem, State, StepInput, StepRecord, ddim_transition,
                                    residual)
from p2l_jax.solvers.configs import setting
from p2l_jax.solvers.gradients import VARIANTS


@dataclasses.dataclass(frozen=True)
class DPSConfig:
    """DPS (module docstring), run by the one driver like every solver.

    Attributes:
      num_steps: reverse steps N [paper: 1000].
      eta: DDIM stochasticity [paper: 1, the ancestral DDPM sampler DPS is written with; DDIM
        with eta 1 has the DDPM posterior's mean and variance (beta-tilde) on any timestep
        subsequence. The paper's ImageNet/FFHQ networks learn their variance; these do not].
      zeta: zeta' of zeta_t = zeta' / ||y - A x0hat|| [the rule is the paper's; the value 1.0
        is [ours], said to be the paper's for most tasks but not checked against its text
        here; the official code's configs correspond to zeta' 0.15 (SR x4, Gaussian deblur)
        and 0.25 (inpainting), see the module docstring; benchmarks.pixel_vs_latent chooses
        it on the validation split].
      prompt: text whose embedding conditions a latent model [ours: the null prompt ""];
        ignored by a pixel-space model.
      gradient: "full" (through the UNet, the paper's) or "no_unet_jacobian"
        (p2l_jax.solvers.gradients); "joint" has no prompt to tune here and equals "full".
      remat: rematerialize (jax.checkpoint) the networks inside the gradient.
    """

    num_steps: int = 1000
    eta: float = setting(1.0)
    zeta: float = setting(1.0)
    prompt: str = ""
    gradient: str = "full"
    remat: bool = False

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise P2LError(f"option num_steps={self.num_steps!r} must be a positive int")
        if not 0.0 <= self.eta <= 1.0:
            raise P2LError(f"option eta={self.eta} must be in [0, 1]")
        if not (isinstance(self.zeta, (int, float)) and self.zeta >= 0):
            raise P2LError(f"option zeta={self.zeta!r} must be a number >= 0")
        if not isinstance(self.prompt, str):
            raise P2LError(f"option prompt={self.prompt!r} must be a string")
        if self.gradient not in VARIANTS:
            raise P2LError(f"option gradient={self.gradient!r} is not one of {sorted(VARIANTS)}")


def step(problem: Problem, state: State, inp: StepInput):
    """One DPS step (module docstring); the prompt C is never tuned."""

    def objective(z0hat):  # loss r^2 (per sample), and r for the record and zeta_t
        r = residual(problem, problem.decode(z0hat))
        return r * r, r

    g = VARIANTS[problem.structure.gradient](problem, state, inp, objective, False, 1)
    r = g.residual
    zeta_t = jnp.where(r > 0, problem.settings["zeta"] / jnp.where(r > 0, r, 1.0), 0.0)
    z_prev = ddim_transition(problem, state, inp, g.z0hat, g.eps)
    z_prev = z_prev - zeta_t[:, None, None, None] * g.g_z
    return State(z_prev, g.C, g.opt_state), StepRecord(r, g.prompt_loss)
