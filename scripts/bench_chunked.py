"""Throughput of the chunked sampler (p2l_jax.solvers.resumable) against the one-scan solve.

    python scripts/bench_chunked.py MODEL_DIR [STEPS]

A P2L solve of one 64x64 inpainting measurement, STEPS steps (default 20), as one scan, in
chunks of STEPS // 4, with a progress callback, and with an in-flight checkpoint after every
chunk. Each variant is compiled first; then 5 interleaved warm rounds; medians are printed.
(tests/sd_fixtures.py: ``make_tiny_sd(DIR)`` writes a tiny checkpoint to time on a CPU.)
"""

import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import p2l_jax
from p2l_jax.operators import Inpainting
from p2l_jax.solvers import OptimizerConfig, P2LConfig, solve


def main(model_dir: str, steps: int = 20, rounds: int = 5) -> None:
    model = p2l_jax.load_model(model_dir)
    size = model.image_size
    mask = np.ones((size, size), np.float32)
    mask[size // 4:3 * size // 4, size // 3:2 * size // 3] = 0
    op = Inpainting(mask)
    x = np.random.RandomState(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    y = op.forward(jnp.asarray(x))
    config = P2LConfig(num_steps=steps, eta=0.5, project_every=2,
                       optimizer=OptimizerConfig(learning_rate=1e-2))
    k = max(steps // 4, 1)
    progress = lambda done, n: None
    variants = {"one scan": {}, f"chunked k={k}": dict(chunk_steps=k),
                f"chunked k={k} + progress": dict(chunk_steps=k, on_chunk=progress),
                f"chunked k={k} + progress + checkpoint": dict(
                    chunk_steps=k, on_chunk=progress, checkpoint=tempfile.mkdtemp())}
    run = lambda kw: jax.block_until_ready(solve(model, op, y, jax.random.key(1), config, **kw))
    for kw in variants.values():
        run(kw)  # compile
    times = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, so background load affects every variant alike
        for name, kw in variants.items():
            start = time.perf_counter()
            run(kw)
            times[name].append(time.perf_counter() - start)
    print(f"{jax.devices()[0].device_kind}, {steps} steps, batch 1, {size}px, median of {rounds}")
    for name, ts in times.items():
        print(f"  {name:40s} {statistics.median(ts) * 1e3:9.1f} ms  (min {min(ts) * 1e3:.1f})")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
