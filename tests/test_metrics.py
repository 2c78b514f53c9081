"""PSNR/SSIM against scikit-image, the measurement residual against numpy, optional LPIPS."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from p2l_jax import metrics
from p2l_jax.operators import SuperResolution


def _pair(shape=(3, 37, 29, 3), noise=0.2, seed=0):
    rs = np.random.RandomState(seed)
    ref = rs.uniform(-1, 1, shape).astype(np.float32)
    ref[1] = np.linspace(-1, 1, ref[1].size).reshape(ref[1].shape)  # smooth: different SSIM regime
    ref[-1] = np.sin(np.arange(shape[1])[:, None, None] / 3.0) * np.ones(shape[1:])
    x = np.clip(ref + noise * rs.randn(*shape), -1, 1).astype(np.float32)
    return x, ref


def test_ssim_matches_skimage_gaussian_window():
    x, ref = _pair()
    ours = np.asarray(metrics.ssim(x, ref))
    for i in range(x.shape[0]):
        sk = structural_similarity(x[i].astype(np.float64), ref[i].astype(np.float64),
                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                   data_range=2.0, channel_axis=-1)
        assert abs(ours[i] - sk) <= 1e-5, (i, ours[i], sk)
    assert len(set(np.round(ours, 3))) == 3  # the three regimes really differ


def test_ssim_of_identical_images_is_one_and_small_images_refused():
    _, ref = _pair()
    np.testing.assert_allclose(np.asarray(metrics.ssim(ref, ref)), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(ref[:, :10], ref[:, :10])


def test_psnr_matches_skimage_and_identical_is_null():
    x, ref = _pair()
    ours = np.asarray(metrics.psnr(x, ref))
    for i in range(x.shape[0]):
        assert abs(ours[i] - peak_signal_noise_ratio(ref[i], x[i], data_range=2.0)) < 1e-4
    rec = metrics.image_metrics(ref[:1], ref[:1])
    assert rec["psnr"] == [None] and rec["ssim"][0] == pytest.approx(1.0, abs=1e-6)


def test_measurement_residual_is_norm_of_y_minus_ax():
    x, ref = _pair((2, 16, 16, 3))
    op = SuperResolution(scale=2)
    y = np.asarray(op.forward(ref))
    expected = np.sqrt(((y - np.asarray(op.forward(x))) ** 2).reshape(2, -1).sum(1))
    np.testing.assert_allclose(np.asarray(metrics.measurement_residual(op, x, y)), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.measurement_residual(op, ref, y)), 0, atol=1e-5)


def test_lpips_optional():
    x, ref = _pair((2, 64, 64, 3))
    rec = metrics.image_metrics(x, ref)
    if not metrics.lpips_available():
        assert metrics.lpips(x, ref) is None and rec["lpips"] == [None, None]
        return
    d = np.asarray(metrics.lpips(x, ref))
    assert d.shape == (2,) and np.all(d > 0)
    np.testing.assert_allclose(np.asarray(metrics.lpips(ref, ref)), 0, atol=1e-6)
