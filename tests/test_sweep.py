"""p2l_jax.solvers.sweep: many settings of one solver structure in ONE compiled program
(vmapped over the settings), equal to separate solves. Tiny random SD 1.x, 2 images, 3 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p2l_jax.errors import P2LError
from p2l_jax.solvers import LDPSConfig, OptimizerConfig, P2LConfig, compiled_programs, solve, sweep
from p2l_jax.solvers.sweep import grid_points, with_values
from test_settings import problem  # noqa: F401  (the tiny model, 2 images, inpainting)

ROOT = Path(__file__).resolve().parents[1]
BASE = P2LConfig(num_steps=3, eta=0.3, optimizer=OptimizerConfig(learning_rate=1e-2))
# 8 points that vary every kind of P2L number at once: the latent step, the projection's
# weight and period, the prompt optimizer's learning rate and DDIM's eta
POINTS = [{"rho": r, "lam": l, "project_every": g, "optimizer.learning_rate": lr, "eta": e}
          for r, l, g, lr, e in [(0.1, 0.01, 1, 1e-2, 0.3), (0.3, 0.01, 2, 1e-2, 0.3),
                                 (1.0, 0.1, 1, 1e-3, 0.0), (3.0, 0.1, 3, 1e-2, 0.3),
                                 (0.3, 1.0, 1, 1e-1, 0.5), (0.3, 0.01, 1, 1e-2, 0.3),
                                 (0.1, 0.3, 2, 3e-2, 1.0), (1.0, 0.01, 1, 1e-2, 0.0)]]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


FIELDS = ("images", "latents", "embedding", "residual", "prompt_loss", "residual_final")


@pytest.fixture(scope="module")
def solves(problem):
    """The 8 points solved one by one (one compiled program)."""
    model, op, y, keys = problem
    configs = [with_values(BASE, p) for p in POINTS]
    with jax.default_matmul_precision("highest"):
        return configs, [solve(model, op, y, keys, c) for c in configs]


def test_sweep_of_8_points_is_one_program_equal_to_8_solves(problem, solves):
    model, op, y, keys = problem
    configs, alone = solves
    before = compiled_programs()
    with jax.default_matmul_precision("highest"):
        out = sweep(model, op, y, keys, BASE, POINTS, batched=False)
    assert compiled_programs() - before == 1
    assert out.points == POINTS and out.configs == configs
    assert out.results.images.shape == (8, 2, 64, 64, 3)
    assert out.results.residual.shape == (8, 2, 3)
    for p in range(8):
        for name in FIELDS:
            assert _rel(getattr(out.point(p), name), getattr(alone[p], name)) <= 1e-5, (p, name)
    images = np.asarray(out.results.images)
    assert min(np.abs(images[p] - images[0]).max() for p in range(1, 8)) > 1e-4  # all differ


def test_vmapped_sweep_is_one_program_within_the_batch_size_rounding(problem, solves):
    """The vmapped sweep runs the 8 points as one batch of 16: each point equals its solve
    up to the rounding a 16-row batch causes in that solve itself (XLA blocks bigger batches
    differently), measured here by solving the 8-times tiled batch; a point mixed up with
    another would differ by orders of magnitude more."""
    model, op, y, keys = problem
    configs, alone = solves
    before = compiled_programs()
    with jax.default_matmul_precision("highest"):
        out = sweep(model, op, y, keys, BASE, POINTS)
        assert compiled_programs() - before == 1
        tiled = [solve(model, op, jnp.tile(y, (8, 1, 1, 1)), jnp.tile(keys, 8), c) for c in configs]
    for p in range(8):
        for name in FIELDS:
            a, b = getattr(alone[p], name), getattr(tiled[p], name)[:2]
            rounding = max(_rel(b, a), 1e-6)
            assert _rel(getattr(out.point(p), name), a) <= 3 * rounding, (p, name, rounding)


def test_grid_forms_and_errors():
    grid = {"rho": [0.1, 0.3], "optimizer.learning_rate": [1e-3, 1e-2, 1e-1]}
    points = grid_points(grid)
    assert len(points) == 6 and points[1] == {"rho": 0.1, "optimizer.learning_rate": 1e-2}
    assert grid_points([{"lam": 1.0}]) == [{"lam": 1.0}]
    config = with_values(P2LConfig(), points[5])
    assert (config.rho, config.optimizer.learning_rate) == (0.3, 1e-1)
    with pytest.raises(P2LError, match="'beta' is not an option of P2LConfig"):
        with_values(P2LConfig(), {"beta": 1.0})
    with pytest.raises(P2LError, match="project_every"):
        with_values(P2LConfig(), {"project_every": 0})
    with pytest.raises(P2LError, match="'optimizer.learning_rate': optimizer is a Gradient"):
        with_values(P2LConfig(optimizer=optax.sgd(0.1)), {"optimizer.learning_rate": 0.2})
    with pytest.raises(P2LError, match="rho is a float, which has no options"):
        with_values(P2LConfig(), {"rho.x": 0.2})
    with pytest.raises(P2LError, match="K changes the program"):
        sweep(None, None, None, None, P2LConfig(), {"K": [1, 2]})
    with pytest.raises(P2LError, match="num_steps changes the program"):
        sweep(None, None, None, None, LDPSConfig(), {"num_steps": [2, 3]})


@pytest.mark.slow
def test_sweep_sharded_over_fake_devices_equals_one_device(tmp_path):
    """The sweep inside the pipeline's shard_map body: 2 fake CPU devices, each running all
    points on its half of the batch, equal to the unsharded sweep of each half."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_worker.py"), "sweep",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["shard_rows"] == 2
    assert report["shape"] == [3, 4, 64, 64, 3]
    assert report["max_rel"] <= 1e-5
