"""``p2l-jax bench``: throughput of the compiled solver against the PyTorch reference.

A thin entry to :mod:`benchmarks.throughput` (same options; see its docstring). The benchmark
lives in the source checkout's ``benchmarks/`` folder, not in the installed package, and it
imports torch (a test and benchmark dependency only), so it is loaded on demand.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from p2l_jax.errors import P2LError

_CHECKOUT = Path(__file__).resolve().parents[2]


def _throughput():
    try:
        return importlib.import_module("benchmarks.throughput")
    except ModuleNotFoundError:
        if (_CHECKOUT / "benchmarks" / "throughput.py").is_file():
            sys.path.insert(0, str(_CHECKOUT))
            return importlib.import_module("benchmarks.throughput")
        raise P2LError("p2l-jax bench needs the source checkout's benchmarks/ folder "
                       "(run it from a clone of the repository)") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="throughput benchmark (JAX vs the PyTorch reference)",
                              description=__doc__.split("\n\n")[0])
    if (_CHECKOUT / "benchmarks" / "throughput.py").is_file():
        _throughput().add_arguments(p)
    p.set_defaults(func=lambda args: _throughput().main(args))
