"""One program compiled two ways in one process and timed interleaved: with the package's XLA
options against XLA's defaults (``--pair options``), or with the CPU form's Winograd
convolutions against Eigen for them (``--pair winograd``).

    python -m benchmarks.options_pair [--model sd15] [--resolution 128] [--program step|solve]
        [--rounds 3] [--pair options|winograd]

``step``: one P2L step (``full`` gradient, first timestep, no projection), as the throughput
benchmark compiles it; ``solve``: the whole solve with ``--steps`` steps and
``projection="none"`` (start and final decode included). Each is compiled once through
:func:`p2l_jax.jit.jit` (on the CPU: convolutions kept out of YNNPACK) and once with plain
``jax.jit`` (XLA's defaults), called once untimed, then timed round robin (``--rounds``
rounds), so load from other processes hits both alike. Prints the samples, their medians and
the change. With ``--pair winograd`` both compile through :func:`p2l_jax.jit.jit`; the second
is traced with ``p2l_jax.models.conv.WINOGRAD_MIN_CHANNELS`` out of reach, so every
convolution the Winograd rule would take runs in Eigen instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--program", choices=("step", "solve"), default="step")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pair", choices=("options", "winograd"), default="options")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from benchmarks.throughput import BenchConfig, build_model, problem_inputs
    from p2l_jax.jit import compiler_options
    from p2l_jax.solvers import split
    from p2l_jax.solvers.program import (initial_state, make_problem, run_whole,
                                         step_inputs)
    from p2l_jax.solvers.registry import solver_of

    cfg = BenchConfig(model=args.model, resolution=args.resolution, steps=args.steps)
    model, _ = build_model(cfg)
    a = problem_inputs(cfg, model)
    config, op, y, keys, C0 = (a[k] for k in ("config", "op", "y", "keys", "C0"))
    latent_shape = a["latent_shape"]
    if args.program == "solve":
        config = dataclasses.replace(config, projection="none")
    structure, settings = split(config)
    if args.program == "step":
        def fn(model, op, y, keys, settings, state, inp):
            problem = make_problem(model, op, y, keys, structure, settings)
            return solver_of(type(config)).step(problem, state, inp)

        state = jax.jit(lambda m, o, y, k, c, s: initial_state(
            make_problem(m, o, y, k, structure, s), c, latent_shape))(
                model, op, y, keys, C0, settings)
        inp = jax.tree_util.tree_map(lambda v: v[0], step_inputs(model, structure, settings, 1))
        fargs, statics = (model, op, y, keys, settings, state,
                          inp._replace(project=jnp.asarray(False))), {}
    else:
        fn = run_whole
        fargs = (model, op, y, keys, C0, None, settings)
        statics = {"structure": structure, "latent_shape": latent_shape}
    print(f"{args.program}, model {args.model}, {args.resolution} px, package options "
          f"{compiler_options() or 'none (XLA defaults)'}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    programs = {}
    for name, make, winograd in pair_programs(args.pair):
        start = time.perf_counter()
        with winograd_rule(winograd):
            fresh = lambda *a, **k: fn(*a, **k)  # a new function: traced under this rule
            programs[name] = make(fresh, static_argnames=tuple(statics)).lower(
                *fargs, **statics).compile()
        convs = programs[name].as_text().count(" convolution(")
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s, {convs} convolutions "
              "in the optimized program", flush=True)
    for prog in programs.values():
        jax.block_until_ready(prog(*fargs))
    samples = {name: [] for name in programs}
    for _ in range(args.rounds):
        for name, prog in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(prog(*fargs))
            samples[name].append(time.perf_counter() - start)
    med = {name: statistics.median(s) for name, s in samples.items()}
    for name, s in samples.items():
        print(f"{name}: {' / '.join(f'{v:.4g}' for v in s)} s, median {med[name]:.4g} s")
    first, second = programs
    print(f"{first} / {second}: {med[first] / med[second]:.3f}; load "
          f"{os.getloadavg()[0]:.1f}")
    return 0


def pair_programs(pair: str):
    """``--pair`` -> ((name, jit function, Winograd rule on), (name, ...)), the two ways."""
    import jax

    from p2l_jax.jit import jit
    return {"options": (("package", jit, True), ("defaults", jax.jit, True)),
            "winograd": (("winograd", jit, True), ("eigen", jit, False))}[pair]


@contextlib.contextmanager
def winograd_rule(on: bool):
    """Trace with the package's Winograd rule (``on``) or with none (the channel floor out of
    reach)."""
    from p2l_jax.models import conv

    saved = conv.WINOGRAD_MIN_CHANNELS
    if not on:
        conv.WINOGRAD_MIN_CHANNELS = sys.maxsize
    try:
        yield
    finally:
        conv.WINOGRAD_MIN_CHANNELS = saved


if __name__ == "__main__":
    sys.exit(main())
