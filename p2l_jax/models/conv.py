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
