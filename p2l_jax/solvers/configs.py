"""Frozen-dataclass configs of the solvers: the user's interface, split for the compiler.

Every default is tagged as in docs/algorithm.md: [paper] from Chung et al. 2024, [reimpl] a
public re-implementation's choice, [ours] this project's decision. All are overridable.

A config holds three kinds of field, and :func:`split` separates them:

* structure (num_steps, gradient, K, projection, remat, tune_prompt, the optimizer's kind,
  whether DDIM guides): what the compiled program looks like. :class:`Structure` is a
  hashable static jit argument that carries no number a step could read by mistake;
* settings (fields declared with :func:`setting`: eta, rho, lam, project_every, omega, gamma,
  gamma_ae, guidance_scale, and the optimizer's learning rate / b1 / b2 / eps / momentum):
  plain numbers. They travel into the program as a pytree of float32 / int32 arrays
  (rho as its (N,) per-step schedule), so another value compiles nothing and a sweep can
  vmap over them (:func:`p2l_jax.solvers.sweep`);
* inputs (prompt, negative_prompt): text turned into embeddings before the program runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Union

import jax.numpy as jnp
import numpy as np
import optax

from p2l_jax.errors import P2LError
from p2l_jax.solvers.gradients import VARIANTS
from p2l_jax.solvers.prompt_objectives import OBJECTIVES
from p2l_jax.solvers.prompt_space import SPACES

PROJECTIONS = ("prox", "glue", "none")

#: rho [ours]: re-implementations used 1.0 (TReg, 200 steps) and 0.05 (LATINO-PRO, 999 steps).
#: P2L's, chosen on the embedded model's validation split with the projection defaults below
#: (``python -m benchmarks.tune_defaults``, docs/RESULTS.md): rho 0.3 / 1 / 3 gave 24.0 / 23.2 /
#: 22.2 dB mean PSNR (SR x4, Gaussian deblur, box inpainting; sigma_y 0.05; 25 steps).
DEFAULT_RHO = 0.3

#: The projection period (``project_every``, the paper's gamma) and lambda of P2L's projection
#: [ours]. Re-implementations used a period of 8 and lambda = 1. Chosen on the embedded model's
#: validation split (8 images; SR x4, Gaussian deblur, box inpainting; sigma_y 0.05; 25 steps;
#: mean PSNR; ``python -m benchmarks.tune_defaults``, see docs/RESULTS.md): lambda 1 -> 0.1 ->
#: 0.01 gave 17.1 -> 19.2 -> 20.5 dB at period 8, then period 8 -> 2 -> 1 gave 20.5 -> 23.4 ->
#: 24.0 dB. Projecting every step with a small lambda is what makes P2L consistent with y at
#: few steps; with 1000 steps the paper-era values (``project_every=8, lam=1.0``) remain a
#: reasonable override.
DEFAULT_PROJECT_EVERY = 1
DEFAULT_LAM = 0.01

#: rho of the baselines without projection (LDPS, and GML-DPS / PSLD, which add one loss term
#: each) [ours]: on the same validation sweep rho 0.1 / 0.3 / 1 gave 18.0 / 15.8 / 11.7 dB
#: (0.3 was best for SR alone, 18.9 vs 17.0 dB, and far worse for deblurring and inpainting).
DEFAULT_BASELINE_RHO = 0.1


def setting(default, dtype=np.float32):
    """A config field that is a number of the program, not its structure (module docstring)."""
    return dataclasses.field(default=default, metadata={"setting": dtype})


#: Fields that are neither structure nor settings: text, embedded before the program runs.
INPUTS = ("prompt", "negative_prompt")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The prompt optimizer as a hashable description; ``build()`` gives the optax transform.

    Default [reimpl]: Adam(lr = 1e-4, b1 = 0.9, b2 = 0.999, eps = 1e-8).
    ``name`` is ``adam`` or ``sgd`` (plain gradient descent, ``momentum`` optional).
    ``per_run`` [ours; False here, the re-implementations' absolute rate; P2L's default
    optimizer, :data:`DEFAULT_PROMPT_OPTIMIZER`, sets it]: read
    ``learning_rate`` as the movement budget of the whole run and give each of the N K
    updates ``learning_rate / (N K)``. Adam moves a coordinate by at most about its rate per
    update, so the paper's 1e-4 over 1000 steps is a budget of 0.1 that a 25-step run with the
    absolute rate would cut 40-fold; ``per_run=True, learning_rate=0.1`` keeps it. For any
    other optax ``GradientTransformation``, pass the transformation itself as the solver
    config's ``optimizer`` (it hashes by identity: build it once and reuse it).
    """

    name: str = "adam"
    learning_rate: float = setting(1e-4)
    b1: float = setting(0.9)
    b2: float = setting(0.999)
    eps: float = setting(1e-8)
    momentum: float | None = setting(None)
    per_run: bool = False

    def __post_init__(self):
        if self.name not in ("adam", "sgd"):
            raise P2LError(f"option optimizer.name={self.name!r} is not one of ('adam', 'sgd')")
        if not self.learning_rate > 0:
            raise P2LError(f"option optimizer.learning_rate={self.learning_rate} must be > 0")

    def build(self) -> optax.GradientTransformation:
        """The transform with these numbers as constants (for use outside the solvers)."""
        return build_optimizer(*_split_optimizer(self))


