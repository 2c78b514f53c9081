"""Compile time and per-step time of each solver and gradient variant on a model.

    python -m benchmarks.solver_step_times [--model DIR] [--steps 5] [--batch 1]
        [--only p2l:full ...]

Without --model: the test-sized SD 1.x layout with random parameters
(:func:`p2l_jax.random_model.random_model` ``"tiny"``, the layout of the tests' tiny
checkpoint; no file is written, no torch needed). Compile time = first call - second call
(the second call runs the same compiled program); per-step time = second call / steps.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


def cases(steps: int):
    from p2l_jax.solvers import (DDIMConfig, GMLDPSConfig, LDPSConfig, P2LConfig, PSLDConfig,
                                 VARIANTS)

    out = {}
    for v in VARIANTS:
        out[f"p2l:{v}"] = P2LConfig(num_steps=steps, project_every=2, gradient=v)
        out[f"ldps:{v}"] = LDPSConfig(num_steps=steps, gradient=v)
    out["p2l:full+remat"] = P2LConfig(num_steps=steps, project_every=2, remat=True)
    out["gml-dps:full"] = GMLDPSConfig(num_steps=steps)
    out["psld:full"] = PSLDConfig(num_steps=steps)
    out["ddim:cfg7.5"] = DDIMConfig(num_steps=steps)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="case names, e.g. p2l:full ldps:full")
    args = p.parse_args(argv)

    import p2l_jax
    from p2l_jax.operators import Inpainting
    from p2l_jax.solvers import DDIMConfig, solve

    from p2l_jax.random_model import random_model

    model_dir = args.model or "random tiny"
    model = p2l_jax.load_model(args.model) if args.model else random_model("tiny")
    size = model.image_size
    mask = np.ones((size, size), np.float32)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0
    op = Inpainting(mask)
    y = op.forward(jnp.zeros((args.batch, size, size, 3)) + 0.3)
    keys = jax.random.split(jax.random.key(0), args.batch)
    all_cases = cases(args.steps)
    names = args.only or list(all_cases)
    print(f"model {model_dir} ({model}), batch {args.batch}, {args.steps} steps, "
          f"device {jax.devices()[0].platform}")
    print("| solver:variant | compile s | per-step ms |")
    print("|---|---|---|")
    for name in names:
        cfg = all_cases[name]
        a = (None, None) if isinstance(cfg, DDIMConfig) else (op, y)
        t0 = time.perf_counter()
        jax.block_until_ready(solve(model, *a, keys, cfg))
        t1 = time.perf_counter()
        jax.block_until_ready(solve(model, *a, keys, cfg))
        t2 = time.perf_counter()
        print(f"| {name} | {(t1 - t0) - (t2 - t1):.1f} | {1e3 * (t2 - t1) / args.steps:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
