"""Settings as data (p2l_jax.solvers.configs.split): a solver's numbers are arrays of its one
compiled program, so a second solve with other numbers compiles nothing and still uses
them; its structure is static. On the tiny random SD 1.x checkpoint, 2 images, 3 steps."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

import p2l_jax
from p2l_jax.errors import P2LError
from p2l_jax.operators import Inpainting
from p2l_jax.solvers import (DDIMConfig, OptimizerConfig, P2LConfig, PSLDConfig,
                             compiled_programs, gradients_at, solve, split)

STEPS = 3


@pytest.fixture(scope="module")
def problem(tiny_sd1_dir):
    model = p2l_jax.load_model(tiny_sd1_dir)
    mask = np.ones((64, 64), np.float32)
    mask[16:48, 20:44] = 0.0
    op = Inpainting(mask)
    x = np.random.RandomState(0).uniform(-0.8, 0.8, (2, 64, 64, 3)).astype(np.float32)
    return model, op, op.forward(x), jax.random.split(jax.random.key(5), 2)


CASES = {
    "p2l": (P2LConfig(num_steps=STEPS, project_every=2, optimizer=OptimizerConfig(
        learning_rate=1e-2)),
            dict(rho=0.7, lam=0.3, eta=0.4, project_every=1,
                 optimizer=OptimizerConfig(learning_rate=3e-2, b1=0.8))),
    "psld": (PSLDConfig(num_steps=STEPS), dict(omega=0.5, gamma=0.3, rho=(0.2, 0.1, 0.05),
                                               eta=0.5)),
    "ddim": (DDIMConfig(num_steps=STEPS, guidance_scale=3.0), dict(guidance_scale=5.0, eta=0.3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_other_numbers_compile_nothing_and_are_used(problem, name):
    model, op, y, keys = problem
    config, changes = CASES[name]
    measured = name != "ddim"
    args = (model, op, y, keys) if measured else (model, None, None, keys)
    first = solve(*args, config)
    before = compiled_programs()
    other = solve(*args, dataclasses.replace(config, **changes))
    assert compiled_programs() == before
    diff = np.abs(np.asarray(other.latents) - np.asarray(first.latents)).max()
    assert diff > 1e-3  # the new numbers reached the program


def test_each_p2l_setting_alone_changes_the_result_without_a_compile(problem):
    """One number at a time, so none of them is silently ignored (read as a constant)."""
    model, op, y, keys = problem
    config = CASES["p2l"][0]
    base = solve(model, op, y, keys, config)
    before = compiled_programs()
    for changes in (dict(rho=0.9), dict(lam=1.0), dict(eta=0.5), dict(project_every=1),
                    dict(optimizer=OptimizerConfig(learning_rate=1e-1))):
        out = solve(model, op, y, keys, dataclasses.replace(config, **changes))
        assert np.abs(np.asarray(out.latents) - np.asarray(base.latents)).max() > 1e-4, changes
    assert compiled_programs() == before


def test_split_structure_holds_no_numbers_and_settings_are_arrays():
    sgd = P2LConfig(num_steps=4, optimizer=OptimizerConfig(name="sgd", momentum=0.9))
    structure, settings = split(sgd)
    assert dict(structure.options)["optimizer"] == ("sgd", True)
    assert set(settings) == {"eta", "rho", "project_every", "lam", "optimizer", "tune_start",
                             "tune_stop", "guidance_scale"}
    assert set(settings["optimizer"]) == {"learning_rate", "momentum"}
    assert settings["rho"].shape == (4,) and settings["project_every"].dtype == np.int32
    for leaf in jax.tree_util.tree_leaves(settings):
        assert isinstance(leaf, jax.Array)
    numbers = {0.0, 0.3, 0.01, 1e-4, 0.9}
    assert not numbers & {v for _, v in structure.options if isinstance(v, float)}
    with pytest.raises(AttributeError):
        structure.lam  # a number is not reachable from the structure
    # the same structure for other numbers: the same static argument, the same program
    assert split(dataclasses.replace(sgd, rho=2.0, lam=5.0))[0] == structure
    assert split(dataclasses.replace(sgd, K=2))[0] != structure
    # DDIM: guidance on/off is structure, its scale a setting
    assert split(DDIMConfig(guidance_scale=3.0))[0] == split(DDIMConfig(guidance_scale=7.0))[0]
    assert split(DDIMConfig(guidance_scale=1.0))[0] != split(DDIMConfig(guidance_scale=7.0))[0]
    # a user's optax transform is structure (no injectable numbers)
    tx = optax.sgd(1e-2)
    structure, settings = split(P2LConfig(num_steps=2, optimizer=tx))
    assert dict(structure.options)["optimizer"] is tx and settings["optimizer"] == {}


def test_p2l_gamma_is_now_project_every():
    with pytest.raises(P2LError, match="project_every"):
        P2LConfig(gamma=4)
    with pytest.raises(P2LError, match="project_every"):
        dataclasses.replace(P2LConfig(), gamma=4)
    assert PSLDConfig(gamma=0.01).gamma == 0.01  # PSLD's gamma is its loss weight


def test_injected_adam_equals_a_users_optax_adam(problem):
    """Adam with its numbers as arrays (inject_hyperparams) takes the same prompt step as the
    optax transform given directly (structure, no injectable numbers)."""
    model, op, y, keys = problem
    z = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    C = np.broadcast_to(np.asarray(model.text_embeddings([""])), (2, 77, model.embedding_dim))
    injected = P2LConfig(num_steps=STEPS, optimizer=OptimizerConfig(learning_rate=1e-2))
    direct = dataclasses.replace(injected, optimizer=optax.adam(1e-2))
    a, b = (gradients_at(model, op, y, z, C, 1, c) for c in (injected, direct))
    np.testing.assert_allclose(a.C, b.C, rtol=0, atol=1e-6)
    assert np.abs(np.asarray(a.C) - C).max() > 1e-3  # the step moved C
