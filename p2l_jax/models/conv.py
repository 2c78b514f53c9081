"""2-D convolution of the networks (NHWC input, HWIO kernel), in the form XLA:CPU runs fast.

For x (B, H, W, I), kernel w (kh, kw, I, O), strides (s_h, s_w) and padding
((lo_h, hi_h), (lo_w, hi_w)) (torch's cross-correlation, as ``lax.conv_general_dilated``):

    y[b, p, q, o] = sum_{i, j, c} x_pad[b, s_h p + i, s_w q + j, c] w[i, j, c, o]

with x_pad = x padded by (lo, hi) zeros, Ho = (H + lo_h + hi_h - kh) // s_h + 1 (Wo alike).

On accelerators (and wherever ``P2L_JAX_CONV=xla``) this is plain ``lax.conv_general_dilated``.
On the CPU backend it is written so that every convolution XLA sees, forward and backward, is
one XLA:CPU hands to its Eigen kernel, because the others run in XLA's naive elemental loops
(ten times slower or worse):

* XLA:CPU calls Eigen only for a float32/float16 convolution with NHWC input, HWIO kernel,
  NHWC output and no window reversal. It rewrites other layouts into that form
  (ConvCanonicalization) only in the entry computation, not in the bodies of ``lax.scan``,
  ``cond`` or ``while``, where the solver's steps and the prompt-tuning loop run. The input
  gradient that JAX's conv transpose rule emits has an HWOI kernel (``01oi``) with window
  reversal, and the kernel gradient swaps batch and feature roles: both are elemental there.
  So the convolution is a ``jax.custom_vjp`` whose input gradient is itself a canonical
  convolution (:func:`input_gradient`: the kernel flipped in space with input/output channels
  swapped, the cotangent dilated by the stride and re-padded) and whose kernel gradient is a
  matrix product of image patches with the cotangent (:func:`kernel_gradient`).
* Where the map is smaller than the kernel (2x2 maps, 3x3 kernel), XLA's algebraic
  simplifier swaps the operands of the convolution, which leaves the Eigen form, and even in
  Eigen form a convolution over few positions and many channels is a poor GEMM. Such convs
  (output positions Ho Wo <= O, or a map smaller than the kernel) are computed as one matrix
  product of the patch matrix (B Ho Wo, kh kw I) with the kernel matrix (kh kw I, O)
  (:func:`patch_conv`); autodiff of that is matrix products, pads and adds.
* 1x1 convolutions without stride or padding are a matrix product over the channel axis.
* 3x3 convolutions with stride 1 and padding 1 on large maps with many channels (in SD 1.5,
  the VAE's levels with 256 or more channels on maps of 32x32 and up, and the UNet's
  320-channel level from 256 px images up) run as Winograd F(2x2, 3x3)
  (:func:`winograd_conv`; rule: ``WINOGRAD_MIN_CHANNELS``, ``WINOGRAD_MIN_POSITIONS``):
  Eigen runs them near the core's peak already, and Winograd does 4 multiply-adds per
  output position and channel pair where the direct form does 9.
* A nearest-neighbour x2 up-sampling followed by a 3x3 convolution (padding 1, stride 1: the
  decoders' ``Upsample2D``) is computed on the small map (:func:`upsample2x_conv2d`): each of
  the four output phases reads a 2x2 neighbourhood of the input with summed kernel taps, which
  is 16 multiply-adds per (input, output channel) pair and input position instead of 36.

Which kernel then runs these convolutions is a compile option: the programs that run the
networks compile through :func:`p2l_jax.jit.jit`, which on the CPU keeps them in Eigen (this
jaxlib's XLA:CPU would hand most of them to YNNPACK, slower here; see that module).

Outputs and gradients equal ``lax.conv_general_dilated``'s within float rounding (the sums
run in another order); ``tests/test_conv_form.py`` checks that and the compiled form.

Setting ``P2L_JAX_CONV`` [ours: ``auto``]: ``auto`` picks the CPU form when
``jax.default_backend()`` is ``cpu`` at trace time and plain ``lax.conv_general_dilated``
otherwise; ``xla`` forces the plain form, ``cpu`` the CPU form (both for measurements). It is
read when a function is traced, so set it before the first call.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from p2l_jax.errors import P2LError

Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMS = ("NHWC", "HWIO", "NHWC")
CONV_FORMS = ("auto", "xla", "cpu")


def conv_form() -> str:
    """The form this trace uses: ``xla`` or ``cpu`` (see the module docstring)."""
    form = os.environ.get("P2L_JAX_CONV", "auto")
    if form not in CONV_FORMS:
        raise P2LError(f"environment P2L_JAX_CONV={form!r} is not one of {CONV_FORMS}")
    if form == "auto":
        # Decided per trace from the default backend: a program traced for the CPU while
        # the default backend is an accelerator keeps the plain form (correct, slower).
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return form


def output_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // s + 1


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
    """y = x (*) kernel, NHWC / HWIO -> NHWC (module docstring); dtype of ``x``."""
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if conv_form() == "xla":
        return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMS)
    kh, kw, _, cout = kernel.shape
    if (kh, kw) == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0)):
        return _matmul(x, kernel.reshape(kernel.shape[2:]))
    ho = output_size(x.shape[1], kh, strides[0], padding[0])
    wo = output_size(x.shape[2], kw, strides[1], padding[1])
    if ho * wo <= cout or min(x.shape[1] * x.shape[2], ho * wo) < kh * kw:
        return patch_conv(x, kernel, strides, padding)
    if winograd_applies(x, kernel, strides, padding):
        return winograd_conv(x, kernel)
    return _canonical_conv(x, kernel, strides, padding)


#: Positions of the small map from which :func:`upsample2x_conv2d` computes on it [ours]. The
#: four phase kernels (16 I O values) are rebuilt at each call; on small maps with many
#: channels that costs more than the convolution saves: with the phase form on every map (no
#: threshold), SD 1.5's UNet forward at 128 px, whose up-samplers read 2x2 and 4x4 maps of 1280
#: channels, went from 0.87 to 1.87 s (`python -m benchmarks.cpu_breakdown --model sd15
#: --resolution 128`, one core, load 2.5, measured once when this threshold was set).
UPSAMPLE_PHASE_MIN_POSITIONS = 64


def _phase_taps(w: jax.Array) -> list[list[jax.Array]]:
    """Along the first axis of ``w`` (a 3x3 kernel's rows, or a row's columns): the taps of
    output phase 0, which reads input offsets (-1, 0), are (w_0, w_1 + w_2); of phase 1,
    offsets (0, +1), (w_0 + w_1, w_2). Nearest-neighbour x2 repeats each input row twice, so
    the 3x3 window of phase 0 covers input rows (p - 1, p, p) and that of phase 1 rows
    (p, p, p + 1)."""
    return [[w[0], w[1] + w[2]], [w[0] + w[1], w[2]]]


def upsample2x_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv2d(up2(x), kernel, padding 1) for a 3x3 kernel, with up2 nearest-neighbour x2:

        y[b, 2p + a, 2q + c, o] = sum_{t, u in {0, 1}} sum_i x_pad[b, p + a + t, q + c + u, i]
                                                              K_ac[t, u, i, o]

    with x_pad = x padded by one zero on each side and K_ac the phase kernel of output phase
    (a, c): its row taps are (w_0, w_1 + w_2) for a = 0 and (w_0 + w_1, w_2) for a = 1
    (:func:`_phase_taps`), its column taps likewise for c. The four phase kernels form one 2x2
    convolution with 4 O outputs over x_pad ((H + 1) x (W + 1) positions), whose shifted
    slices interleave into the (2H, 2W) output: 16 multiply-adds per input position and
    channel pair instead of the 36 of the 3x3 convolution on the (2H, 2W) map. Equal to that
    up to float rounding (taps are summed before the products). Plain form on accelerators
    (``conv_form() == "xla"``) and on maps under ``UPSAMPLE_PHASE_MIN_POSITIONS``.
    """
    if kernel.shape[:2] != (3, 3):
        raise P2LError(f"upsample2x_conv2d: kernel {kernel.shape} is not 3x3")
    b, h, w, _ = x.shape
    if conv_form() == "xla" or h * w < UPSAMPLE_PHASE_MIN_POSITIONS:
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv2d(up, kernel, (1, 1), ((1, 1), (1, 1)))
    cout = kernel.shape[-1]
    rows = _phase_taps(kernel.astype(jnp.float32))              # rows[a][t]: (3, I, O)
    taps = [[_phase_taps(rows[a][t]) for t in range(2)] for a in range(2)]
    # taps[a][t][c][u]: (I, O); the 2x2 kernel's output channels run over (a, c, o)
    phases = jnp.stack([jnp.stack([
        jnp.concatenate([taps[a][t][c][u] for a in range(2) for c in range(2)], axis=-1)
        for u in range(2)]) for t in range(2)]).astype(x.dtype)
    out = conv2d(x, phases, (1, 1), ((1, 1), (1, 1))).reshape(b, h + 1, w + 1, 2, 2, cout)
    rows_out = [jnp.stack([out[:, a:a + h, c:c + w, a, c] for c in range(2)], axis=3)
                for a in range(2)]                              # (B, H, W, 2, O) per a
    return jnp.stack(rows_out, axis=2).reshape(b, 2 * h, 2 * w, cout)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (..., K) @ b (K, N) accumulated in float32, in a's dtype."""
    out = lax.dot_general(a, b.astype(a.dtype), (((a.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
    return out.astype(a.dtype)


def patches(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
            padding: Padding) -> jax.Array:
    """(B, Ho, Wo, kh kw I): entry [b, p, q, (i kw + j) I + c] = x_pad[b, s_h p + i, s_w q + j, c],
    the order of ``kernel.reshape(kh kw I, O)``."""
    (kh, kw), (sh, sw) = window, strides
    ho = output_size(x.shape[1], kh, sh, padding[0])
    wo = output_size(x.shape[2], kw, sw, padding[1])
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    cols = [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


def patch_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
               padding: Padding) -> jax.Array:
    """The convolution as one matrix product: patches(x) (B Ho Wo, kh kw I) @ w (kh kw I, O)."""
    kh, kw, cin, cout = kernel.shape
    return _matmul(patches(x, (kh, kw), strides, padding), kernel.reshape(kh * kw * cin, cout))


def input_gradient(g: jax.Array, kernel: jax.Array, in_shape: tuple[int, ...],
                   strides: tuple[int, int], padding: Padding) -> jax.Array:
    """dL/dx for dL/dy = g as one NHWC/HWIO convolution:

        dx = dilate_s(g) (*) w~,    w~[i, j, o, c] = w[kh - 1 - i, kw - 1 - j, c, o]

    with dilate_s inserting s - 1 zeros between positions (``lhs_dilation``) and padding
    (k - 1 - lo, H + k - 1 - ((Ho - 1) s + 1) - (k - 1 - lo)) per axis, which makes the
    output H x W (the transpose of the forward map).
    """
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    pads = []
    for axis in range(2):
        k, s, lo = kernel.shape[axis], strides[axis], padding[axis][0]
        dilated_out = (g.shape[1 + axis] - 1) * s + 1
        before = k - 1 - lo
        pads.append((before, in_shape[1 + axis] + k - 1 - dilated_out - before))
    return lax.conv_general_dilated(g, flipped.astype(g.dtype), (1, 1), pads,
                                    lhs_dilation=strides, dimension_numbers=_DIMS)


def kernel_gradient(x: jax.Array, g: jax.Array, window: tuple[int, int],
                    strides: tuple[int, int], padding: Padding) -> jax.Array:
    """dL/dw = patches(x)^T g: (kh kw I, B Ho Wo) @ (B Ho Wo, O), reshaped to (kh, kw, I, O)."""
    p = patches(x, window, strides, padding)
    p = p.reshape(-1, p.shape[-1])
    dw = lax.dot_general(p, g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return dw.reshape(*window, x.shape[-1], g.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMS)


def _canonical_fwd(x, kernel, strides, padding):
    return _canonical_conv(x, kernel, strides, padding), (x, kernel)


def _canonical_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    dx = input_gradient(g, kernel, x.shape, strides, padding)
    dw = kernel_gradient(x, g, kernel.shape[:2], strides, padding)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_canonical_conv.defvjp(_canonical_fwd, _canonical_bwd)


#: When a 3x3, stride 1, padding 1 float32 convolution on the CPU runs as Winograd F(2x2, 3x3)
#: (:func:`winograd_conv`) instead of in Eigen [ours]: at least ``WINOGRAD_MIN_CHANNELS``
#: input and output channels and ``WINOGRAD_MIN_POSITIONS`` map positions. Eigen already runs
#: these convolutions at the core's multiply-add peak, so only the multiply count can shrink
#: (4 I O per output position instead of 9); the price is memory traffic. The data transforms
#: cost in proportion to H W (I + O) against savings in proportion to H W I O, hence the
#: channel floor (128x128x128: 1.1x Eigen's time); the kernel transform (16 I O values,
#: made where the forward runs, reused by the input gradient) costs in proportion to I O,
#: hence the map floor. Measured on one core of the development VM (docs/BENCHMARKS.md,
#: "Winograd F(2x2, 3x3)"): one convolution with its input gradient in a loop body
#: 0.62-0.95x Eigen's time at SD 1.5's shapes above both floors
#: (``python -m benchmarks.cpu_conv --tables winograd``); the SD 1.5 solve at 128 px 11.5%
#: faster (``python -m benchmarks.options_pair --pair winograd --program solve``).
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_POSITIONS = 32 * 32


def winograd_applies(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                     padding: Padding) -> bool:
    """Whether :func:`conv2d` computes this convolution with :func:`winograd_conv`: 3x3
    kernel, stride 1, padding 1, even H and W, float32, at least ``WINOGRAD_MIN_CHANNELS``
    input and output channels and ``WINOGRAD_MIN_POSITIONS`` positions H W."""
    kh, kw, cin, cout = kernel.shape
    _, h, w, _ = x.shape
    return ((kh, kw) == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1))
            and h % 2 == 0 and w % 2 == 0 and h * w >= WINOGRAD_MIN_POSITIONS
            and x.dtype == jnp.float32 and min(cin, cout) >= WINOGRAD_MIN_CHANNELS)


def _kernel_taps(t: jax.Array) -> list[jax.Array]:
    """G t along the first axis of ``t`` (3 taps): (t0, (t0 + t1 + t2) / 2,
    (t0 - t1 + t2) / 2, t2)."""
    return [t[0], (t[0] + t[1] + t[2]) * 0.5, (t[0] - t[1] + t[2]) * 0.5, t[2]]


def _data_taps(d: list[jax.Array]) -> list[jax.Array]:
    """B^T d over 4 inputs: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _output_taps(m: list[jax.Array]) -> list[jax.Array]:
    """A^T m over 4 inputs: (m0 + m1 + m2, m1 - m2 - m3)."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd_kernel(kernel: jax.Array) -> jax.Array:
    """U = G w G^T for a 3x3 kernel (3, 3, I, O): (16, I, O), entry 4 a + b = U[a, b]."""
    return jnp.stack([u for row in _kernel_taps(kernel) for u in _kernel_taps(row)])


#: The Winograd positions k = 4 a + b permuted by (a, b) -> (P[a], P[b]) with P = (3, 1, 2, 0):
#: reversing a 3-tap kernel reverses each row of G, which maps row a of G to row P[a], so the
#: transform of the flipped kernel is U[P[a], P[b]] (:func:`winograd_apply`, ``transpose``).
_FLIPPED = tuple(4 * p + q for p in (3, 1, 2, 0) for q in (3, 1, 2, 0))


def winograd_apply(x: jax.Array, u: jax.Array, transpose: bool = False) -> jax.Array:
    """The 3x3 convolution (stride 1, padding 1) of x (B, H, W, I), H and W even, whose
    transformed kernel is u = :func:`winograd_kernel` (w), by Winograd's F(2x2, 3x3): for the
    2x2 output tile at (2p, 2q) and its 4x4 input tile d = x_pad[2p:2p+4, 2q:2q+4],

        Y = A^T [sum_i (B^T d_i B) * U_i] A,    U_i = G w_i G^T  (elementwise product)

    with B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]], A^T = [[1, 1, 1, 0],
    [0, 1, -1, -1]]. The sum over input channels i for the 16 positions of the transformed
    tile is one batched matrix product (16, B H W / 4, I) @ (16, I, O): 4 I O multiply-adds
    per output position instead of 9. Equal to the direct convolution up to float rounding.

    ``transpose``: the convolution with the flipped kernel, channels swapped (w~[i, j, o, c] =
    w[2 - i, 2 - j, c, o], the input gradient's kernel), from the same u: its transform is
    U~[k] = U[F(k)]^T with F = ``_FLIPPED``, an involution, so the product at position k is
    V[k] @ U[F(k)]^T; it is computed as V[F(j)] @ U[j]^T for each j (the data taps taken in
    F's order, u contracted over its output axis) and read back at j = F(k). No flipped or
    transposed kernel is formed."""
    b, h, w, c = x.shape
    th, tw = h // 2, w // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = _data_taps([xp[:, i:i + 2 * th:2] for i in range(4)])       # 4 x (B, th, W+2, I)
    v = [t for r in rows for t in _data_taps([r[:, :, j:j + 2 * tw:2] for j in range(4)])]
    order = _FLIPPED if transpose else tuple(range(16))
    v = jnp.stack([v[k] for k in order]).reshape(16, b * th * tw, c)
    m = lax.dot_general(v, u.astype(x.dtype), (((2,), (2 if transpose else 1,)), ((0,), (0,))),
                        preferred_element_type=jnp.float32)
    m = [m[k].reshape(b, th, tw, -1) for k in order]                  # m[k]: position k
    out_rows = _output_taps([jnp.stack(m[4 * a:4 * a + 4]) for a in range(4)])  # 2 x (4, ...)
    y = jnp.stack([jnp.stack(_output_taps([r[k] for k in range(4)]), axis=3)
                   for r in out_rows], axis=2)                        # (B, th, 2, tw, 2, O)
    return y.reshape(b, h, w, -1).astype(x.dtype)


@jax.custom_vjp
def winograd_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv2d(x, kernel, stride 1, padding 1) for a 3x3 kernel by :func:`winograd_apply`. Its
    input gradient is the flipped-kernel convolution of the cotangent (:func:`input_gradient`),
    computed by Winograd from the same transformed kernel (``transpose``); the kernel gradient
    is the patch product (:func:`kernel_gradient`)."""
    return winograd_apply(x, winograd_kernel(kernel))


def _winograd_fwd(x, kernel):
    u = winograd_kernel(kernel)
    return winograd_apply(x, u), (x, kernel, u)


def _winograd_bwd(residuals, g):
    x, kernel, u = residuals
    dx = winograd_apply(g, u, transpose=True)
    dw = kernel_gradient(x, g, (3, 3), (1, 1), ((1, 1), (1, 1)))
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)
