"""P2L's prompt tuning as a research axis: objectives, the tuning window, the per-run learning
rate, the prompt space (C or the text encoder's token embeddings), guidance with the tuned C,
clipping, and the paper preset (tiny random SD 1.x model)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import p2l_jax
from sd_fixtures import inpainting_setup
from p2l_jax.errors import P2LError
from p2l_jax.schedule import tweedie
from p2l_jax.solvers import OptimizerConfig, P2LConfig, compiled_programs, gradients_at, solve
from p2l_jax.solvers.configs import split
from p2l_jax.solvers.driver import per_sample_keys
from p2l_jax.solvers.program import make_problem, step_inputs
from p2l_jax.solvers.prompt_objectives import OBJECTIVES, _draw_keys

STEPS = 4
BASE = P2LConfig(num_steps=STEPS, optimizer=OptimizerConfig(learning_rate=1e-2))


pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def setup(tiny_sd1_dir):
    return dict(inpainting_setup(p2l_jax.load_model(tiny_sd1_dir), batch=2, key_seed=5),
                z=jax.random.normal(jax.random.key(1), (2, 8, 8, 4)))


# ---------------------------------------------------------------- config-level behaviour
def test_per_run_learning_rate_is_a_budget():
    cfg = P2LConfig(num_steps=25, K=2, optimizer=OptimizerConfig(learning_rate=0.1, per_run=True))
    assert float(split(cfg)[1]["optimizer"]["learning_rate"]) == pytest.approx(0.1 / 50)
    absolute = P2LConfig(num_steps=25, K=2, optimizer=OptimizerConfig(learning_rate=0.1))
    assert float(split(absolute)[1]["optimizer"]["learning_rate"]) == pytest.approx(0.1)
    # the budget is data: the two configs share a structure (one compiled program)
    assert split(cfg)[0] == split(absolute)[0]


def test_paper_preset():
    cfg = P2LConfig.paper()
    assert (cfg.num_steps, cfg.K, cfg.project_every, cfg.lam, cfg.rho) == (1000, 1, 8, 1.0, 0.05)
    assert cfg.optimizer == OptimizerConfig() and cfg.projection == "prox"
    assert cfg.guidance_scale == 1.0 and cfg.prompt == ""
    assert P2LConfig.paper(num_steps=50).num_steps == 50
    assert P2LConfig() != cfg  # the defaults are this project's tuned ones
    # the project's prompt step is a per-run budget; the preset keeps the absolute 1e-4
    assert P2LConfig().optimizer.per_run and not cfg.optimizer.per_run


@pytest.mark.parametrize("kwargs, word", [
    (dict(prompt_objective="likelihood"), "prompt_objective"),
    (dict(gradient="joint", prompt_objective="marginal"), "joint"),
    (dict(prompt_draws=0), "prompt_draws"),
    (dict(tune_start=0.5, tune_stop=0.5), "tune_start"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt_space="words"), "prompt_space"),
    (dict(gradient="joint", prompt_space="tokens"), "prompt_space"),
])
def test_bad_prompt_options_are_refused(kwargs, word):
    with pytest.raises(P2LError, match=word):
        P2LConfig(**kwargs)


# ---------------------------------------------------------------- the objectives' math
def _problem(setup, cfg):
    structure, settings = split(cfg)
    m = setup["model"]
    C_neg = m.text_embeddings([cfg.negative_prompt]) if structure.guidance else None
    problem = make_problem(m, setup["op"], setup["y"], per_sample_keys(setup["keys"], 2),
                           structure, settings, C_neg)
    inp = jax.tree_util.tree_map(lambda a: a[1], step_inputs(m, structure, settings, 1))
    return problem, inp


@functools.partial(jax.jit, static_argnames=("cfg", "fn"))
def _at_step_1(model, op, y, keys, args, *, cfg, fn):
    """fn(problem, inp, *args) jitted, with the problem and step 1's inputs built inside (the
    reference computations of these tests, compiled once instead of run op by op)."""
    problem, inp = _problem(dict(model=model, op=op, y=y, keys=keys), cfg)
    return fn(problem, inp, *args)


def _reference(setup, cfg, fn, *args):
    return _at_step_1(setup["model"], setup["op"], setup["y"], setup["keys"], args, cfg=cfg, fn=fn)


def _residual_loss(problem, z0hat):
    d = problem.y - problem.operator.forward(problem.model.decode(z0hat))
    return jnp.sum(d.reshape(2, -1) ** 2, axis=1) / problem.y[0].size


def _objectives_and_formulas(problem, inp, z, C, lam):
    """(objective, its formula written from the model's networks) for each objective."""
    m, ab = problem.model, inp.ab_t
    z0 = tweedie(z, m.eps(z, inp.t, C), ab)
    pairs = {"tweedie": (OBJECTIVES["tweedie"](problem, z, inp, C), _residual_loss(problem, z0))}

    xis = [jax.vmap(lambda k: jax.random.normal(k, z.shape[1:]))(_draw_keys(problem, inp.index, i))
           for i in range(2)]
    want = sum(_residual_loss(problem, tweedie(zm, m.eps(zm, inp.t, C), ab)) for zm in
               (jnp.sqrt(ab) * z0 + jnp.sqrt(1 - ab) * xi for xi in xis)) / 2
    pairs["renoised"] = (OBJECTIVES["renoised"](problem, z, inp, C), want)

    post = m.encode(problem.operator.prox(m.decode(z0), problem.y, lam))
    ac = jnp.asarray(m.schedule.alphas_cumprod())
    want = 0.0
    for i, xi in enumerate(xis):
        s = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, ac.shape[0]))(
            _draw_keys(problem, inp.index, i))
        a = ac[s][:, None, None, None]
        d = m.eps(jnp.sqrt(a) * post + jnp.sqrt(1 - a) * xi, s, C) - xi
        want = want + jnp.mean(d.reshape(2, -1) ** 2, axis=1)
    pairs["marginal"] = (OBJECTIVES["marginal"](problem, z, inp, C), want / 2)
    return pairs


