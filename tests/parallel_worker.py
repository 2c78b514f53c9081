"""Subprocess side of tests/test_parallel.py (fake CPU devices must be set before JAX starts).

    python tests/parallel_worker.py devices                      # 8 fake devices, prints JSON
    python tests/parallel_worker.py distributed PORT PID NPROC OUT_DIR
    python tests/parallel_worker.py sweep TMP_DIR                # a solver sweep on 2 devices
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ToyConfig:
    scale: float = 0.5


def toy_inputs(identities):
    """Per-identity input rows, derived from the identity (not the position)."""
    from p2l_jax.parallel import identity_hash

    return np.stack([np.random.RandomState(identity_hash(s) % 2**31).randn(4)
                     for s in identities]).astype(np.float32)


def toy_fn(batch, weights, config):
    """A per-sample function with a per-sample key; also reports the per-shard batch size."""
    import jax
    import jax.numpy as jnp

    def one(x, key):
        return jnp.tanh(x @ weights) * config.scale + jax.random.normal(key, (3,))

    rows = batch["x"].shape[0]
    return {"y": jax.vmap(one)(batch["x"], batch["key"]),
            "shard_rows": jnp.full((rows,), rows, jnp.int32)}


def toy_weights():
    return np.random.RandomState(0).randn(4, 3).astype(np.float32)


def run_toy(identities, mode="shard_map", devices=None, seed=7):
    """Restore-like toy run: returns ({identity: y}, per-shard rows seen)."""
    from p2l_jax.parallel import image_keys, shard_batch

    run = shard_batch(toy_fn, mode=mode, devices=devices)
    out = run({"x": toy_inputs(identities), "key": image_keys(seed, identities)},
              toy_weights(), ToyConfig())
    y = np.asarray(out["y"])
    return {s: y[i].tolist() for i, s in enumerate(identities)}, np.asarray(out["shard_rows"])


def devices_main():
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    all_ids = [f"dir/img-{i:02d}.png" for i in range(11)]
    results = []
    for n in (1, 2, 8):
        for mode in ("shard_map", "pmap"):
            for size in (1, 3, 5, 8, 11):
                ids = all_ids[:size][::-1] if size % 2 else all_ids[:size]  # vary positions
                values, rows = run_toy(ids, mode, jax.devices()[:n])
                results.append({"n": n, "mode": mode, "size": size, "values": values,
                                "shard_rows": sorted(set(rows.tolist()))})
    print(json.dumps({"device_count": jax.device_count(), "results": results}))


def distributed_main(port, pid, nproc, out_dir):
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    from p2l_jax.parallel import gather_via_files, init_distributed, my_share, process_count

    assert init_distributed(f"127.0.0.1:{port}", nproc, pid, env={})
    identities = [f"img-{i}" for i in range(7)]
    share = my_share(identities)
    values, _ = run_toy(share)
    payload = {"process": pid, "count": process_count(),
               "local_devices": len(jax.local_devices()), "values": values}
    gathered = gather_via_files(out_dir, "toy", payload, timeout_s=120, poll_s=0.1)
    if gathered is not None:
        with open(os.path.join(out_dir, "merged.json"), "w") as fh:
            json.dump(gathered, fh)
    jax.distributed.shutdown()


def sweep_main(tmp_dir):
    """A P2L sweep (3 points, mapped: each with a solve's shapes) over a batch of 4 sharded on
    2 fake devices against the same sweep on one device over each device's 2 images; prints
    the largest relative difference."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_num_cpu_devices", 2)
    sys.path.insert(0, os.path.dirname(__file__))
    from sd_fixtures import make_tiny_sd

    import p2l_jax
    from p2l_jax.operators import Inpainting
    from p2l_jax.parallel import shard_batch
    from p2l_jax.solvers import P2LConfig, program
    from p2l_jax.solvers.driver import prepare
    from p2l_jax.solvers.sweep import grid_points, stack, sweep, with_values

    model = p2l_jax.load_model(make_tiny_sd(os.path.join(tmp_dir, "tiny"), layout="sd1", seed=0))
    mask = np.ones((64, 64), np.float32)
    mask[16:48, 8:40] = 0.0
    op = Inpainting(mask)
    y = op.forward(np.random.RandomState(2).uniform(-0.8, 0.8, (4, 64, 64, 3)).astype(np.float32))
    keys = jax.random.split(jax.random.key(3), 4)
    base, grid = P2LConfig(num_steps=2), {"rho": [0.1, 0.3, 1.0]}
    reference = np.concatenate([np.asarray(sweep(model, op, y[i:i + 2], keys[i:i + 2], base,
                                                 grid, batched=False).results.images)
                                for i in (0, 2)], axis=1)

    def body(batch, model, operator, inputs, structure, latent_shape, varying):
        out = program.sweep_whole(model, operator, batch["y"], batch["key"], *inputs,
                                  structure=structure, latent_shape=latent_shape,
                                  varying=varying, batched=False)
        rows = jnp.full((batch["y"].shape[0],), batch["y"].shape[0], jnp.int32)
        return {"images": jnp.moveaxis(out.images, 0, 1), "rows": rows}  # batch-leading

    structure, settings, varying = stack([with_values(base, p) for p in grid_points(grid)])
    p = prepare(model, op, y, keys, base)
    run = shard_batch(body, mode="shard_map", devices=jax.devices())
    out = run({"y": p.y, "key": p.keys}, model, op, (p.C0, p.C_neg, settings), structure,
              p.latent_shape, varying)
    images = np.moveaxis(np.asarray(out["images"]), 1, 0)
    ref = np.asarray(reference, np.float64)
    rel = [float(np.linalg.norm(images[i] - ref[i]) / np.linalg.norm(ref[i])) for i in range(3)]
    print(json.dumps({"devices": jax.device_count(), "shard_rows": int(out["rows"][0]),
                      "shape": list(images.shape), "max_rel": max(rel)}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "devices":
        devices_main()
    elif sys.argv[1] == "sweep":
        sweep_main(sys.argv[2])
    else:
        distributed_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
