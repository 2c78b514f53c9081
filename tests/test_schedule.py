"""p2l_jax.schedule against diffusers' DDIMScheduler: alpha_bar, timesteps, DDIM steps."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from p2l_jax.errors import P2LError
from p2l_jax.schedule import (ScheduleConfig, ddim_update, eps_from_x0, model_output_to_x0_eps,
                              tweedie, v_to_eps, v_to_x0)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
SPACINGS = ("leading", "trailing", "linspace")
STEP_COUNTS = (10, 50, 250, 1000)


def _scaled_error(actual, expected, scale=1.0):
    """max |a - e| / max(1, |e|, scale).

    float32 cannot hold 1e-6 absolute on large entries (|x0| reaches ~40 at t ~ T, one ulp
    there is 4e-6), and XLA turns a division by a broadcast scalar into a multiplication by
    its reciprocal (1 ulp different from torch's division), an error that Tweedie's 1/sqrt(ab_t)
    then amplifies. So the error is measured relative to the largest term of the formula,
    ``scale`` = (|z_t| + |model output|) / sqrt(ab_t).
    """
    actual = np.asarray(actual)
    denom = np.maximum(np.maximum(1.0, np.abs(expected)), scale)
    return float((np.abs(actual - expected) / denom).max())


def _pair(**overrides):
    cfg = {**SD, **overrides}
    return ScheduleConfig.from_dict(cfg), diffusers.DDIMScheduler(**cfg)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(rescale_betas_zero_snr=True),
    dict(num_train_timesteps=777),
])
def test_alphas_cumprod_match_diffusers(overrides):
    ours, ref = _pair(**overrides)
    np.testing.assert_allclose(ours.alphas_cumprod(), ref.alphas_cumprod.numpy(),
                               rtol=1e-6, atol=1e-9)
    assert ours.alphas_cumprod().dtype == np.float32


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_identical(spacing, offset):
    ours, ref = _pair(timestep_spacing=spacing, steps_offset=offset)
    for n in STEP_COUNTS + (1, 7, 999):
        if spacing == "leading" and n * (1000 // n) - (1000 // n) + offset >= 1000:
            with pytest.raises(P2LError, match="steps_offset"):
                ours.timesteps(n)
            continue
        ref.set_timesteps(n)
        np.testing.assert_array_equal(ours.timesteps(n), ref.timesteps.numpy())


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_every_ddim_step_matches_diffusers(spacing, prediction_type, set_alpha_to_one):
    """All N steps of every listed count, eta 0 and 1 with shared noise, to 1e-6."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for n, eta in itertools.product(STEP_COUNTS, (0.0, 1.0)):
        # leading spacing with steps_offset 1 would reach t = T at N = T (diffusers indexes
        # out of range; we raise), so that one count runs with offset 0
        offset = 0 if (spacing == "leading" and n == 1000) else 1
        ours, ref = _pair(timestep_spacing=spacing, prediction_type=prediction_type,
                          set_alpha_to_one=set_alpha_to_one, steps_offset=offset)
        ref.set_timesteps(n)
        ts = ours.timesteps(n)
        sample = rng.standard_normal((n, 4, 2, 2)).astype(np.float32)
        out = rng.standard_normal((n, 4, 2, 2)).astype(np.float32)
        noise = rng.standard_normal((n, 4, 2, 2)).astype(np.float32)
        expect_prev, expect_x0 = [], []
        for i, t in enumerate(ts):
            r = ref.step(torch.from_numpy(out[i:i + 1]), int(t), torch.from_numpy(sample[i:i + 1]),
                         eta=eta, variance_noise=torch.from_numpy(noise[i:i + 1]))
            expect_prev.append(r.prev_sample.numpy())
            expect_x0.append(r.pred_original_sample.numpy())
        # vectorized over all steps: the (ab_t, ab_p) pairs the solvers use
        ab_t, ab_p = ours.alpha_bar_pairs(n)
        b = lambda a: jnp.asarray(a)[:, None, None, None]
        x0, eps = model_output_to_x0_eps(jnp.asarray(out), jnp.asarray(sample), b(ab_t),
                                         prediction_type)
        prev = ddim_update(x0, eps, b(ab_t), b(ab_p), eta, jnp.asarray(noise))
        scale = (np.abs(sample) + np.abs(out)) / np.sqrt(ab_t)[:, None, None, None]
        err = max(_scaled_error(prev, np.concatenate(expect_prev), scale),
                  _scaled_error(x0, np.concatenate(expect_x0), scale))
        worst = max(worst, err)
        # the per-timestep diffusers-shaped API, on a few steps
        for i in (0, n // 2, n - 1):
            p, x = ours.step(jnp.asarray(out[i:i + 1]), int(ts[i]), jnp.asarray(sample[i:i + 1]),
                             n, eta=eta, noise=jnp.asarray(noise[i:i + 1]))
            assert _scaled_error(p, expect_prev[i], scale[i:i + 1]) <= 1e-6
            assert _scaled_error(x, expect_x0[i], scale[i:i + 1]) <= 1e-6
    assert worst <= 1e-6, worst


def test_prediction_type_conversions_are_consistent():
    rng = np.random.default_rng(1)
    x0, eps = (jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32) for _ in range(2))
    ab = jnp.float32(0.3)
    z = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    v = jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
    np.testing.assert_allclose(v_to_eps(v, z, ab), eps, atol=1e-5)
    np.testing.assert_allclose(v_to_x0(v, z, ab), x0, atol=1e-5)
    np.testing.assert_allclose(tweedie(z, eps, ab), x0, atol=1e-5)
    np.testing.assert_allclose(eps_from_x0(z, x0, ab), eps, atol=1e-5)


def test_final_alpha_and_clip_sample_follow_config():
    ours, ref = _pair(set_alpha_to_one=True, clip_sample=True)
    assert ours.final_alpha_cumprod() == 1.0
    ref.set_timesteps(10)
    out = torch.full((1, 4, 2, 2), -3.0)
    sample = torch.full((1, 4, 2, 2), 2.0)
    t = int(ref.timesteps[-1])
    r = ref.step(out, t, sample)
    p, x = ours.step(jnp.asarray(out.numpy()), t, jnp.asarray(sample.numpy()), 10)
    np.testing.assert_allclose(np.asarray(x), r.pred_original_sample.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(p), r.prev_sample.numpy(), atol=1e-6)
    assert float(np.asarray(x).max()) == 1.0  # clipped


@pytest.mark.parametrize("bad", [dict(beta_schedule="cubic"), dict(timestep_spacing="middle"),
                                 dict(prediction_type="score"), dict(thresholding=True)])
def test_bad_options_raise_naming_the_option(bad):
    with pytest.raises(P2LError, match=next(iter(bad))):
        ScheduleConfig.from_dict({**SD, **bad})


def test_bad_step_count_raises():
    with pytest.raises(P2LError, match="num_steps"):
        ScheduleConfig.from_dict(SD).timesteps(1001)
