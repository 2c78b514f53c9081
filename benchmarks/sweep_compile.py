"""Wall time and compiled programs of an 8-point P2L settings grid on the embedded model:
8 separate ``solve`` calls against one ``sweep`` (vmapped, and mapped one point after the
other), with the largest difference between the two ways' results.

    python -m benchmarks.sweep_compile [--mode solves|sweep|sweep-map|all] [--n 4] [--steps 10]

The grid is rho x lam (4 x 2, P2L's other settings at their defaults), on ``n`` validation
images of box inpainting (sigma_y 0.05), ``steps`` DDIM steps. ``--mode solves`` uses only
``solve`` and ``compiled_programs`` (which older versions have too), so the same command run
on a checkout from before settings became arrays measures the one-compile-per-point
baseline. Prints one JSON line per mode: seconds (compilation included: a fresh process),
programs compiled, and for ``all`` the max relative difference of each sweep's images from
the separate solves'. Timings depend on the machine's load: give ``uptime`` beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

RHO = (0.1, 0.3, 1.0, 3.0)
LAM = (0.01, 0.1)


def problem(n: int):
    from benchmarks import quality
    from p2l_jax import load_model

    model = load_model()
    imgs = quality.load_images("validation", n, model.image_size, 0)
    op = quality.operator_for("inpaint-box", model.image_size)
    return model, op, imgs.measure(op, 0.05), imgs.keys


def run(mode: str, n: int, steps: int) -> tuple[dict, np.ndarray]:
    import dataclasses

    from p2l_jax.solvers import P2LConfig, compiled_programs, solve

    model, op, y, keys = problem(n)
    base = P2LConfig(num_steps=steps)
    grid = [{"rho": r, "lam": l} for r in RHO for l in LAM]
    before, start = compiled_programs(), time.perf_counter()
    if mode == "solves":
        images = np.stack([np.asarray(solve(model, op, y, keys,
                                            dataclasses.replace(base, **p)).images)
                           for p in grid])
    else:
        from p2l_jax.solvers import sweep

        out = sweep(model, op, y, keys, base, grid, batched=mode == "sweep")
        images = np.asarray(jax.block_until_ready(out.results.images))
    seconds = time.perf_counter() - start
    return {"mode": mode, "points": len(grid), "images": n, "steps": steps,
            "seconds": round(seconds, 1), "programs_compiled": compiled_programs() - before,
            "load_average": [round(v, 2) for v in os.getloadavg()]}, images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="all", choices=("solves", "sweep", "sweep-map", "all"))
    p.add_argument("--n", type=int, default=4, help="validation images")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    modes = ("solves", "sweep", "sweep-map") if args.mode == "all" else (args.mode,)
    results = {}
    for mode in modes:
        record, results[mode] = run(mode, args.n, args.steps)
        if mode != "solves" and "solves" in results:
            ref = results["solves"].astype(np.float64)
            diff = results[mode] - ref
            record["max_rel_vs_solves"] = float(max(
                np.linalg.norm(diff[i]) / np.linalg.norm(ref[i]) for i in range(len(ref))))
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
