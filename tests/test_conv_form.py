"""The networks' convolutions on the CPU backend: equal to ``lax.conv_general_dilated`` (outputs,
input and kernel gradients) and compiled to the form XLA:CPU hands to its Eigen kernel (NHWC
input, HWIO kernel, no window reversal) everywhere, inside the solver's scan and the prompt
tuning loop too. See p2l_jax/models/conv.py for why."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

#: (input H, W, C_in, C_out, kernel, stride, padding): every kind of conv the UNet and VAE hold
#: (3x3 symmetric, UNet down-sampler, VAE down-sampler padded right/bottom, 1x1), on maps large
#: enough for the canonical-conv path and small enough for the patch-matrix path.
CASES = [
    (16, 16, 8, 12, 3, 1, ((1, 1), (1, 1))),
    (9, 7, 6, 8, 3, 1, ((1, 1), (1, 1))),
    (16, 16, 8, 8, 3, 2, ((1, 1), (1, 1))),
    (16, 16, 8, 8, 3, 2, ((0, 1), (0, 1))),
    (9, 11, 4, 6, 3, 2, ((0, 1), (0, 1))),
    (4, 4, 48, 48, 3, 1, ((1, 1), (1, 1))),
    (2, 2, 48, 40, 3, 1, ((1, 1), (1, 1))),
    (4, 4, 64, 64, 3, 2, ((1, 1), (1, 1))),
    (3, 3, 16, 16, 3, 2, ((1, 1), (1, 1))),
    (1, 1, 8, 8, 3, 1, ((1, 1), (1, 1))),
    (8, 8, 8, 16, 1, 1, ((0, 0), (0, 0))),
]


def _reference(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}x{}x{}->{} k{} s{} p{}".format(*c))
def test_cpu_form_equals_xla_conv_with_gradients(case, monkeypatch):
    from p2l_jax.models.conv import conv2d

    monkeypatch.setenv("P2L_JAX_CONV", "cpu")
    h, w_, cin, cout, k, stride, padding = case
    kx, kw, kg = jax.random.split(jax.random.key(sum(case[:5])), 3)
    x = jax.random.normal(kx, (2, h, w_, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)
    y_ref, pull_ref = jax.vjp(lambda x, w: _reference(x, w, stride, padding), x, w)
    # fresh function objects: traced now, under P2L_JAX_CONV=cpu
    y, pull = jax.vjp(jax.jit(lambda x, w: conv2d(x, w, (stride, stride), padding)), x, w)
    g = jax.random.normal(kg, y_ref.shape)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    for got, want in [(y, y_ref), *zip(pull(g), pull_ref(g))]:
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("shape", [(8, 9, 8, 12), (9, 8, 40, 24), (3, 4, 16, 16)])
def test_upsampled_conv_equals_conv_of_the_upsampled_map_with_gradients(shape, monkeypatch):
    """upsample2x_conv2d (four phase kernels on the small map) against the plain 3x3
    convolution of the nearest-neighbour x2 map: outputs, input and kernel gradients."""
    from p2l_jax.models.conv import UPSAMPLE_PHASE_MIN_POSITIONS, upsample2x_conv2d
    from p2l_jax.models.layers import nearest_resize

    monkeypatch.setenv("P2L_JAX_CONV", "cpu")
    h, w_, cin, cout = shape
    kx, kw, kg = jax.random.split(jax.random.key(h * w_ + cin), 3)
    x = jax.random.normal(kx, (2, h, w_, cin))
    w = jax.random.normal(kw, (3, 3, cin, cout)) / np.sqrt(9 * cin)
    ref = lambda x, w: _reference(nearest_resize(x, (2 * h, 2 * w_)), w, 1, ((1, 1), (1, 1)))
    y_ref, pull_ref = jax.vjp(ref, x, w)
    y, pull = jax.vjp(jax.jit(upsample2x_conv2d), x, w)
    # the phase form (one product with 4 O outputs) from UPSAMPLE_PHASE_MIN_POSITIONS on
    jaxpr = jax.make_jaxpr(upsample2x_conv2d)(x, w).jaxpr
    phase_outputs = [v for e in jaxpr.eqns for v in e.outvars if v.aval.shape[-1:] == (4 * cout,)]
    assert bool(phase_outputs) == (h * w_ >= UPSAMPLE_PHASE_MIN_POSITIONS)
    g = jax.random.normal(kg, y_ref.shape)
    assert y.shape == y_ref.shape == (2, 2 * h, 2 * w_, cout)
    for got, want in [(y, y_ref), *zip(pull(g), pull_ref(g))]:
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("shape", [(2, 16, 12, 8, 12), (1, 8, 8, 12, 8)])
def test_winograd_form_equals_xla_conv_with_gradients(shape, monkeypatch):
    """winograd_conv (F(2x2, 3x3), its input gradient by Winograd too, kernel gradient as the
    patch product) against lax.conv_general_dilated: outputs, input and kernel gradients. The
    floors are lowered so that small maps take the Winograd path through conv2d."""
    from p2l_jax.models import conv

    monkeypatch.setenv("P2L_JAX_CONV", "cpu")
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 8)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_POSITIONS", 16)
    b, h, w_, cin, cout = shape
    kx, kw, kg = jax.random.split(jax.random.key(h * w_ + cin), 3)
    x = jax.random.normal(kx, (b, h, w_, cin))
    w = jax.random.normal(kw, (3, 3, cin, cout)) / np.sqrt(9 * cin)
    pad = ((1, 1), (1, 1))
    f = lambda x, w: conv.conv2d(x, w, (1, 1), pad)
    assert conv.winograd_applies(x, w, (1, 1), pad)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(f)(x, w))
    y_ref, pull_ref = jax.vjp(lambda x, w: _reference(x, w, 1, pad), x, w)
    y, pull = jax.vjp(jax.jit(f), x, w)
    g = jax.random.normal(kg, y_ref.shape)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    for got, want in [(y, y_ref), *zip(pull(g), pull_ref(g))]:
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale)


def test_winograd_rule_keeps_other_convolutions_in_their_forms(monkeypatch):
    """Below either floor, with an odd map side, a stride, other padding or bfloat16, conv2d
    does not take the Winograd path (the defaults: 256 channels, 32x32 positions)."""
    from p2l_jax.models import conv

    monkeypatch.setenv("P2L_JAX_CONV", "cpu")
    pad = ((1, 1), (1, 1))
    x = jax.ShapeDtypeStruct((1, 64, 64, 256), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 256, 256), jnp.float32)
    assert conv.winograd_applies(x, w, (1, 1), pad)
    others = [
        (jax.ShapeDtypeStruct((1, 64, 64, 128), jnp.float32),
         jax.ShapeDtypeStruct((3, 3, 128, 256), jnp.float32), (1, 1), pad),   # channels
        (jax.ShapeDtypeStruct((1, 30, 30, 256), jnp.float32), w, (1, 1), pad),  # positions
        (jax.ShapeDtypeStruct((1, 65, 64, 256), jnp.float32), w, (1, 1), pad),  # odd side
        (x, w, (2, 2), pad), (x, w, (1, 1), ((0, 1), (0, 1))),                  # stride, pad
        (jax.ShapeDtypeStruct((1, 64, 64, 256), jnp.bfloat16), w, (1, 1), pad),
    ]
    for xs, ws, strides, padding in others:
        assert not conv.winograd_applies(xs, ws, strides, padding)
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, (1, 1), pad))(
        jax.ShapeDtypeStruct((1, 30, 30, 256), jnp.float32), w))
    assert "conv_general_dilated" in jaxpr  # Eigen below the positions floor


def test_cpu_form_bfloat16_matches_within_bfloat16_rounding(monkeypatch):
    from p2l_jax.models.conv import conv2d

    monkeypatch.setenv("P2L_JAX_CONV", "cpu")
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) / 12.0
    for h in (8, 2):  # canonical and patch-matrix paths
        xs = x[:, :h, :h]
        want = _reference(xs, w, 1, ((1, 1), (1, 1)))
        got = jax.jit(lambda x, w: conv2d(x, w, (1, 1), ((1, 1), (1, 1))))(
            xs.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.02,
                                   atol=0.02 * float(jnp.abs(want).max()))


_CONV = re.compile(r"=\s*(\w+)\[[^\]]*\][^=]*?\bconvolution\((.*)$")


def slow_convolutions(hlo_text: str) -> list[str]:
    """The convolutions of an optimized XLA:CPU module that its Eigen kernel cannot run:
    dim labels other than NHWC/HWIO/NHWC (``b01f_01io->b01f``), a window reversal (the
    operand-swapped form of a conv whose map is smaller than its kernel), or an element type
    other than f32/f16."""
    bad = []
    for line in hlo_text.splitlines():
        m = _CONV.search(line)
        if not m:
            continue
        labels = re.search(r"dim_labels=([^,\s]+)", line).group(1)
        if (labels != "b01f_01io->b01f" or "rhs_reversal" in line
                or m.group(1) not in ("f32", "f16")):
            bad.append(line.strip()[:240])
    return bad


def ynn_convolutions(hlo_text: str) -> list[str]:
    """The convolutions of an optimized XLA:CPU module that run in YNNPACK: those inside the
    computations its ``__ynn_fusion`` instructions call (p2l_jax/jit.py says why not there)."""
    from hlo_text import computations

    bodies = computations(hlo_text)
    called = [re.search(r"calls=%([\w.\-]+)", line).group(1)
              for line in hlo_text.splitlines() if '"__ynn_fusion"' in line and "calls=%" in line]
    return [line.strip()[:240] for c in called for line in bodies.get(c, ())
            if _CONV.search(line)]


def test_ynn_convolution_finder_and_the_package_jit_keep_convolutions_out_of_ynnpack(
        monkeypatch):
    """XLA:CPU's default hands this scan-body convolution and its gradient to YNNPACK (the
    finder sees that); compiled through ``p2l_jax.jit.jit`` the same program has none there,
    unless the user's XLA_FLAGS names the option or the plain form is asked for."""
    from p2l_jax import jit as pjit
    from p2l_jax.models.conv import conv2d

    monkeypatch.setenv("P2L_JAX_CONV", "cpu")
    if not pjit.compiler_options():
        pytest.skip("this jaxlib does not take the YNNPACK fusion option")
    x, w = jnp.ones((1, 16, 16, 64)), jnp.ones((3, 3, 64, 64)) / 576.0  # YNNPACK-sized

    def program(x, w):
        body = lambda c, _: (c + jax.grad(lambda c: (conv2d(c, w, (1, 1), ((1, 1), (1, 1)))
                                                      ** 2).sum())(c), None)
        return lax.scan(body, x, None, length=2)[0]

    default = jax.jit(program).lower(x, w).compile().as_text()
    assert ynn_convolutions(default), "XLA:CPU's default no longer uses YNNPACK convolutions"
    ours = pjit.jit(program)
    hlo = ours.lower(x, w).compile().as_text()
    assert hlo.count("convolution(") >= 2 and not ynn_convolutions(hlo)
    assert not slow_convolutions(hlo)
    np.testing.assert_allclose(ours(x, w), jax.jit(program)(x, w), rtol=1e-5, atol=1e-6)
    assert ours._cache_size() == 1
    monkeypatch.setenv("P2L_JAX_CONV", "xla")  # plain form: XLA's defaults, its own program
    assert pjit.compiler_options() == {}
    ours(x, w)
    assert ours._cache_size() == 2
    monkeypatch.setenv("P2L_JAX_CONV", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+reduce")
    assert pjit.compiler_options() == {}


def test_slow_convolution_finder_flags_the_forms_xla_emits_for_conv_gradients():
    """The finder itself: JAX's own conv transpose inside a scan body, and a conv on a 2x2 map,
    compile to the forms the networks must not contain."""
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    pads = ((1, 1), (1, 1))

    def scanned(f):
        return jax.jit(lambda x, w: lax.scan(lambda c, _: (f(c, w), None), x, None,
                                              length=2)[0]).lower(x, w).compile().as_text()

    input_grad = lambda x, w: jax.grad(lambda x: (_reference(x, w, 1, pads) ** 2).sum())(x)
    assert slow_convolutions(scanned(input_grad))
    forward = scanned(lambda x, w: _reference(x, w, 1, pads))  # 8x8 forward: Eigen form
    assert "convolution(" in forward and not slow_convolutions(forward)
    small = jax.jit(lambda x, w: jax.grad(lambda x: (_reference(x, w, 1, pads) ** 2).sum())(x))
    assert slow_convolutions(small.lower(x[:, :2, :2], w).compile().as_text())


def test_p2l_step_and_solve_compile_only_fast_convolutions():
    """Regression (issue 16): the P2L step program (prompt-tuning loop, latent gradient,
    projection) and a 2-step solve (the step inside ``lax.scan``) on the embedded model hold
    no convolution outside XLA:CPU's Eigen form, and none in YNNPACK."""
    import p2l_jax
    from p2l_jax.operators import make_operator
    from p2l_jax.solvers import P2LConfig
    from p2l_jax.solvers.driver import prepare
    from p2l_jax.solvers.program import initial_state, make_problem, solve_prepared, step_inputs
    from p2l_jax.solvers.registry import solver_of
    from p2l_jax.jit import jit

    assert jax.default_backend() == "cpu"  # tests/conftest.py pins JAX_PLATFORMS=cpu
    model = p2l_jax.load_model()
    op = make_operator("inpaint-random", (64, 64))
    y = jnp.zeros((1, 64, 64, 3))
    config = P2LConfig(num_steps=2)
    p = prepare(model, op, y, jax.random.key(0), config)
    structure, settings = p.structure, p.settings

    def step(model, op, y, keys, C0, settings, inp):
        problem = make_problem(model, op, y, keys, structure, settings)
        return solver_of(P2LConfig).step(problem, initial_state(problem, C0, p.latent_shape), inp)

    inp = jax.tree_util.tree_map(lambda a: a[0], step_inputs(model, structure, settings, 1))
    step_hlo = jit(step).lower(model, op, p.y, p.keys, p.C0, settings,
                                   inp).compile().as_text()
    solve_hlo = solve_prepared.lower(model, op, p.y, p.keys, p.C0, p.C_neg, settings,
                                     structure=structure,
                                     latent_shape=p.latent_shape).compile().as_text()
    for name, hlo in (("step", step_hlo), ("solve", solve_hlo)):
        assert hlo.count("convolution(") > 20, name  # the networks' convs are there
        bad = slow_convolutions(hlo)
        assert not bad, f"{name}: {len(bad)} slow convolutions, e.g. {bad[:3]}"
        in_ynn = ynn_convolutions(hlo)
        assert not in_ynn, f"{name}: {len(in_ynn)} convolutions in YNNPACK, e.g. {in_ynn[:2]}"
