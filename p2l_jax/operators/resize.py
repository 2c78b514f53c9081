"""Super-resolution: antialiased bicubic down-sampling, MATLAB ``imresize`` style.

For an integer factor ``s`` the operator is separable, ``A x = D_H x D_W^T`` per channel, with
``D_n`` the ``(n/s) x n`` matrix of MATLAB's ``imresize(x, 1/s, 'bicubic')`` (the resizer DPS
and PSLD use):

- output pixel ``i`` (0-based) is centred at input coordinate ``c_i = (i + 1/2) s - 1/2``;
- weights ``w_ij = k((c_i - j) / s)`` with Keys' cubic
  ``k(t) = (a+2)|t|^3 - (a+3)|t|^2 + 1`` for ``|t| <= 1``,
  ``a|t|^3 - 5a|t|^2 + 8a|t| - 4a`` for ``1 < |t| < 2``, 0 otherwise, ``a = -1/2``;
  dividing ``t`` by ``s`` widens the kernel to ``4 s`` taps, which is the antialiasing;
- each row is normalised to sum 1; taps outside ``[0, n)`` are mirrored (symmetric boundary,
  ``-1 -> 0``, ``n -> n-1``) and accumulated.

Because ``A`` is a pair of explicit matrices its adjoint ``A^T y = D_H^T y D_W`` is exact, and the
prox has a closed form through the eigen-decompositions ``D^T D = Q diag(e) Q^T``:

    prox(z, y, lam) = Q_H [ (Q_H^T R Q_W) / (e_H e_W^T + lam) ] Q_W^T,  R = A^T y + lam z.

The matrices are built in numpy (float64, cached per size) from the static image shape, so one
``SuperResolution(scale)`` works for every image size divisible by ``scale``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from p2l_jax.errors import P2LError
from p2l_jax.operators.base import LinearOperator

#: Keys' cubic parameter of MATLAB imresize / PIL BICUBIC.
KEYS_A = -0.5
_HI = jax.lax.Precision.HIGHEST


def keys_cubic(t: np.ndarray, a: float = KEYS_A) -> np.ndarray:
    """Keys' cubic convolution kernel (support ``|t| < 2``)."""
    t = np.abs(t)
    inner = (a + 2) * t**3 - (a + 3) * t**2 + 1
    outer = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return np.where(t <= 1, inner, np.where(t < 2, outer, 0.0))


@functools.lru_cache(maxsize=64)
def downsample_matrix(n: int, scale: int, a: float = KEYS_A, antialias: bool = True) -> np.ndarray:
    """The ``(n // scale, n)`` float64 matrix ``D_n`` of the module docstring."""
    if n % scale:
        raise P2LError(f"super-resolution: size {n} is not divisible by scale {scale}")
    width = float(scale) if antialias else 1.0   # kernel stretch
    centres = (np.arange(n // scale) + 0.5) * scale - 0.5
    reach = int(np.ceil(2 * width)) + 1
    taps = np.floor(centres)[:, None].astype(int) + np.arange(-reach, reach + 1)[None, :]
    weights = keys_cubic((centres[:, None] - taps) / width, a)
    weights /= weights.sum(axis=1, keepdims=True)
    mirrored = np.mod(taps, 2 * n)
    mirrored = np.where(mirrored >= n, 2 * n - 1 - mirrored, mirrored)
    mat = np.zeros((n // scale, n))
    rows = np.broadcast_to(np.arange(n // scale)[:, None], taps.shape)
    np.add.at(mat, (rows, mirrored), weights)
    mat.setflags(write=False)
    return mat


@functools.lru_cache(maxsize=64)
def _gram_eigh(n: int, scale: int, a: float, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    d = downsample_matrix(n, scale, a, antialias)
    e, q = np.linalg.eigh(d.T @ d)
    return np.clip(e, 0.0, None), q


class SuperResolution(LinearOperator):
    """``A x``: bicubic, antialiased down-sampling by an integer ``scale`` (see module docstring).

    Parameters: ``scale`` (integer >= 1; DPS/PSLD use 4 at 256 px, P2L 8 at 512 px),
    ``cubic_a`` (Keys' parameter, default -0.5), ``antialias`` (widen the kernel by ``scale``,
    default True as MATLAB and PIL). Image height and width must be divisible by ``scale``.

    >>> import jax.numpy as jnp
    >>> SuperResolution(4).forward(jnp.ones((1, 8, 12, 3))).shape
    (1, 2, 3, 3)
    """

    name = "super_resolution"
    static_fields = ("scale", "cubic_a", "antialias")

    def __init__(self, scale: int = 4, cubic_a: float = KEYS_A, antialias: bool = True):
        if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
            raise P2LError(f"super-resolution: scale must be an integer >= 1, got {scale!r}")
        self.scale = int(scale)
        self.cubic_a = float(cubic_a)
        self.antialias = bool(antialias)

    def validate_shape(self, shape):
        super().validate_shape(shape)
        if shape[1] % self.scale or shape[2] % self.scale:
            raise P2LError(f"super-resolution: image size {shape[1]}x{shape[2]} is not "
                           f"divisible by --scale {self.scale}")

    def _mats(self, h: int, w: int, dtype):
        dh = downsample_matrix(h, self.scale, self.cubic_a, self.antialias)
        dw = downsample_matrix(w, self.scale, self.cubic_a, self.antialias)
        return jnp.asarray(dh, dtype), jnp.asarray(dw, dtype)

    def forward(self, x):
        self.validate_shape(x.shape)
        dh, dw = self._mats(x.shape[1], x.shape[2], x.dtype)
        return jnp.einsum("ah,nhwc,bw->nabc", dh, x, dw, precision=_HI)

    def adjoint(self, y):
        h, w = y.shape[1] * self.scale, y.shape[2] * self.scale
        dh, dw = self._mats(h, w, y.dtype)
        return jnp.einsum("ah,nabc,bw->nhwc", dh, y, dw, precision=_HI)

    def prox(self, z, y, lam):
        """Closed form through the eigen-decomposition of ``D^T D`` (module docstring)."""
        h, w = z.shape[1], z.shape[2]
        eh, qh = _gram_eigh(h, self.scale, self.cubic_a, self.antialias)
        ew, qw = _gram_eigh(w, self.scale, self.cubic_a, self.antialias)
        qh, qw = jnp.asarray(qh, z.dtype), jnp.asarray(qw, z.dtype)
        gram = jnp.asarray(np.outer(eh, ew), z.dtype)[None, :, :, None]
        r = self.adjoint(y) + lam * z
        t = jnp.einsum("ha,nhwc,wb->nabc", qh, r, qw, precision=_HI) / (gram + lam)
        return jnp.einsum("ha,nabc,wb->nhwc", qh, t, qw, precision=_HI)
