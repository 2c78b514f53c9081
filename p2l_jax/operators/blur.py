"""Deblurring operators: circular convolution with a kernel, diagonalised by the 2-D DFT.

Boundary handling: **circular** (periodic). With ``F`` the 2-D DFT over height and width and
``K = F(h)`` the transfer function of the kernel ``h`` (centre tap ``(k1//2, k2//2)`` moved to
the origin, taps folded modulo the image size when the kernel is larger than the image),

    A x = F^{-1}(K . F x)                      (true convolution, as scipy.ndimage mode='wrap')
    A^T y = F^{-1}(conj(K) . F y)
    prox(z, y, lam) = F^{-1}((conj(K) . F y + lam F z) / (|K|^2 + lam))

so the prox is exact and costs two FFTs. Circular boundaries wrap the opposite edge into a
border strip of half the kernel width; DPS and PSLD pad with reflection instead, which differs
only in that strip.
"""

from __future__ import annotations

import jax.numpy as jnp

from p2l_jax.operators.base import LinearOperator
from p2l_jax.operators.kernels import (DEFAULT_BLUR_SIGMA, DEFAULT_KERNEL_SIZE,
                                       DEFAULT_MOTION_INTENSITY, gaussian_kernel, motion_kernel)
from p2l_jax.operators.serialization import decode_array, encode_array


def transfer_function(kernel: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """``rfft2`` of the kernel folded onto the ``height x width`` torus, centre tap at (0, 0)."""
    k1, k2 = kernel.shape
    m1, m2 = -(-k1 // height) * height, -(-k2 // width) * width
    padded = jnp.pad(kernel, ((0, m1 - k1), (0, m2 - k2)))
    folded = padded.reshape(m1 // height, height, m2 // width, width).sum(axis=(0, 2))
    folded = jnp.roll(folded, (-(k1 // 2), -(k2 // 2)), axis=(0, 1))
    return jnp.fft.rfft2(folded)


class Blur(LinearOperator):
    """``A x = h * x`` (circular convolution, module docstring) with any 2-D ``kernel``.

    The kernel is a pytree leaf, so it may be traced (e.g. learned or vmapped over).

    >>> import jax.numpy as jnp
    >>> Blur(jnp.ones((3, 3)) / 9).forward(jnp.ones((1, 5, 4, 3))).shape
    (1, 5, 4, 3)
    """

    name = "blur"
    array_fields = ("kernel",)

    def __init__(self, kernel):
        self.kernel = jnp.asarray(kernel, jnp.float32)

    def params(self):
        # Parametric kernels (subclasses) are rebuilt from their parameters; a free kernel
        # is stored bit for bit.
        if type(self).static_fields:
            return super().params()
        return {"kernel": encode_array(self.kernel)}

    @classmethod
    def from_params(cls, **params):
        if cls.static_fields:
            return cls(**params)
        return cls(decode_array(params.get("kernel")), **{k: v for k, v in params.items()
                                                          if k != "kernel"})

    def _spectrum(self, shape, dtype):
        return transfer_function(self.kernel.astype(dtype), shape[1], shape[2])[None, :, :, None]

    @staticmethod
    def _apply(v, spectrum_v):
        return jnp.fft.irfft2(spectrum_v, s=v.shape[1:3], axes=(1, 2)).astype(v.dtype)

    def forward(self, x):
        self.validate_shape(x.shape)
        k = self._spectrum(x.shape, x.dtype)
        return self._apply(x, k * jnp.fft.rfft2(x, axes=(1, 2)))

    def adjoint(self, y):
        k = self._spectrum(y.shape, y.dtype)
        return self._apply(y, jnp.conj(k) * jnp.fft.rfft2(y, axes=(1, 2)))

    def prox(self, z, y, lam):
        """Closed form in the Fourier domain (module docstring)."""
        k = self._spectrum(z.shape, z.dtype)
        num = jnp.conj(k) * jnp.fft.rfft2(y, axes=(1, 2)) + lam * jnp.fft.rfft2(z, axes=(1, 2))
        return self._apply(z, num / (jnp.abs(k) ** 2 + lam))


class GaussianBlur(Blur):
    """Gaussian deblurring: ``kernel_size`` (default 61) and ``sigma`` (default 3.0), the DPS/PSLD
    256 px setting (PSLD at 512 px: 121, 3.0); kernel from :func:`kernels.gaussian_kernel`."""

    name = "gaussian_blur"
    static_fields = ("kernel_size", "sigma")

    def __init__(self, kernel_size: int = DEFAULT_KERNEL_SIZE, sigma: float = DEFAULT_BLUR_SIGMA):
        super().__init__(gaussian_kernel(kernel_size, sigma))
        self.kernel_size, self.sigma = int(kernel_size), float(sigma)


class MotionBlur(Blur):
    """Motion deblurring with the seeded camera-shake kernel of :func:`kernels.motion_kernel`;
    ``kernel_size`` (default 61; 121 at 512 px), ``intensity`` (default 0.5), ``seed``."""

    name = "motion_blur"
    static_fields = ("kernel_size", "intensity", "seed")

    def __init__(self, kernel_size: int = DEFAULT_KERNEL_SIZE,
                 intensity: float = DEFAULT_MOTION_INTENSITY, seed: int = 0):
        super().__init__(motion_kernel(kernel_size, intensity, seed))
        self.kernel_size, self.intensity, self.seed = int(kernel_size), float(intensity), int(seed)

