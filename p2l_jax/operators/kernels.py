"""Blur kernels: sampled Gaussian and the random camera-shake (motion) trajectory.

Both return float32 ``(kernel_size, kernel_size)`` numpy arrays that sum to 1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from p2l_jax.errors import P2LError

#: DPS / PSLD settings at 256 px (algorithm.md); 121 at 512 px.
DEFAULT_KERNEL_SIZE = 61
DEFAULT_BLUR_SIGMA = 3.0
DEFAULT_MOTION_INTENSITY = 0.5


def _check_size(kernel_size) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, np.integer)) \
            or kernel_size < 1:
        raise P2LError(f"--kernel-size must be an integer >= 1, got {kernel_size!r}")
    return int(kernel_size)


def gaussian_kernel(kernel_size: int = DEFAULT_KERNEL_SIZE,
                    sigma: float = DEFAULT_BLUR_SIGMA) -> np.ndarray:
    """``k[i, j] ∝ exp(-((i-c)^2 + (j-c)^2) / (2 sigma^2))`` over the whole window, ``c = size//2``.

    Normalised to sum 1. (DPS builds its kernel with ``scipy.ndimage.gaussian_filter`` on a
    delta, which truncates at 4 sigma; the taps it drops weigh < 1e-3 in total for sigma = 3.)
    """
    kernel_size = _check_size(kernel_size)
    if not sigma > 0:
        raise P2LError(f"--blur-sigma must be > 0, got {sigma!r}")
    t = np.arange(kernel_size) - kernel_size // 2
    g = np.exp(-(t.astype(np.float64) ** 2) / (2.0 * float(sigma) ** 2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def motion_kernel(kernel_size: int = DEFAULT_KERNEL_SIZE,
                  intensity: float = DEFAULT_MOTION_INTENSITY, seed: int = 0) -> np.ndarray:
    """Random camera-shake kernel: the ``motionblur`` package's ``Kernel`` (used by DPS and PSLD)
    re-implemented with a seeded ``numpy.random.Generator``.

    On a canvas of twice the kernel size (diagonal ``d``):
    1. path length ``L = 0.75 d (U(0,1) + U(0, intensity^2))``; steps
       ``beta(1, 30) (1 - intensity + eps) d`` are drawn (each shorter than L) until they sum to L;
    2. angles: ``max = U(0, intensity pi)``, ``jitter = beta(2, 20)``; the first angle is
       ``U(-max, max)``, each next one ``triangular(0, intensity max, max + eps)`` with the
       previous one's sign, flipped with probability ``jitter``;
    3. path = cumulative sum of ``step * exp(i angle)``, centred on its mean, rotated by
       ``U(0, pi)`` and moved to the canvas centre;
    4. the path is drawn as a line of width ``int(d / 150)``, Gaussian-blurred with radius
       ``int(0.01 d)``, Lanczos-resized to ``kernel_size``, converted to 8-bit grey and
       normalised to sum 1.
    Same (kernel_size, intensity, seed) -> the same kernel; the draws differ from the
    package's (it uses numpy's global state), the distribution is the same.
    """
    kernel_size = _check_size(kernel_size)
    if not 0.0 <= float(intensity) <= 1.0:
        raise P2LError(f"--intensity must be in [0, 1], got {intensity!r}")
    intensity = float(intensity)
    rng = np.random.default_rng(int(seed))
    eps = np.finfo(float).eps
    canvas = 2 * kernel_size
    diagonal = float(np.hypot(canvas, canvas))

    max_len = 0.75 * diagonal * (rng.uniform() + rng.uniform(0, intensity**2))
    steps: list[float] = []
    while sum(steps) < max_len:
        step = rng.beta(1, 30) * (1 - intensity + eps) * diagonal
        if step < max_len:
            steps.append(step)

    max_angle = rng.uniform(0, intensity * np.pi)
    jitter = rng.beta(2, 20)
    angles = [rng.uniform(-max_angle, max_angle)]
    while len(angles) < len(steps):
        angle = rng.triangular(0, intensity * max_angle, max_angle + eps)
        sign = np.sign(angles[-1])
        angles.append(-angle * sign if rng.uniform() < jitter else angle * sign)

    path = np.cumsum(np.asarray(steps) * np.exp(1j * np.asarray(angles)))
    path = (path - path.mean()) * np.exp(1j * rng.uniform(0, np.pi)) + (canvas + 1j * canvas) / 2

    image = Image.new("L", (canvas, canvas))
    ImageDraw.Draw(image).line([(p.real, p.imag) for p in path], fill=255,
                               width=max(int(diagonal / 150), 1))
    image = image.filter(ImageFilter.GaussianBlur(radius=int(diagonal * 0.01)))
    image = image.resize((kernel_size, kernel_size), resample=Image.Resampling.LANCZOS)
    k = np.asarray(image, dtype=np.float64)
    if k.sum() == 0:   # a path too short to leave a mark after resizing: a delta
        k[kernel_size // 2, kernel_size // 2] = 1.0
    return (k / k.sum()).astype(np.float32)
