"""Generic tests over every forward operator, plus kernels, masks and independent references.

A new operator joins the generic tests by being added to ``OPERATORS`` (a factory taking the
NHWC shape it will be applied to).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2l_jax import operators as ops
from p2l_jax.errors import P2LError

OPERATORS = {
    "sr-x3": lambda shape: ops.SuperResolution(3),
    "gaussian-blur-61": lambda shape: ops.GaussianBlur(),        # kernel larger than the image
    "motion-blur-9": lambda shape: ops.MotionBlur(9, 0.5, seed=3),
    "blur-free-kernel-4x3": lambda shape: ops.Blur(
        np.random.default_rng(0).uniform(size=(4, 3))),           # even size, asymmetric
    "inpaint-random": lambda shape: ops.Inpainting(ops.random_mask(shape[1:3], 0.7, seed=1)),
    "inpaint-freeform": lambda shape: ops.Inpainting(ops.freeform_mask(shape[1:3], seed=2)),
    "inpaint-soft-per-channel": lambda shape: ops.Inpainting(
        np.random.default_rng(1).uniform(size=shape[1:])),
    "denoise": lambda shape: ops.Denoising(),
}
# Non-square, odd sizes, 1-3 channels, batch 1-2; all divisible by the SR factor 3.
SHAPES = [(1, 6, 9, 3), (2, 12, 6, 1), (1, 15, 12, 2)]
NAMES = list(OPERATORS)


def _randn(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _dense_matrix(op, shape):
    """A as an (m, n) matrix, from forward on the n basis images (used as one batch)."""
    n = int(np.prod(shape[1:]))
    basis = jnp.eye(n, dtype=jnp.float64).reshape(n, *shape[1:])
    return np.asarray(op.forward(basis)).reshape(n, -1).T


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_adjoint_dot_product(name, shape):
    with jax.enable_x64(True):
        op = OPERATORS[name](shape)
        x = _randn(1, shape, jnp.float64)
        y = _randn(2, op.forward(x).shape, jnp.float64)
        lhs = float(jnp.vdot(op.forward(x), y))
        rhs = float(jnp.vdot(x, op.adjoint(y)))
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), abs(rhs)), (lhs, rhs)


@pytest.mark.parametrize("name", NAMES)
def test_prox_matches_dense_least_squares(name):
    shape, lam = (1, 6, 9, 3), 0.3
    with jax.enable_x64(True):
        op = OPERATORS[name](shape)
        a = _dense_matrix(op, shape)
        z = _randn(3, shape, jnp.float64)
        y = _randn(4, (a.shape[0],), jnp.float64).reshape(op.forward(z).shape)
        rhs = a.T @ np.asarray(y).ravel() + lam * np.asarray(z).ravel()
        expected = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), rhs)
        closed = np.asarray(op.prox(z, y, lam)).ravel()
        generic = np.asarray(op.prox_cg(z, y, lam, iters=1000, tol=1e-13)).ravel()
    scale = np.abs(expected).max()
    assert np.abs(closed - expected).max() <= 1e-5 * scale
    assert np.abs(generic - expected).max() <= 1e-5 * scale


@pytest.mark.parametrize("name", NAMES)
def test_measure_noise_statistics(name):
    shape, sigma = (4, 48, 48, 3), 0.05
    op = OPERATORS[name](shape)
    x = jnp.tanh(_randn(5, shape))
    clean = op.forward(x)
    y = op.measure(x, jax.random.key(7), sigma)
    resid = np.asarray(y - clean, np.float64).ravel()
    n = resid.size
    assert abs(resid.mean()) < 4 * sigma / np.sqrt(n)
    assert abs(resid.std() / sigma - 1) < 4 / np.sqrt(2 * n)
    np.testing.assert_array_equal(np.asarray(op.measure(x, jax.random.key(7), sigma)), y)
    assert not np.allclose(op.measure(x, jax.random.key(8), sigma), y)
    np.testing.assert_array_equal(np.asarray(op.measure(x, jax.random.key(7), 0.0)), clean)
    with pytest.raises(P2LError, match="sigma"):
        op.measure(x, jax.random.key(7), -0.1)


@pytest.mark.parametrize("name", NAMES)
def test_jit_grad_and_scan(name):
    shape, lam = (2, 12, 6, 3), 0.5
    op = OPERATORS[name](shape)
    x = _randn(6, shape)
    y = op.forward(_randn(7, shape))

    @jax.jit
    def under_transforms(o, v):
        # grad of the data term: d/dv 0.5||A v - y||^2 = A^T (A v - y)
        g = jax.grad(lambda u: 0.5 * jnp.sum((o.forward(u) - y) ** 2))(v)
        # d/dz sum(prox(z, y, lam)) = lam (A^T A + lam I)^{-1} 1 = prox(1, 0, lam)
        gz = jax.grad(lambda u: jnp.sum(o.prox(u, y, lam)))(v)
        scanned, _ = jax.lax.scan(lambda c, _: (o.prox(c, y, lam), None), v, None, length=3)
        return o.forward(v), g, gz, scanned

    fwd, grad, gz, scanned = under_transforms(op, x)
    looped = x
    for _ in range(3):
        looped = op.prox(looped, y, lam)
    np.testing.assert_allclose(fwd, op.forward(x), atol=1e-6)
    np.testing.assert_allclose(grad, op.adjoint(op.forward(x) - y), atol=1e-5)
    np.testing.assert_allclose(gz, op.prox(jnp.ones_like(x), jnp.zeros_like(y), lam), atol=1e-5)
    np.testing.assert_allclose(scanned, looped, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_to_dict_rebuilds_operator(name):
    shape = (1, 12, 6, 3)
    op = OPERATORS[name](shape)
    rebuilt = ops.from_dict(json.loads(json.dumps(op.to_dict())))
    assert type(rebuilt) is type(op) and rebuilt.to_dict() == op.to_dict()
    x = _randn(8, shape)
    np.testing.assert_array_equal(rebuilt.forward(x), op.forward(x))


@pytest.mark.parametrize("name", ["sr-x3", "inpaint-random", "denoise"])
def test_pseudo_inverse_fits_measurement(name):
    """Surjective operators: ``A A^+ y - y = -lam (A A^T + lam)^{-1} y``, so the relative
    residual is at most ``lam / (s_min^2 + lam)``, s_min the smallest singular value of A."""
    shape = (1, 6, 9, 3)
    op = OPERATORS[name](shape)
    y = op.forward(_randn(9, shape))
    x = op.pseudo_inverse(y)
    assert x.shape == shape
    with jax.enable_x64(True):
        a = _dense_matrix(op, shape)
    observed = np.abs(a).sum(axis=1) > 0          # rows of A (inpainting: observed pixels)
    s2 = np.linalg.eigvalsh(a[observed] @ a[observed].T).min()
    bound = ops.PINV_LAM / (s2 + ops.PINV_LAM)
    resid = float(jnp.linalg.norm(op.forward(x) - y) / jnp.linalg.norm(y))
    assert resid <= bound * 1.001 + 1e-6, (resid, bound)


def test_from_dict_rejects_unknown():
    with pytest.raises(P2LError, match="unknown operator 'nope'"):
        ops.from_dict({"name": "nope"})
    with pytest.raises(P2LError, match="bad parameters"):
        ops.from_dict({"name": "gaussian_blur", "radius": 3})


# ----- kernels -----

@pytest.mark.parametrize("size,sigma", [(61, 3.0), (121, 3.0), (7, 0.8), (4, 2.0)])
def test_gaussian_kernel_normalised_and_symmetric(size, sigma):
    k = ops.gaussian_kernel(size, sigma)
    assert k.shape == (size, size) and k.dtype == np.float32
    assert abs(float(k.sum(dtype=np.float64)) - 1) < 1e-6
    if size % 2:
        np.testing.assert_allclose(k, k.T, atol=1e-9)
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-9)
        assert k.argmax() == (size // 2) * size + size // 2


def test_motion_kernel_seeded():
    kernels = [ops.motion_kernel(61, 0.5, seed) for seed in range(4)]
    for k in kernels:
        assert k.shape == (61, 61) and abs(float(k.sum(dtype=np.float64)) - 1) < 1e-6
        assert (k >= 0).all() and (k > 0).sum() > 20   # a trajectory, not a delta
    np.testing.assert_array_equal(ops.motion_kernel(61, 0.5, 2), kernels[2])
    for i in range(4):
        for j in range(i):
            assert not np.allclose(kernels[i], kernels[j])
    with pytest.raises(P2LError, match="--intensity"):
        ops.motion_kernel(61, 1.5, 0)


def test_blur_operators_preserve_constants():
    x = jnp.full((1, 16, 20, 3), 0.3)
    for op in (ops.GaussianBlur(), ops.MotionBlur(seed=4)):
        np.testing.assert_allclose(op.forward(x), x, atol=1e-6)


# ----- masks -----

def test_box_mask_default_and_explicit():
    m = ops.box_mask(256)
    assert m.shape == (256, 256) and (m == 0).sum() == 128 * 128
    assert m[64:192, 64:192].max() == 0 and m[63, :].min() == 1 and m[:, 192].min() == 1
    m = ops.box_mask((20, 30), box_size=4, top=1, left=2)
    assert (m == 0).sum() == 16 and m[1:5, 2:6].max() == 0
    assert (ops.box_mask((32, 48)) == 0).sum() == 16 * 16
    with pytest.raises(P2LError, match="--box-size 40"):
        ops.box_mask(32, box_size=40)


def test_random_mask_fraction_and_seed():
    m = ops.random_mask((40, 30), 0.7, seed=0)
    assert set(np.unique(m)) == {0.0, 1.0} and (m == 0).sum() == round(0.7 * 1200)
    np.testing.assert_array_equal(ops.random_mask((40, 30), 0.7, seed=0), m)
    assert not np.array_equal(ops.random_mask((40, 30), 0.7, seed=1), m)
    with pytest.raises(P2LError, match="--fraction"):
        ops.random_mask(8, 1.2)


def test_freeform_mask_seeded_strokes():
    masks = [ops.freeform_mask((64, 48), seed) for seed in range(4)]
    for m in masks:
        assert m.shape == (64, 48) and set(np.unique(m)) <= {0.0, 1.0}
        assert 0.01 < (m == 0).mean() < 0.9
    np.testing.assert_array_equal(ops.freeform_mask((64, 48), 3), masks[3])
    assert len({m.tobytes() for m in masks}) == 4


def test_shape_errors_name_the_shape():
    with pytest.raises(P2LError, match="30x32 is not divisible by --scale 4"):
        ops.SuperResolution(4).forward(jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(P2LError, match="scale must be an integer"):
        ops.SuperResolution(2.5)
    with pytest.raises(P2LError, match="does not fit images of shape"):
        ops.Inpainting(ops.box_mask(16)).forward(jnp.zeros((1, 16, 18, 3)))


def test_registry_covers_cli_tasks_with_defaults():
    assert set(ops.TASKS) == {"sr", "gaussian-blur", "motion-blur", "inpaint-box",
                              "inpaint-random", "inpaint-freeform", "denoise"}
    assert ops.make_operator("sr", (256, 256)).to_dict()["scale"] == 4
    assert ops.make_operator("gaussian-blur", (256, 256)).to_dict() == {
        "name": "gaussian_blur", "kernel_size": 61, "sigma": 3.0}
    assert ops.make_operator("motion-blur", (256, 256)).to_dict()["intensity"] == 0.5
    m = ops.make_operator("inpaint-random", (64, 64)).mask
    assert abs(float(1 - m.mean()) - 0.7) < 1e-3
    with pytest.raises(P2LError, match="unknown --task 'deblur'"):
        ops.make_operator("deblur", (64, 64))


# ----- independent references on a real image -----

@pytest.fixture(scope="module")
def astronaut():
    skimage = pytest.importorskip("skimage")
    img = skimage.data.astronaut()[16:272, 112:368]      # 256 x 256 crop around the face
    return (img / 127.5 - 1).astype(np.float32)


def _psnr(a, b):
    # peak-to-peak 2 on the [-1, 1] scale
    return 10 * np.log10(4.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


def test_super_resolution_matches_pil_bicubic(astronaut):
    from PIL import Image
    ours = np.asarray(ops.SuperResolution(4).forward(jnp.asarray(astronaut[None])))[0]
    pil = np.stack([np.asarray(Image.fromarray(astronaut[:, :, c], mode="F").resize(
        (64, 64), Image.Resampling.BICUBIC, reducing_gap=None)) for c in range(3)], axis=-1)
    # PIL clips the kernel at the border and renormalises, MATLAB mirrors: the kernel reaches
    # 2 * scale = 8 input pixels, i.e. 2 output pixels from each edge.
    inner = np.abs(ours - pil)[2:-2, 2:-2].max()
    full, psnr = np.abs(ours - pil).max(), _psnr(ours, pil)
    print(f"\nSR x4 vs PIL bicubic (256->64): interior max|d| {inner:.2e}, "
          f"full max|d| {full:.2e}, PSNR {psnr:.1f} dB")
    assert inner < 1e-5
    assert psnr > 50


def test_gaussian_blur_matches_scipy_wrap(astronaut):
    ndimage = pytest.importorskip("scipy.ndimage")
    ours = np.asarray(ops.GaussianBlur(61, 3.0).forward(jnp.asarray(astronaut[None])))[0]
    ref = np.stack([ndimage.gaussian_filter(astronaut[:, :, c].astype(np.float64), 3.0,
                                            mode="wrap", truncate=30 / 3.0)
                    for c in range(3)], axis=-1)
    dps = np.stack([ndimage.gaussian_filter(astronaut[:, :, c].astype(np.float64), 3.0,
                                            mode="wrap") for c in range(3)], axis=-1)
    d, d_dps = np.abs(ours - ref).max(), np.abs(ours - dps).max()
    print(f"\nGaussian blur 61/3.0 vs scipy gaussian_filter(wrap, radius 30): max|d| {d:.2e}, "
          f"PSNR {_psnr(ours, ref):.1f} dB; vs default 4-sigma truncation: max|d| {d_dps:.2e}")
    assert d < 1e-5


def test_motion_blur_matches_scipy_convolve_wrap(astronaut):
    ndimage = pytest.importorskip("scipy.ndimage")
    op = ops.MotionBlur(61, 0.5, seed=0)
    ours = np.asarray(op.forward(jnp.asarray(astronaut[None])))[0]
    kernel = np.asarray(op.kernel, np.float64)
    ref = np.stack([ndimage.convolve(astronaut[:, :, c].astype(np.float64), kernel, mode="wrap")
                    for c in range(3)], axis=-1)
    d = np.abs(ours - ref).max()
    print(f"\nMotion blur 61/0.5 vs scipy convolve(wrap): max|d| {d:.2e}, "
          f"PSNR {_psnr(ours, ref):.1f} dB")
    assert d < 1e-5