def test_objectives_follow_their_formulas(setup):
    """Each objective equals its docstring formula, written here from the model's networks."""
    z, C = setup["z"], jnp.broadcast_to(setup["C0"], (2, 77, 32))
    cfg = dataclasses.replace(BASE, prompt_draws=2)
    pairs = _reference(setup, cfg, _objectives_and_formulas, z, C, cfg.lam)
    assert set(pairs) == set(OBJECTIVES)
    for name, (got, want) in pairs.items():
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("objective", ["renoised", "marginal"])
def test_new_objectives_tune_C_per_sample(setup, objective):
    """The embedding moves, and sample 0's result does not depend on its batch mate."""
    cfg = dataclasses.replace(BASE, prompt_objective=objective, prompt_draws=2)
    both = solve(setup["model"], setup["op"], setup["y"], setup["keys"], cfg)
    C0 = np.broadcast_to(np.asarray(setup["C0"]), both.embedding.shape)
    assert np.abs(np.asarray(both.embedding) - C0).max() > 1e-3
    assert np.isfinite(np.asarray(both.prompt_loss)).all()
    # another batch mate (its measurement and key replaced), same shapes: one program
    y = setup["y"].at[1].set(setup["y"][1, ::-1])
    keys = setup["keys"].at[1].set(jax.random.key(99))
    other = solve(setup["model"], setup["op"], y, keys, cfg)
    np.testing.assert_allclose(other.embedding[0], both.embedding[0], atol=2e-5)
    assert np.abs(np.asarray(other.embedding[1]) - np.asarray(both.embedding[1])).max() > 1e-3


def test_tuning_window_is_data(setup):
    """tune_stop 0.5 tunes steps 0-1 only (losses NaN after, C frozen), without a compile."""
    full = solve(setup["model"], setup["op"], setup["y"], setup["keys"], BASE)
    before = compiled_programs()
    half = solve(setup["model"], setup["op"], setup["y"], setup["keys"],
                 dataclasses.replace(BASE, tune_stop=0.5))
    warm = solve(setup["model"], setup["op"], setup["y"], setup["keys"],
                 dataclasses.replace(BASE, tune_start=0.5))
    assert compiled_programs() == before
    assert np.isfinite(np.asarray(half.prompt_loss[:, :2])).all()
    assert np.isnan(np.asarray(half.prompt_loss[:, 2:])).all()
    assert np.isnan(np.asarray(warm.prompt_loss[:, :2])).all()
    assert np.isfinite(np.asarray(warm.prompt_loss[:, 2:])).all()
    # the first two steps of the half window are the full run's
    np.testing.assert_allclose(half.prompt_loss[:, :2], full.prompt_loss[:, :2], rtol=1e-5)
    assert not np.allclose(half.embedding, full.embedding)


def test_guidance_uses_the_tuned_prompt(setup):
    """With guidance w, eps = eps(z, C_null) + w (eps(z, C*) - eps(z, C_null)) at the tuned C*."""
    m, z = setup["model"], setup["z"]
    C = jnp.broadcast_to(m.text_embeddings(["a photo"]), (2, 77, 32))
    cfg = dataclasses.replace(BASE, guidance_scale=3.0, tune_prompt=False)
    g = gradients_at(m, setup["op"], setup["y"], z, C, 1, cfg)
    _, inp = _problem(setup, cfg)
    neg, pos = m.eps(z, inp.t, jnp.broadcast_to(m.text_embeddings([""]), C.shape)), m.eps(z, inp.t, C)
    np.testing.assert_allclose(g.eps, neg + 3.0 * (pos - neg), rtol=1e-4, atol=1e-5)
    plain = gradients_at(m, setup["op"], setup["y"], z, C, 1, dataclasses.replace(cfg, guidance_scale=1.0))
    np.testing.assert_allclose(plain.eps, pos, rtol=1e-5, atol=1e-6)