Optimizer = Union[OptimizerConfig, optax.GradientTransformation]

#: P2L's prompt optimizer [ours]: Adam (b1 0.9, b2 0.999, eps 1e-8 [reimpl]) with a movement
#: budget of 1.0 for the whole run (each of the N K updates gets lr 1.0 / (N K)). Chosen on the
#: embedded model's validation split (20 images, 25 steps, sigma_y 0.05, tweedie objective;
#: ``python -m benchmarks.prompt_objectives --split validation``, docs/RESULTS.md): budgets 0.1
#: (the paper's 1000 x 1e-4) / 1 / 3 gained +0.03 / +0.59 / +0.30 dB over the untuned null
#: prompt on box inpainting, +0.18 / +1.03 / +0.76 dB on random inpainting and +0.00 / +0.01 /
#: -0.02 dB on SR x4; the re-implementations' absolute lr 1e-4 (``OptimizerConfig()``, the
#: paper preset's) gained -0.01 / +0.04 / +0.00 dB.
DEFAULT_PROMPT_OPTIMIZER = OptimizerConfig(learning_rate=1.0, per_run=True)


#: The numbers each optimizer kind reads (momentum only when given).
_OPTIMIZER_NUMBERS = {"adam": ("learning_rate", "b1", "b2", "eps"),
                      "sgd": ("learning_rate", "momentum")}


def _split_optimizer(optimizer: Optimizer, updates: int = 1) -> tuple[Hashable, dict]:
    """(kind, numbers) of a config's ``optimizer`` field: kind ("adam",) or ("sgd", momentum
    on?) and its numbers, or a user's optax transform itself and no numbers. ``updates``: the
    run's number of optimizer updates (N K), which a ``per_run`` learning rate is divided by."""
    if isinstance(optimizer, OptimizerConfig):
        numbers = {k: getattr(optimizer, k) for k in _OPTIMIZER_NUMBERS[optimizer.name]
                   if getattr(optimizer, k) is not None}
        if optimizer.per_run:
            numbers["learning_rate"] = optimizer.learning_rate / updates
        kind = ("sgd", optimizer.momentum is not None) if optimizer.name == "sgd" else ("adam",)
        return kind, numbers
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer, {}
    raise P2LError(f"option optimizer={optimizer!r} is neither an OptimizerConfig nor an "
                   "optax.GradientTransformation")


def build_optimizer(kind: Hashable, numbers: dict) -> optax.GradientTransformation:
    """The optax transform of an optimizer's (kind, numbers): Adam and SGD through
    ``optax.inject_hyperparams``, so the numbers (arrays, traced or not) live in the
    optimizer state rather than in the compiled program; a user's transform as given."""
    if isinstance(kind, optax.GradientTransformation):
        return kind
    # sgd without momentum: optax's default momentum=None stays static
    factory = {"adam": optax.adam, "sgd": optax.sgd}[kind[0]]
    return optax.inject_hyperparams(factory)(**numbers)


@dataclasses.dataclass(frozen=True)
class Structure:
    """What shapes a solver's compiled program: the config class, N, and the other
    structural fields by name (``structure.K``, ``structure.projection``, ...). Hashable: the
    static argument of the jitted programs. It holds no setting, so a step cannot read a
    number as a Python constant; numbers come from the settings pytree."""

    solver: type
    num_steps: int
    options: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        for key, value in self.options:
            if key == name:
                return value
        raise AttributeError(f"{self.solver.__name__} has no structural option {name!r}")


