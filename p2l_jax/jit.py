"""``jit``: ``jax.jit`` for the programs that run the networks, with the XLA:CPU options they need.

On the CPU backend the networks write every convolution in the form XLA:CPU runs in its Eigen
kernel (p2l_jax/models/conv.py). The XLA:CPU of jaxlib 0.10 hands most convolutions to the
YNNPACK library instead (``__ynn_fusion`` kernels in the optimized HLO), which is slower on
some of them: 279 ms against 92 ms in Eigen for the input gradient of a decoder up-sampler of
SD 1.5 at 128 px; in loop bodies the SD 1.5 decoder's vjp is 7% slower that way, the SD 1.5
solve at 256 px 14% (12.6% saved by this option), the isolated P2L step 6-8%, the embedded
model's solve 5% (docs/BENCHMARKS.md, "Convolutions kept out of YNNPACK by the package"; the
SD 1.5 solve at 128 px did not move). So these programs are
compiled with the DebugOptions field
``xla_cpu_experimental_ynn_fusion_type`` set to ``CPU_YNN_FUSION_TYPES``: XLA:CPU's default
list without ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``. The option is passed per program
(``jax.jit(..., compiler_options=...)``), so nothing else in the process changes.

It is not passed (XLA's defaults hold) when

* the default backend is not the CPU (GPU/TPU compilers have their own convolution paths),
* the networks use the plain convolution form (``P2L_JAX_CONV=xla``),
* the user's ``XLA_FLAGS`` names ``xla_cpu_experimental_ynn_fusion_type`` (theirs wins), or
* this jaxlib does not accept the option (a one-time probe compile fails): the option is
  experimental and its enum may change between releases.

``jit(fun, **kwargs)`` takes ``jax.jit``'s keyword arguments and returns a function with the
jitted function's ``__call__``, ``lower``, ``trace`` and ``_cache_size``. The choice is made at
each call (an environment read), and one ``jax.jit`` is kept per choice, so a process that
changes ``P2L_JAX_CONV`` between calls (the benchmarks do) compiles each form under its own
options.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np

#: The YNNPACK fusion kinds XLA:CPU keeps for these programs: jaxlib 0.10's default list
#: (individual dots, individual convolutions, reductions) without individual convolutions.
#: The value is the field's enum names, comma separated, as ``compiler_options`` parses them.
CPU_YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options() -> dict[str, str]:
    """The XLA options a network program compiles with now: ``{YNN_OPTION:
    CPU_YNN_FUSION_TYPES}`` or ``{}`` (module docstring)."""
    from p2l_jax.models.conv import conv_form

    if (jax.default_backend() != "cpu" or conv_form() != "cpu"
            or YNN_OPTION in os.environ.get("XLA_FLAGS", "")):
        return {}
    options = {YNN_OPTION: CPU_YNN_FUSION_TYPES}
    return options if _accepted(tuple(options.items())) else {}


@functools.lru_cache(maxsize=None)
def _accepted(items: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's CPU compiler takes the options (one compile of x + 1)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


class Jitted:
    """``fun`` jitted with the options :func:`compiler_options` gives at each call."""

    def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs = fun, jit_kwargs
        self._by_options: dict[tuple, Any] = {}

    def jitted(self):
        """The ``jax.jit`` of ``fun`` for the current options."""
        options = compiler_options()
        key = tuple(sorted(options.items()))
        if key not in self._by_options:
            self._by_options[key] = jax.jit(self._fun, compiler_options=options or None,
                                            **self._jit_kwargs)
        return self._by_options[key]

    def __call__(self, *args, **kwargs):
        return self.jitted()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted().lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        return self.jitted().trace(*args, **kwargs)

    def _cache_size(self) -> int:
        return sum(f._cache_size() for f in self._by_options.values())


def jit(fun: Callable | None = None, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` with :func:`compiler_options`; usable as a decorator,
    bare or with keyword arguments (``functools.partial(jit, static_argnames=...)`` too)."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return Jitted(fun, jit_kwargs)