def test_clip_decoded(setup):
    """clip_decoded: the residual is of the clipped decoded estimate."""
    m, z, C = setup["model"], 3.0 * setup["z"], jnp.broadcast_to(setup["C0"], (2, 77, 32))
    cfg = dataclasses.replace(BASE, clip_decoded=True, tune_prompt=False)
    g = gradients_at(m, setup["op"], setup["y"], z, C, 1, cfg)
    x = m.decode(g.z0hat)
    assert float(jnp.abs(x).max()) > 1.0  # the test point decodes out of range
    d = setup["y"] - setup["op"].forward(jnp.clip(x, -1, 1))
    np.testing.assert_allclose(g.residual, jnp.sqrt(jnp.sum(d.reshape(2, -1) ** 2, axis=1)),
                               rtol=1e-5)


# ---------------------------------------------------------------- the token prompt space
TOKENS = dataclasses.replace(BASE, prompt_space="tokens",
                             optimizer=OptimizerConfig(name="sgd", learning_rate=0.5))


def test_token_embeddings_through_the_encoder_are_the_text_embeddings(setup):
    m = setup["model"]
    prompts = ["", "a red square"]
    e = m.token_embeddings(prompts)
    assert e.shape == (2, 77, 32)
    # eager here, jitted in text_embeddings: equal up to float32 rounding
    np.testing.assert_allclose(m.encode_token_embeddings(e), m.text_embeddings(prompts),
                               rtol=1e-5, atol=1e-6)


def _token_space_gradient(problem, inp, z, e):
    """grad_e of the summed tweedie objective at C = T(e)."""
    loss = lambda e: OBJECTIVES["tweedie"](problem, z, inp,
                                           problem.model.encode_token_embeddings(e)).sum()
    return jax.grad(loss)(e)


def test_token_space_step_is_a_gradient_step_on_e_through_the_encoder(setup):
    """K = 1, SGD: C* = T(e_0 - lr grad_e L(T(e))), the gradient taken here by jax.grad
    outside the solver's scan; the optimizer state carries e_1."""
    m, z = setup["model"], setup["z"]
    e0 = jnp.broadcast_to(m.token_embeddings([""]), (2, 77, 32))
    g = gradients_at(m, setup["op"], setup["y"], z, e0, 1, TOKENS)
    g_e = _reference(setup, TOKENS, _token_space_gradient, z, e0)
    assert float(jnp.abs(g_e).max()) > 0
    e1 = e0 - 0.5 * g_e
    np.testing.assert_allclose(g.g_C, g_e, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g.opt_state[0], e1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.C, m.encode_token_embeddings(e1), rtol=1e-4, atol=1e-5)
    # not the embedding-space step: the same objective's C-step lands elsewhere
    C0 = m.encode_token_embeddings(e0)
    in_C = gradients_at(m, setup["op"], setup["y"], z, C0, 1,
                        dataclasses.replace(TOKENS, prompt_space="embedding"))
    assert float(jnp.abs(in_C.C - g.C).max()) > 1e-3


def test_token_space_compiles_once_and_takes_its_numbers(setup):
    """Another learning rate or window reuses the token-space program and changes C; the
    starting C is the prompt's (solve embeds the prompt's tokens, not its C)."""
    m = setup["model"]
    untuned = solve(m, setup["op"], setup["y"], setup["keys"],
                    dataclasses.replace(TOKENS, tune_prompt=False))
    np.testing.assert_allclose(untuned.embedding, jnp.broadcast_to(setup["C0"], (2, 77, 32)),
                               atol=1e-6)
    first = solve(m, setup["op"], setup["y"], setup["keys"], TOKENS)
    before = compiled_programs()
    other = solve(m, setup["op"], setup["y"], setup["keys"], dataclasses.replace(
        TOKENS, optimizer=OptimizerConfig(name="sgd", learning_rate=2.0), tune_stop=0.5))
    assert compiled_programs() == before
    assert np.isfinite(np.asarray(first.prompt_loss)).all()
    assert np.abs(np.asarray(first.embedding) - np.asarray(untuned.embedding)).max() > 1e-4
    assert np.abs(np.asarray(other.embedding) - np.asarray(first.embedding)).max() > 1e-4
