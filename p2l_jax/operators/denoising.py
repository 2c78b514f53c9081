"""Denoising: ``A = I``, so ``y = x + sigma n``.

    prox(z, y, lam) = (y + lam z) / (1 + lam).
"""

from __future__ import annotations

from p2l_jax.operators.base import LinearOperator


class Denoising(LinearOperator):
    """The identity operator (measurement = noisy image).

    >>> import jax.numpy as jnp
    >>> Denoising().adjoint(jnp.ones((1, 2, 2, 3))).shape
    (1, 2, 2, 3)
    """

    name = "denoising"

    def forward(self, x):
        self.validate_shape(x.shape)
        return x

    def adjoint(self, y):
        return y

    def prox(self, z, y, lam):
        """Closed form ``(y + lam z) / (1 + lam)``."""
        return (y + lam * z) / (1 + lam)
