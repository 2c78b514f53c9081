"""Inpainting: ``A = diag(m)``, a pixel-wise mask (1 = observed).

    A x = m . x,   A^T y = m . y,   prox(z, y, lam) = (m . y + lam z) / (m^2 + lam).

The measurement keeps the image shape, with zeros where pixels are missing. The mask is a
pytree leaf of shape ``(1, H, W, 1)`` (shared by the channels) or ``(1, H, W, C)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from p2l_jax.errors import P2LError
from p2l_jax.operators.base import LinearOperator
from p2l_jax.operators.serialization import decode_array, encode_array


class Inpainting(LinearOperator):
    """Mask-out operator; ``mask`` is ``(H, W)``, ``(H, W, C)`` or ``(1, H, W, C)`` with
    1 = observed (see :mod:`p2l_jax.operators.masks` for box, random and free-form masks).

    >>> import numpy as np, jax.numpy as jnp
    >>> op = Inpainting(np.array([[1.0, 0.0]]))
    >>> op.forward(jnp.ones((1, 1, 2, 3)))[0, 0, :, 0].tolist()
    [1.0, 0.0]
    """

    name = "inpainting"
    array_fields = ("mask",)

    def __init__(self, mask):
        m = np.asarray(mask, np.float32)
        if m.ndim == 2:
            m = m[:, :, None]
        if m.ndim == 3:
            m = m[None]
        if m.ndim != 4 or m.shape[0] != 1:
            raise P2LError(f"inpainting: mask must be (H, W), (H, W, C) or (1, H, W, C), "
                           f"got shape {np.shape(mask)}")
        self.mask = jnp.asarray(m)

    def validate_shape(self, shape):
        super().validate_shape(shape)
        _, h, w, c = self.mask.shape
        if tuple(shape[1:3]) != (h, w) or c not in (1, shape[3]):
            raise P2LError(f"inpainting: mask of shape {h}x{w}x{c} does not fit images of "
                           f"shape {tuple(shape[1:])}")

    def forward(self, x):
        self.validate_shape(x.shape)
        return self.mask.astype(x.dtype) * x

    def adjoint(self, y):
        return self.mask.astype(y.dtype) * y

    def prox(self, z, y, lam):
        """Closed form ``(m y + lam z) / (m^2 + lam)``."""
        m = self.mask.astype(z.dtype)
        return (m * y + lam * z) / (m * m + lam)

    def params(self):
        return {"mask": encode_array(self.mask)}

    @classmethod
    def from_params(cls, mask):
        return cls(decode_array(mask))
