"""Frozen-dataclass configs of the solvers (static jit arguments; hashable).

Every default is tagged as in docs/algorithm.md: [paper] from Chung et al. 2024, [reimpl] a
public re-implementation's choice, [ours] this project's decision. All are overridable.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import optax

from p2l_jax.errors import P2LError

PROJECTIONS = ("prox", "glue", "none")

#: rho [ours]: re-implementations used 1.0 (TReg, 200 steps) and 0.05 (LATINO-PRO, 999 steps).
#: P2L's, chosen on the embedded model's validation split with the projection defaults below
#: (``python -m benchmarks.tune_defaults``, docs/RESULTS.md): rho 0.3 / 1 / 3 gave 24.0 / 23.2 /
#: 22.2 dB mean PSNR (SR x4, Gaussian deblur, box inpainting; sigma_y 0.05; 25 steps).
DEFAULT_RHO = 0.3

#: gamma and lambda of P2L's projection [ours]. Re-implementations used gamma = 8, lambda = 1.
#: Chosen on the embedded model's validation split (8 images; SR x4, Gaussian deblur, box
#: inpainting; sigma_y 0.05; 25 steps; mean PSNR; ``python -m benchmarks.tune_defaults``, see
#: docs/RESULTS.md): lambda 1 -> 0.1 -> 0.01 gave 17.1 -> 19.2 -> 20.5 dB at gamma 8, then
#: gamma 8 -> 2 -> 1 gave 20.5 -> 23.4 -> 24.0 dB. Projecting every step with a small lambda
#: is what makes P2L consistent with y at few steps; with 1000 steps the paper-era values
#: (``gamma=8, lam=1.0``) remain a reasonable override.
DEFAULT_GAMMA = 1
DEFAULT_LAM = 0.01

#: rho of the baselines without projection (LDPS, and GML-DPS / PSLD, which add one loss term
#: each) [ours]: on the same validation sweep rho 0.1 / 0.3 / 1 gave 18.0 / 15.8 / 11.7 dB
#: (0.3 was best for SR alone, 18.9 vs 17.0 dB, and far worse for deblurring and inpainting).
DEFAULT_BASELINE_RHO = 0.1


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The prompt optimizer as a hashable description; ``build()`` gives the optax transform.

    Default [reimpl]: Adam(lr = 1e-4, b1 = 0.9, b2 = 0.999, eps = 1e-8).
    ``name`` is ``adam`` or ``sgd`` (plain gradient descent, ``momentum`` optional). For any
    other optax ``GradientTransformation``, pass the transformation itself as the solver
    config's ``optimizer`` (it hashes by identity: build it once and reuse it).
    """

    name: str = "adam"
    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float | None = None

    def __post_init__(self):
        if self.name not in ("adam", "sgd"):
            raise P2LError(f"option optimizer.name={self.name!r} is not one of ('adam', 'sgd')")
        if not self.learning_rate > 0:
            raise P2LError(f"option optimizer.learning_rate={self.learning_rate} must be > 0")

    def build(self) -> optax.GradientTransformation:
        if self.name == "adam":
            return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps)
        return optax.sgd(self.learning_rate, momentum=self.momentum)


Optimizer = Union[OptimizerConfig, optax.GradientTransformation]


def build_optimizer(optimizer: Optimizer) -> optax.GradientTransformation:
    """The optax transform of a config's ``optimizer`` field (a config or a transform)."""
    if isinstance(optimizer, OptimizerConfig):
        return optimizer.build()
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    raise P2LError(f"option optimizer={optimizer!r} is neither an OptimizerConfig nor an "
                   "optax.GradientTransformation")


def _check_common(cfg) -> None:
    if not isinstance(cfg.num_steps, int) or cfg.num_steps < 1:
        raise P2LError(f"option num_steps={cfg.num_steps!r} must be a positive int")
    if not 0.0 <= cfg.eta <= 1.0:
        raise P2LError(f"option eta={cfg.eta} must be in [0, 1]")
    if not isinstance(cfg.prompt, str):
        raise P2LError(f"option prompt={cfg.prompt!r} must be a string")


def _check_guided(cfg) -> None:
    _check_common(cfg)
    rho = cfg.rho
    if isinstance(rho, tuple):
        if len(rho) != cfg.num_steps:
            raise P2LError(f"option rho: a schedule needs num_steps={cfg.num_steps} values, "
                           f"got {len(rho)}")
    elif not isinstance(rho, (int, float)):
        raise P2LError(f"option rho={rho!r} must be a float or a tuple of num_steps floats")
    from p2l_jax.solvers.gradients import VARIANTS

    if cfg.gradient not in VARIANTS:
        raise P2LError(f"option gradient={cfg.gradient!r} is not one of {sorted(VARIANTS)}")