def split(config) -> tuple[Structure, dict[str, Any]]:
    """(structure, settings) of a solver config (module docstring).

    settings: ``{name: float32 / int32 array}`` of the fields declared with :func:`setting`;
    ``rho`` as its (N,) per-step schedule; the optimizer's numbers under ``"optimizer"``.
    """
    n = config.num_steps
    options, settings = [], {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "setting" in f.metadata:
            a = np.asarray(value, f.metadata["setting"])
            settings[f.name] = jnp.asarray(np.broadcast_to(a, (n,)) if f.name == "rho" else a)
        elif f.name == "optimizer":
            kind, numbers = _split_optimizer(value, n * getattr(config, "K", 1))
            options.append(("optimizer", kind))
            settings["optimizer"] = {k: jnp.asarray(v, np.float32) for k, v in numbers.items()}
        elif f.name not in INPUTS and f.name != "num_steps":
            options.append((f.name, value))
    options += getattr(config, "derived_structure", lambda: [])()
    return Structure(type(config), n, tuple(options)), settings


def _guidance_structure(cfg) -> list[tuple[str, Any]]:
    """Guidance on or off shapes the program (a second UNet pass); its scale does not."""
    return [("guidance", cfg.guidance_scale != 1.0)]


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
      optimizer: prompt optimizer [ours: Adam with a per-run budget of 1.0, see
        DEFAULT_PROMPT_OPTIMIZER; reimpl: Adam lr 1e-4 absolute, ``OptimizerConfig()``, as in
        :meth:`paper`]; an OptimizerConfig or any optax GradientTransformation. Applied per sample (vmapped), so samples never interact.
      rho: latent step rho_t, a constant or a tuple of N per-step values
        [ours: 0.3, see DEFAULT_RHO].
      projection: "prox" (x* = prox of A at D(z0hat), lambda = lam) [paper default],
        "glue" (x* = A^T y + (I - A^T A) D(z0hat), PSLD-style) or "none".
      project_every: the projection period (the paper's gamma): project at step indices i
        with (i + 1) % project_every == 0 [ours: 1, see DEFAULT_PROJECT_EVERY;
        re-implementations used 8; the phase is ours]. A setting: when a sweep varies it,
        the projection's ``lax.cond`` has a batched predicate and becomes a select that
        computes both branches (same results, one decode + encode per step more).
      lam: lambda of the proximal projection [ours: 0.01, see DEFAULT_LAM;
        re-implementations used 1].
      gradient: gradient variant name (p2l_jax.solvers.gradients.VARIANTS) [paper: "full"].
      remat: rematerialize (jax.checkpoint) UNet and decoder inside the gradients.
      prompt_objective: the loss step 1 descends, a name of
        p2l_jax.solvers.prompt_objectives.OBJECTIVES: "tweedie" [paper], "renoised",
        "marginal" [ours].
      prompt_draws: M, the noise draws of the "renoised" and "marginal" objectives [ours: 4].
      tune_start, tune_stop: step i tunes the prompt when tune_start <= i / N < tune_stop
        [paper: every step, (0, 1)].
      prompt_space: the tuned variable (p2l_jax.solvers.prompt_space): "embedding", C
        itself [paper], or "tokens", the text encoder's input token embeddings e with
        C = T(e) recomputed through the encoder at each update [ours, textual-inversion
        style]. With "tokens", ``solve``'s ``embedding`` argument is the starting e.
      guidance_scale: classifier-free guidance w with the tuned C, every eps being
        eps(z, C_neg) + w (eps(z, C) - eps(z, C_neg)), C_neg the embedding of
        ``negative_prompt`` [reimpl: 1, no guidance, as LATINO-PRO; TReg samples with 4].
      negative_prompt: the unconditional prompt of guidance [""].
      clip_decoded: clip decoded images to [-1, 1] before the operator and the encoder
        [reimpl: LATINO-PRO clips; default False, the paper does not say].

    :meth:`paper` gives the settings the re-implementations read from the paper.
    """

    num_steps: int = 1000
    eta: float = setting(0.0)
    prompt: str = ""
    tune_prompt: bool = True
    K: int = 1
    optimizer: Optimizer = DEFAULT_PROMPT_OPTIMIZER
    rho: float | tuple[float, ...] = setting(DEFAULT_RHO)
    projection: str = "prox"
    project_every: int = setting(DEFAULT_PROJECT_EVERY, np.int32)
    lam: float = setting(DEFAULT_LAM)
    gradient: str = "full"
    remat: bool = False
    prompt_objective: str = "tweedie"
    prompt_draws: int = 4
    tune_start: float = setting(0.0)
    tune_stop: float = setting(1.0)
    guidance_scale: float = setting(1.0)
    negative_prompt: str = ""
    clip_decoded: bool = False
    prompt_space: str = "embedding"

    @classmethod
    def paper(cls, **overrides) -> "P2LConfig":
        """The paper's P2L as the public re-implementations read it (its Table 6): 1000 DDIM
        steps, K = 1, Adam lr 1e-4 on C from the null prompt, a proximal projection every 8
        steps with lambda 1 [reimpl], rho 0.05 (LATINO-PRO's value at 999 steps) [reimpl],
        no guidance. ``overrides`` replace any field, e.g. ``P2LConfig.paper(num_steps=200)``.
        The class defaults are this project's, tuned on the embedded model (docs/RESULTS.md).
        """
        fields = dict(num_steps=1000, K=1, optimizer=OptimizerConfig(), projection="prox",
                      project_every=8, lam=1.0, rho=0.05)
        return cls(**{**fields, **overrides})

    derived_structure = _guidance_structure

    def __new__(cls, *args, **kwargs):
        if "gamma" in kwargs:  # the old name, which PSLD uses for a loss weight
            raise P2LError("option gamma of P2LConfig is now called project_every (the "
                           "projection period); PSLDConfig's gamma is a loss weight")
        return super().__new__(cls)

    def __post_init__(self):
        _check_guided(self)
        _split_optimizer(self.optimizer)
        if not isinstance(self.K, int) or self.K < 1:
            raise P2LError(f"option K={self.K!r} must be a positive int")
        if self.projection not in PROJECTIONS:
            raise P2LError(f"option projection={self.projection!r} is not one of {PROJECTIONS}")
        if not isinstance(self.project_every, int) or self.project_every < 1:
            raise P2LError(f"option project_every={self.project_every!r} must be a positive int")
        if not self.lam > 0:
            raise P2LError(f"option lam={self.lam} must be > 0")
        if self.gradient == "joint" and self.K != 1:
            raise P2LError(f"option K={self.K} must be 1 with gradient='joint' (one shared "
                           "forward/backward per step)")
        if self.prompt_objective not in OBJECTIVES:
            raise P2LError(f"option prompt_objective={self.prompt_objective!r} is not one of "
                           f"{sorted(OBJECTIVES)}")
        if self.gradient == "joint" and self.prompt_objective != "tweedie":
            raise P2LError("option gradient='joint' derives g_C from the residual r, so it "
                           f"needs prompt_objective='tweedie', not {self.prompt_objective!r}")
        if self.prompt_space not in SPACES:
            raise P2LError(f"option prompt_space={self.prompt_space!r} is not one of {SPACES}")
        if self.gradient == "joint" and self.prompt_space != "embedding":
            raise P2LError("option gradient='joint' updates C from the residual's gradient in "
                           f"C, so it needs prompt_space='embedding', not {self.prompt_space!r}")
        if not isinstance(self.prompt_draws, int) or self.prompt_draws < 1:
            raise P2LError(f"option prompt_draws={self.prompt_draws!r} must be a positive int")
        if not 0.0 <= self.tune_start < self.tune_stop:
            raise P2LError(f"options tune_start={self.tune_start}, tune_stop="
                           f"{self.tune_stop}: need 0 <= tune_start < tune_stop")
        if not self.guidance_scale >= 0:
            raise P2LError(f"option guidance_scale={self.guidance_scale} must be >= 0")


@dataclasses.dataclass(frozen=True)
class LDPSConfig:
    """Latent DPS: P2L's steps 2, 3, 5 with the fixed embedding of ``prompt`` [paper: ""].

    Attributes as :class:`P2LConfig` (num_steps [1000], eta [0], gradient, remat) except
    rho [ours: 0.1, see DEFAULT_BASELINE_RHO]; no prompt tuning, no projection.
    """

    num_steps: int = 1000
    eta: float = setting(0.0)
    prompt: str = ""
    rho: float | tuple[float, ...] = setting(DEFAULT_BASELINE_RHO)
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
    eta: float = setting(0.0)
    prompt: str = ""
    rho: float | tuple[float, ...] = setting(DEFAULT_BASELINE_RHO)
    gamma_ae: float = setting(0.1)
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
    eta: float = setting(0.0)
    prompt: str = ""
    rho: float | tuple[float, ...] = setting(DEFAULT_BASELINE_RHO)
    omega: float = setting(1.0)
    gamma: float = setting(0.1)
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
    eta: float = setting(0.0)
    prompt: str = ""
    guidance_scale: float = setting(7.5)
    negative_prompt: str = ""

    def __post_init__(self):
        _check_common(self)
        if not isinstance(self.negative_prompt, str):
            raise P2LError(f"option negative_prompt={self.negative_prompt!r} must be a string")

    derived_structure = _guidance_structure
