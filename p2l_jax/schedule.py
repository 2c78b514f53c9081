"""Noise schedule and DDIM, exactly as diffusers' ``DDIMScheduler`` computes them.

Symbols follow docs/algorithm.md: ``ab_t`` = alpha_bar_t (the cumulative product of
``1 - beta``), ``ab_p`` = alpha_bar of the previous (less noisy) DDIM timestep.

* alpha_bar from a scheduler config: ``beta_schedule`` ``linear`` (betas evenly spaced from
  ``beta_start`` to ``beta_end``), ``scaled_linear`` (their square roots evenly spaced, the SD
  schedule) or ``squaredcos_cap_v2`` (the cosine schedule, betas capped at 0.999); optionally
  ``trained_betas`` and ``rescale_betas_zero_snr``. Computed in float32 like diffusers.
* DDIM timesteps for any step count ``N <= T`` (``T = num_train_timesteps``):
  ``leading``  t_i = (N-1-i) * (T // N) + steps_offset,
  ``trailing`` t_i = round(arange(T, 0, -T/N)) - 1,
  ``linspace`` t_i = round(linspace(0, T-1, N))[::-1].
  The previous timestep is ``t - T // N`` (diffusers' rule, for every spacing); when it is
  negative ``ab_p`` is ``final_alpha_cumprod`` = 1 if ``set_alpha_to_one`` else alpha_bar_0.
* DDIM update (:func:`ddim_update`):
  ``sigma_t = eta * sqrt((1 - ab_p) / (1 - ab_t)) * sqrt(1 - ab_t / ab_p)``,
  ``z_prev = sqrt(ab_p) z0hat + sqrt(1 - ab_p - sigma_t^2) eps + sigma_t * noise``.
* Prediction types: ``epsilon`` (the network predicts eps) and ``v_prediction``
  (v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0), converted by :func:`v_to_eps` /
  :func:`v_to_x0`: eps = sqrt(ab_t) v + sqrt(1 - ab_t) z_t, x0 = sqrt(ab_t) z_t - sqrt(1 - ab_t) v.

Example (the diffusers DDIMScheduler defaults with SD's betas; ``set_alpha_to_one`` is true
by default, so the last step goes to ab_p = 1)::

    >>> cfg = ScheduleConfig.from_dict({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
    ...                                 "beta_end": 0.012, "steps_offset": 1})
    >>> ts = cfg.timesteps(50)                # numpy int64, descending
    >>> ts[:3].tolist(), int(ts[-1])
    ([981, 961, 941], 1)
    >>> ab_t, ab_p = cfg.alpha_bar_pairs(50)  # numpy float32, one pair per DDIM step
    >>> round(float(ab_t[0]), 4), float(ab_p[-1])
    (0.0058, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from p2l_jax.errors import P2LError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The diffusion schedule of a checkpoint (a diffusers ``scheduler_config.json``).

    Defaults are diffusers' ``DDIMScheduler`` defaults; Stable Diffusion checkpoints override
    them (``scaled_linear``, 0.00085..0.012, ``steps_offset`` 1, ``set_alpha_to_one`` false).
    ``clip_sample`` only affects :meth:`step` (the diffusers-compatible step); the solvers
    never clip latents.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise P2LError(f"scheduler option beta_schedule={self.beta_schedule!r} is not one "
                           f"of {BETA_SCHEDULES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise P2LError(f"scheduler option timestep_spacing={self.timestep_spacing!r} is not "
                           f"one of {TIMESTEP_SPACINGS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise P2LError(f"scheduler option prediction_type={self.prediction_type!r} is not "
                           f"one of {PREDICTION_TYPES}")
        if int(self.num_train_timesteps) < 1:
            raise P2LError(f"scheduler option num_train_timesteps={self.num_train_timesteps} "
                           "must be positive")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ScheduleConfig":
        """Build from a scheduler config dict; unknown keys (``_class_name``, ...) are ignored.

        ``thresholding`` (dynamic thresholding of pixel-space x0) is refused: it has no meaning
        for latents.
        """
        if config.get("thresholding", False):
            raise P2LError("scheduler option thresholding=True is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and v is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)

    # ---- alpha_bar -----------------------------------------------------------------------
    def betas(self) -> np.ndarray:
        """beta_t for t = 0..T-1 (float32), as diffusers builds them."""
        T = int(self.num_train_timesteps)
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, dtype=np.float32)
        elif self.beta_schedule == "linear":
            betas = _linspace_f32(self.beta_start, self.beta_end, T)
        elif self.beta_schedule == "scaled_linear":
            betas = _linspace_f32(self.beta_start ** 0.5, self.beta_end ** 0.5, T) ** 2
        else:  # squaredcos_cap_v2
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
                             dtype=np.float32)
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return betas

    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32, shape (T,)."""
        # torch accumulates a float32 cumprod in float64 on CPU; so do we, then round once.
        alphas = np.float32(1.0) - self.betas()
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

    def final_alpha_cumprod(self) -> np.float32:
        """alpha_bar used after the last step: 1 if ``set_alpha_to_one`` else alpha_bar_0."""
        return np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod()[0]

    # ---- DDIM timesteps ------------------------------------------------------------------
    def timesteps(self, num_steps: int) -> np.ndarray:
        """The N DDIM timesteps, descending (int64), per ``timestep_spacing``."""
        T, N = int(self.num_train_timesteps), int(num_steps)
        if not 1 <= N <= T:
            raise P2LError(f"option num_steps={num_steps} must be between 1 and "
                           f"num_train_timesteps={T}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, N).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.int64)
            ts += int(self.steps_offset)
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
        if ts.max() >= T or ts.min() < 0:
            raise P2LError(f"options num_steps={N} with timestep_spacing="
                           f"{self.timestep_spacing!r} and steps_offset={self.steps_offset} give "
                           f"timestep {int(ts.max())}, outside 0..{T - 1}")
        return ts

    def previous_timesteps(self, num_steps: int) -> np.ndarray:
        """``t - T // N`` for each DDIM timestep (negative means "after the last step")."""
        return self.timesteps(num_steps) - int(self.num_train_timesteps) // int(num_steps)

    def alpha_bar_pairs(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(ab_t, ab_p) per DDIM step, float32 arrays of shape (N,)."""
        ac = self.alphas_cumprod()
        ts, prev = self.timesteps(num_steps), self.previous_timesteps(num_steps)
        ab_t = ac[ts]
        ab_p = np.where(prev >= 0, ac[np.clip(prev, 0, None)], self.final_alpha_cumprod())
        return ab_t.astype(np.float32), ab_p.astype(np.float32)

    # ---- the diffusers-equivalent step ---------------------------------------------------
    def step(self, model_output, timestep: int, sample, num_steps: int, eta: float = 0.0,
             noise=None):
        """One DDIM step from a raw network output, equal to ``DDIMScheduler.step``.

        Converts ``model_output`` per ``prediction_type`` to (x0, eps), clips x0 if
        ``clip_sample``, then applies :func:`ddim_update`. Returns ``(z_prev, x0)``.
        """
        ac = self.alphas_cumprod()
        prev = int(timestep) - int(self.num_train_timesteps) // int(num_steps)
        ab_t = ac[int(timestep)]
        ab_p = ac[prev] if prev >= 0 else self.final_alpha_cumprod()
        x0, eps = model_output_to_x0_eps(model_output, sample, ab_t, self.prediction_type)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return ddim_update(x0, eps, ab_t, ab_p, eta, noise), x0


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit.

    ATen computes step = (end - start) / (n - 1) in float32, then start + step * i for the
    first half and end - step * (n - 1 - i) for the second, each with one rounding (a fused
    multiply-add); the float64 evaluation below rounds once, like the FMA.
    """
    if n == 1:
        return np.array([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    lo = np.float64(start32) + step * i
    hi = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), as diffusers."""
    alphas_bar_sqrt = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


# ---- pure array functions (jit-able, used by the solvers) --------------------------------
def ddim_sigma(ab_t, ab_p, eta):
    """sigma_t = eta * sqrt((1 - ab_p) / (1 - ab_t)) * sqrt(1 - ab_t / ab_p)."""
    return eta * jnp.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))


def ddim_update(z0hat, eps, ab_t, ab_p, eta=0.0, noise=None):
    """z_prev = sqrt(ab_p) z0hat + sqrt(1 - ab_p - sigma_t^2) eps + sigma_t * noise.

    ``noise`` (same shape as ``z0hat``) is required when ``eta`` may be non-zero; with
    ``noise=None`` the stochastic term is dropped (only valid for eta = 0).
    """
    sigma = ddim_sigma(ab_t, ab_p, eta)
    z_prev = jnp.sqrt(ab_p) * z0hat + jnp.sqrt(1 - ab_p - sigma ** 2) * eps
    if noise is not None:
        z_prev = z_prev + sigma * noise
    return z_prev


def v_to_eps(v, z_t, ab_t):
    """eps = sqrt(ab_t) v + sqrt(1 - ab_t) z_t."""
    return jnp.sqrt(ab_t) * v + jnp.sqrt(1 - ab_t) * z_t


def v_to_x0(v, z_t, ab_t):
    """x0 = sqrt(ab_t) z_t - sqrt(1 - ab_t) v."""
    return jnp.sqrt(ab_t) * z_t - jnp.sqrt(1 - ab_t) * v


def tweedie(z_t, eps, ab_t):
    """z0hat = (z_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
    return (z_t - jnp.sqrt(1 - ab_t) * eps) / jnp.sqrt(ab_t)


def eps_from_x0(z_t, z0hat, ab_t):
    """eps = (z_t - sqrt(ab_t) z0hat) / sqrt(1 - ab_t) (the inverse of :func:`tweedie`)."""
    return (z_t - jnp.sqrt(ab_t) * z0hat) / jnp.sqrt(1 - ab_t)


def model_output_to_x0_eps(model_output, z_t, ab_t, prediction_type: str):
    """(x0, eps) from a network output of the given ``prediction_type``."""
    if prediction_type == "epsilon":
        return tweedie(z_t, model_output, ab_t), model_output
    if prediction_type == "v_prediction":
        return v_to_x0(model_output, z_t, ab_t), v_to_eps(model_output, z_t, ab_t)
    if prediction_type == "sample":
        return model_output, eps_from_x0(z_t, model_output, ab_t)
    raise P2LError(f"option prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")


def model_output_to_eps(model_output, z_t, ab_t, prediction_type: str):
    """The epsilon prediction for any ``prediction_type`` (what ``model.eps`` returns)."""
    return model_output_to_x0_eps(model_output, z_t, ab_t, prediction_type)[1]