@dataclasses.dataclass(frozen=True)
class P2LConfig:
    """P2L (docs/algorithm.md, "P2L, one reverse step").

    Attributes:
      num_steps: DDIM steps N [paper: 1000].
      eta: DDIM stochasticity [reimpl: 0].
      prompt: text whose embedding C starts the tuning [paper: the null prompt ""].
      tune_prompt: step 1 on/off (off = LDPS + projection ablation).
      K: prompt-tuning iterations per step [reimpl: 1].
      optimizer: prompt optimizer [reimpl: Adam lr 1e-4]; an OptimizerConfig or any optax
        GradientTransformation. Applied per sample (vmapped), so samples never interact.
      rho: latent step rho_t, a constant or a tuple of N per-step values
        [ours: 0.3, see DEFAULT_RHO].
      projection: "prox" (x* = prox of A at D(z0hat), lambda = lam) [paper default],
        "glue" (x* = A^T y + (I - A^T A) D(z0hat), PSLD-style) or "none".
      gamma: project every gamma steps, at step indices i with (i + 1) % gamma == 0
        [ours: 1, see DEFAULT_GAMMA; re-implementations used 8; the phase is ours].
      lam: lambda of the proximal projection [ours: 0.01, see DEFAULT_LAM;
        re-implementations used 1].
      gradient: gradient variant name (p2l_jax.solvers.gradients.VARIANTS) [paper: "full"].
      remat: rematerialize (jax.checkpoint) UNet and decoder inside the gradients.
    """

    num_steps: int = 1000
    eta: float = 0.0
    prompt: str = ""
    tune_prompt: bool = True
    K: int = 1
    optimizer: Optimizer = OptimizerConfig()
    rho: float | tuple[float, ...] = DEFAULT_RHO
    projection: str = "prox"
    gamma: int = DEFAULT_GAMMA
    lam: float = DEFAULT_LAM
    gradient: str = "full"
    remat: bool = False

    def __post_init__(self):
        _check_guided(self)
        build_optimizer(self.optimizer)
        if not isinstance(self.K, int) or self.K < 1:
            raise P2LError(f"option K={self.K!r} must be a positive int")
        if self.projection not in PROJECTIONS:
            raise P2LError(f"option projection={self.projection!r} is not one of {PROJECTIONS}")
        if not isinstance(self.gamma, int) or self.gamma < 1:
            raise P2LError(f"option gamma={self.gamma!r} must be a positive int")
        if not self.lam > 0:
            raise P2LError(f"option lam={self.lam} must be > 0")
        if self.gradient == "joint" and self.K != 1:
            raise P2LError(f"option K={self.K} must be 1 with gradient='joint' (one shared "
                           "forward/backward per step)")


@dataclasses.dataclass(frozen=True)
class LDPSConfig:
    """Latent DPS: P2L's steps 2, 3, 5 with the fixed embedding of ``prompt`` [paper: ""].

    Attributes as :class:`P2LConfig` (num_steps [1000], eta [0], gradient, remat) except
    rho [ours: 0.1, see DEFAULT_BASELINE_RHO]; no prompt tuning, no projection.
    """

    num_steps: int = 1000
    eta: float = 0.0
    prompt: str = ""
    rho: float | tuple[float, ...] = DEFAULT_BASELINE_RHO
    gradient: str = "full"
    remat: bool = False

    def __post_init__(self):
        _check_guided(self)


@dataclasses.dataclass(frozen=True)
class GMLDPSConfig:
    """GML-DPS: LDPS with loss r + gamma_ae || z0hat - E(D(z0hat)) || [flash-diffusion].

    ``gamma_ae`` [ours, not tuned: 0.1]: the weight of the autoencoder-consistency term;
    rho [ours: 0.1, LDPS's tuned value, see DEFAULT_BASELINE_RHO].
    """

    num_steps: int = 1000
    eta: float = 0.0
    prompt: str = ""
    rho: float | tuple[float, ...] = DEFAULT_BASELINE_RHO
    gamma_ae: float = 0.1
    gradient: str = "full"
    remat: bool = False

    def __post_init__(self):
        _check_guided(self)
        if self.gamma_ae < 0:
            raise P2LError(f"option gamma_ae={self.gamma_ae} must be >= 0")


@dataclasses.dataclass(frozen=True)
class PSLDConfig:
    """PSLD (Rout et al. 2023): loss omega r + gamma || E(A^T y + (I - A^T A) D(z0hat)) - z0hat ||.

    Defaults [paper]: omega = 1, gamma = 0.1 (box inpainting: 0.1 and 0.01), 1000 steps, eta 0;
    rho [ours: 0.1, see DEFAULT_BASELINE_RHO].
    """

    num_steps: int = 1000
    eta: float = 0.0
    prompt: str = ""
    rho: float | tuple[float, ...] = DEFAULT_BASELINE_RHO
    omega: float = 1.0
    gamma: float = 0.1
    gradient: str = "full"
    remat: bool = False

    def __post_init__(self):
        _check_guided(self)
        if self.omega < 0 or self.gamma < 0:
            raise P2LError(f"options omega={self.omega}, gamma={self.gamma} must be >= 0")


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """Plain DDIM sampling (no measurement) with classifier-free guidance, to check a model.

    eps = eps(z, C_neg) + guidance_scale * (eps(z, C) - eps(z, C_neg)); guidance_scale 1 runs
    the conditional model alone. Defaults [ours]: 50 steps, eta 0, guidance 7.5 (diffusers'
    Stable Diffusion default), negative prompt "".
    """

    num_steps: int = 50
    eta: float = 0.0
    prompt: str = ""
    guidance_scale: float = 7.5
    negative_prompt: str = ""

    def __post_init__(self):
        _check_common(self)
        if not isinstance(self.negative_prompt, str):
            raise P2LError(f"option negative_prompt={self.negative_prompt!r} must be a string")
