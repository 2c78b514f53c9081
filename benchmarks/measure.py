"""Timing, peak-memory and matmul-peak helpers shared by the benchmarks (JAX side only).

* :func:`median_time`: steady-state wall time of a call (after one warm-up), blocking on JAX
  outputs; the median of ``repeats`` calls, so one preempted call on a shared machine does
  not move it.
* :func:`conv_form`: a context that sets ``P2L_JAX_CONV`` (the convolution form of
  :mod:`p2l_jax.models.conv`, read when a function is traced) and restores it.
* :func:`in_loop`: a function jitted to run inside a ``lax.scan`` body, as the solver runs
  the networks (XLA:CPU compiles loop bodies differently from the entry computation).
* :func:`interleaved_times`: the same for several calls at once, round robin (one call of
  each per round), so a change of machine load between them (on a shared machine) hits all
  alike and their ratios hold better than the absolute times.
* :func:`peak_memory`: the accelerator's ``peak_bytes_in_use`` where the device reports memory
  statistics (GPU, TPU), else the process's resident-set high-water mark (``ru_maxrss``,
  CPU), which also counts the host copies of parameters and everything loaded before.
* :func:`matmul_peak`: FLOP/s of a large square matmul in the benchmark's dtype, measured in
  the same process: the denominator of the utilization figures.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp


def block(tree):
    """Wait for every JAX array in ``tree``; torch tensors and other leaves pass through."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
    return tree


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list]:
    """(median seconds, all samples) of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        block(fn())
    samples = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        block(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


#: Trips of :func:`in_loop`'s scan: XLA's while-loop simplifier inlines a loop of one trip
#: into the entry computation, so a one-trip scan does not measure a loop body.
LOOP_TRIPS = 2


def in_loop(f: Callable, carried: int = 0, package_options: bool = True) -> Callable:
    """``g(*args)`` = ``f(*args)``, jitted, computed ``LOOP_TRIPS`` times in a ``lax.scan``
    body; one call of ``g`` costs ``LOOP_TRIPS`` calls of ``f``. Each trip reads argument
    ``carried`` (a pytree of arrays) as ``x + 0 c``, with ``c`` a scalar of the previous trip's
    output, so XLA can neither hoist the body out of the loop (loop-invariant code motion) nor
    drop the loop. Compiled through :func:`p2l_jax.jit.jit` (the package's XLA:CPU options)
    or, with ``package_options`` False, plain ``jax.jit`` (XLA's defaults)."""
    from p2l_jax.jit import jit

    def g(*args):
        def body(c, _):
            moved = jax.tree_util.tree_map(lambda x: x + (0 * c).astype(x.dtype),
                                           args[carried])
            out = f(*args[:carried], moved, *args[carried + 1:])
            first = jax.tree_util.tree_leaves(out)[0]
            return first.reshape(-1)[0].astype(jnp.float32), out

        _, outs = jax.lax.scan(body, jnp.float32(0), None, length=LOOP_TRIPS)
        return jax.tree_util.tree_map(lambda y: y[-1], outs)

    return (jit if package_options else jax.jit)(g)


@contextlib.contextmanager
def conv_form(form: str):
    """Trace under ``P2L_JAX_CONV=form`` (``auto``, ``xla`` or ``cpu``); jit new functions
    inside, since a cached trace keeps the form it was traced with."""
    previous = os.environ.get("P2L_JAX_CONV")
    os.environ["P2L_JAX_CONV"] = form
    try:
        yield
    finally:
        os.environ.pop("P2L_JAX_CONV")
        if previous is not None:
            os.environ["P2L_JAX_CONV"] = previous


def interleaved_times(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """``{name: {"median_s", "samples_s", "first_call_s"} | {"error": str}}`` for each
    ``fns[name]()``: ``max(warmup, 1)`` untimed calls of each (the first timed apart, e.g. a
    compile on first call), then ``repeats`` rounds that call every function once in turn.
    A function that raises is reported with its error and left out of the rounds."""
    results, live = {}, {}
    for name, fn in fns.items():
        try:
            start = time.perf_counter()
            block(fn())
            results[name] = {"first_call_s": time.perf_counter() - start, "samples_s": []}
            for _ in range(warmup - 1):
                block(fn())
            live[name] = fn
        except Exception as err:  # e.g. torch.compile without a working toolchain
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    for _ in range(max(repeats, 1)):
        for name, fn in live.items():
            start = time.perf_counter()
            block(fn())
            results[name]["samples_s"].append(time.perf_counter() - start)
    for name in live:
        results[name]["median_s"] = statistics.median(results[name]["samples_s"])
    return results


def peak_memory(device=None) -> dict:
    """``{"kind": "device_peak_bytes_in_use" | "host_rss_high_water", "bytes": int}``."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics raise or return None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"kind": "device_peak_bytes_in_use", "bytes": int(stats["peak_bytes_in_use"])}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "host_rss_high_water",
            "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


def default_matmul_size(platform: str) -> int:
    """Large enough to reach the device's peak, small enough to run in about a second."""
    return 8192 if platform in ("gpu", "cuda", "rocm", "tpu") else 1024


def matmul_peak(dtype, n: int | None = None, repeats: int = 5) -> dict:
    """FLOP/s of an (n, n) @ (n, n) matmul in ``dtype``: 2 n^3 / median time."""
    platform = jax.devices()[0].platform
    n = n or default_matmul_size(platform)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    seconds, _ = median_time(lambda: matmul(a, b), repeats)
    return {"n": n, "dtype": jnp.dtype(dtype).name, "seconds": seconds,
            "flops_per_s": 2.0 * n ** 3 / seconds}
