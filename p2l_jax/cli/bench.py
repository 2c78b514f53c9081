"""``p2l-jax bench``: throughput of the compiled solver against the PyTorch reference.

A thin entry to :mod:`benchmarks.throughput` (same options; see its docstring). The benchmark
lives in the source checkout's ``benchmarks/`` folder, not in the installed package, and it
imports torch (a test and benchmark dependency only). The command uses it when it is
importable as it stands (``python -m p2l_jax bench`` from the repository root, or the root on
``PYTHONPATH``); the package never adds the checkout to ``sys.path`` itself. Otherwise the
command says so in one line (exit 2).
"""

from __future__ import annotations

import importlib

from p2l_jax.errors import P2LError

#: What to do without the benchmark: the message of the one-line error.
NOT_FOUND = ("needs the source checkout's benchmarks/ package on the import path: run "
             "`python -m p2l_jax bench ...` or `python -m benchmarks.throughput ...` from the "
             "repository root (or put the root on PYTHONPATH)")


def _throughput():
    """(:mod:`benchmarks.throughput`, None), or (None, why not) when it cannot be imported;
    other commands keep working either way."""
    try:
        return importlib.import_module("benchmarks.throughput"), None
    except ModuleNotFoundError as err:
        if err.name in ("benchmarks", "benchmarks.throughput"):
            return None, NOT_FOUND
        return None, f"needs the module {err.name!r}, which is not installed"


def register(subparsers) -> None:
    throughput, problem = _throughput()
    about = dict(help="throughput benchmark (JAX vs the PyTorch reference)",
                 description=__doc__.split("\n\n")[0])
    if throughput is None:
        def missing(args) -> int:
            raise P2LError(problem)

        # no option is known here: take every word as is, so the error is ours, not argparse's
        p = subparsers.add_parser("bench", prefix_chars="\0", **about)
        p.add_argument("options", nargs="*")
        p.set_defaults(func=missing)
        return
    p = subparsers.add_parser("bench", **about)
    throughput.add_arguments(p)
    p.set_defaults(func=throughput.main)
