"""Where the solve's compile time goes, per convolution form: lowering vs XLA compilation, and
the size of the program XLA optimizes.

    python -m benchmarks.compile_cost [--model embedded] [--steps 2] [--forms xla cpu]

For each form of :mod:`p2l_jax.models.conv` (``P2L_JAX_CONV``), in one process, it lowers the
whole P2L solve (:func:`p2l_jax.solvers.program.solve_prepared`, the program
``benchmarks/throughput.py`` reports as ``compile_s``) and compiles it, and prints:

* ``lower s`` (tracing + StableHLO emission) and ``compile s`` (XLA's passes and code
  generation), wall time;
* the instruction count of the lowered module (StableHLO ops, lines of ``as_text()`` with an
  ``=``) and of XLA's optimized HLO (``compiled.as_text()``), and in the optimized HLO the
  number of ``convolution``, ``dot`` and ``fusion`` instructions.

More instructions after optimization means more kernels for XLA:CPU's code generator, which is
where its compile time grows. Each form is compiled in its own trace; ``jax.clear_caches``
runs between forms so nothing is reused.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def hlo_counts(text: str) -> dict[str, int]:
    """Instruction counts of an HLO module's text: all, and by opcode for a few opcodes."""
    ops = re.findall(r"=\s*[^\s]+\s+([a-z][a-z0-9\-]*)\(", text)
    counts = {"instructions": len(ops)}
    for name in ("convolution", "dot", "fusion", "custom-call"):
        counts[name] = sum(op == name for op in ops)
    return counts


def measure_form(form: str, model_name: str, steps: int) -> dict:
    """Lower and compile the solve with ``P2L_JAX_CONV=form``; timings and counts."""
    import jax

    from benchmarks.measure import conv_form
    from benchmarks.throughput import BenchConfig, build_model, problem_inputs
    from p2l_jax.solvers import split
    from p2l_jax.solvers.program import solve_prepared

    cfg = BenchConfig(model=model_name, steps=steps, conv=form)
    jax.clear_caches()
    with conv_form(form):
        model, _ = build_model(cfg)
        inputs = problem_inputs(cfg, model)
        structure, settings = split(inputs["config"])
        op, y, keys, C0 = (inputs[k] for k in ("op", "y", "keys", "C0"))
        latent_shape = inputs["latent_shape"]
        t0 = time.perf_counter()
        lowered = solve_prepared.lower(model, op, y, keys, C0, None, settings,
                                       structure=structure, latent_shape=latent_shape)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    stablehlo = sum("=" in line for line in lowered.as_text().splitlines())
    return {"form": form, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "stablehlo_ops": stablehlo, **hlo_counts(compiled.as_text())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--forms", nargs="+", default=["xla", "cpu"], choices=("xla", "cpu"))
    args = p.parse_args(argv)
    print(f"model {args.model}, P2L solve of {args.steps} steps, load average "
          f"{os.getloadavg()[0]:.1f}, {len(os.sched_getaffinity(0))} usable CPUs\n")
    print("| conv form | lower s | compile s | StableHLO ops | optimized HLO instructions "
          "| convolution | dot | fusion |")
    print("|---|---|---|---|---|---|---|---|")
    for form in args.forms:
        r = measure_form(form, args.model, args.steps)
        print(f"| {form} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['stablehlo_ops']} "
              f"| {r['instructions']} | {r['convolution']} | {r['dot']} | {r['fusion']} |",
              flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
