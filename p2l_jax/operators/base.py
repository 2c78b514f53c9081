"""The linear-operator interface every degradation implements.

A measurement is ``y = A x + n`` with ``n ~ N(0, sigma^2 I)``; images ``x`` are NHWC floats
in [-1, 1] and every operator acts on each image of the batch independently (batch-agnostic).

Every operator provides

- ``forward(x) = A x`` and ``adjoint(y) = A^T y`` (exact: ``<A x, y> = <x, A^T y>``);
- ``prox(z, y, lam) = argmin_x ||y - A x||^2 + lam ||x - z||^2
  = (A^T A + lam I)^{-1} (A^T y + lam z)``; subclasses override it with a closed form where
  one exists, otherwise the generic conjugate-gradient solve :meth:`LinearOperator.prox_cg`
  of the normal equations is used, so a new linear operator gets a prox for free;
- ``measure(x, key, sigma) = A x + sigma * N(0, I)``;
- ``pseudo_inverse(y) = prox(0, y, lam_pinv) = (A^T A + lam_pinv I)^{-1} A^T y``, the
  Tikhonov-regularised least-squares estimate used as the no-prior reference;
- ``name``, ``to_dict()`` and :func:`from_dict` so a JSON sidecar rebuilds the operator exactly.

Operators are JAX pytrees: the arrays named in ``array_fields`` (kernels, masks) are leaves,
the hyper-parameters named in ``static_fields`` are hashable auxiliary data. They can therefore
be passed as jit arguments, closed over in ``lax.scan`` bodies and differentiated through.

Example::

    >>> import jax.numpy as jnp
    >>> from p2l_jax.operators import Denoising
    >>> op = Denoising()
    >>> float(op.prox(jnp.zeros((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3)), 1.0)[0, 0, 0, 0])
    0.5
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from p2l_jax.errors import P2LError

#: Default iteration cap of the conjugate-gradient prox (normal equations are SPD, and the
#: prox term ``lam I`` bounds their condition number by ``(||A||^2 + lam) / lam``).
CG_ITERS = 100
#: Default relative residual tolerance of the conjugate-gradient prox.
CG_TOL = 1e-6
#: Default Tikhonov weight of :meth:`LinearOperator.pseudo_inverse`.
PINV_LAM = 1e-3

#: name -> operator class, filled by ``__init_subclass__``; used by :func:`from_dict`.
OPERATOR_CLASSES: dict[str, type[LinearOperator]] = {}
#: Methods compiled as one XLA computation each (the operator itself is a pytree argument),
#: so eager calls compile once per shape instead of once per primitive; inside an outer
#: ``jit`` they are inlined.
JITTED_METHODS = ("forward", "adjoint", "prox")


class LinearOperator:
    """Base class of the degradation operators A (see the module docstring for the math).

    Subclasses set ``name`` (the key used in sidecars), ``array_fields`` (pytree leaves) and
    ``static_fields`` (hashable hyper-parameters, also the keyword arguments of ``__init__``
    recorded by ``to_dict``) and implement ``forward`` and ``adjoint``.
    """

    name: ClassVar[str] = ""
    array_fields: ClassVar[tuple[str, ...]] = ()
    static_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(cls, cls._tree_flatten, cls._tree_unflatten)
        for method in JITTED_METHODS:
            if method in cls.__dict__:
                setattr(cls, method, jax.jit(cls.__dict__[method]))
        if cls.name:
            OPERATOR_CLASSES[cls.name] = cls

    # ----- pytree -----
    def _tree_flatten(self):
        leaves = tuple(getattr(self, f) for f in self.array_fields)
        aux = tuple(getattr(self, f) for f in self.static_fields)
        return leaves, aux

    @classmethod
    def _tree_unflatten(cls, aux, leaves):
        # Bypass __init__: it does construction work (drawing kernels, building masks).
        obj = object.__new__(cls)
        for f, v in zip(cls.static_fields, aux):
            object.__setattr__(obj, f, v)
        for f, v in zip(cls.array_fields, leaves):
            object.__setattr__(obj, f, v)
        return obj

    # ----- the operator -----
    def forward(self, x: jax.Array) -> jax.Array:
        """``A x`` for NHWC ``x``."""
        raise NotImplementedError

    def adjoint(self, y: jax.Array) -> jax.Array:
        """``A^T y`` for a measurement ``y`` shaped like ``forward``'s output."""
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward(x)

    def validate_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`P2LError` if images of NHWC ``shape`` cannot be measured; default: any."""
        if len(shape) != 4:
            raise P2LError(f"{self.name}: expected NHWC images, got shape {tuple(shape)}")

    def prox(self, z: jax.Array, y: jax.Array, lam) -> jax.Array:
        """``argmin_x ||y - A x||^2 + lam ||x - z||^2``; generic CG unless overridden."""
        return self.prox_cg(z, y, lam)

    @functools.partial(jax.jit, static_argnames=("iters", "tol"))
    def prox_cg(self, z: jax.Array, y: jax.Array, lam, *, iters: int = CG_ITERS,
                tol: float = CG_TOL) -> jax.Array:
        """The prox by conjugate gradient on the normal equations, started at ``z``:

            (A^T A + lam I) x = A^T y + lam z.

        ``iters`` caps the iterations and ``tol`` is the relative residual tolerance
        ``||r|| <= tol ||b||`` over the whole batch (the system is block diagonal per image).
        Differentiable (``jax.scipy.sparse.linalg.cg`` uses an implicit linear-solve VJP).
        """
        b = self.adjoint(y) + lam * z

        def normal(v):
            return self.adjoint(self.forward(v)) + lam * v

        x, _ = jax.scipy.sparse.linalg.cg(normal, b, x0=z, tol=tol, maxiter=iters)
        return x

    def measure(self, x: jax.Array, key: jax.Array, sigma) -> jax.Array:
        """``y = A x + sigma * n`` with ``n ~ N(0, I)`` drawn from ``key``."""
        if isinstance(sigma, (int, float)) and sigma < 0:
            raise P2LError(f"measurement noise sigma must be >= 0, got {sigma}")
        y = self.forward(x)
        return y + sigma * jax.random.normal(key, y.shape, y.dtype)

    def pseudo_inverse(self, y: jax.Array, lam: float = PINV_LAM) -> jax.Array:
        """No-prior reference ``(A^T A + lam I)^{-1} A^T y``.

        Tikhonov-regularised least squares; tends to ``A^+ y`` as ``lam -> 0``.
        """
        x0 = self.adjoint(y)
        return self.prox(jnp.zeros_like(x0), y, lam)

    # ----- serialisation -----
    def params(self) -> dict[str, Any]:
        """The JSON-able constructor parameters; default: the static fields."""
        return {f: getattr(self, f) for f in self.static_fields}

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **params}``; :func:`from_dict` inverts it exactly."""
        return {"name": self.name, **self.params()}

    @classmethod
    def from_params(cls, **params) -> LinearOperator:
        return cls(**params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items()
                         if not isinstance(v, dict))
        return f"{type(self).__name__}({args})"


def from_dict(d: dict[str, Any]) -> LinearOperator:
    """Rebuild an operator from ``op.to_dict()`` (e.g. a ``degrade`` JSON sidecar's "operator")."""
    if not isinstance(d, dict) or "name" not in d:
        raise P2LError(f"operator description must be a dict with a 'name', got {d!r:.80}")
    params = dict(d)
    name = params.pop("name")
    if name not in OPERATOR_CLASSES:
        raise P2LError(f"unknown operator {name!r}; known: {', '.join(sorted(OPERATOR_CLASSES))}")
    try:
        return OPERATOR_CLASSES[name].from_params(**params)
    except TypeError as err:
        raise P2LError(f"operator {name!r}: bad parameters {sorted(params)}: {err}") from None


def measurement_shape(operator, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``A x`` for images of NHWC ``image_shape``: ``operator.forward`` traced on
    an abstract value (nothing is computed), for any operator with a ``forward``; the one
    shape rule of the solvers, the pipeline and the command line."""
    x = jax.ShapeDtypeStruct(tuple(int(v) for v in image_shape), jnp.float32)
    return tuple(jax.eval_shape(operator.forward, x).shape)
