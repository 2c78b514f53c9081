"""One 3x3 convolution, forward and input gradient, where the solver runs it: inside a
``lax.scan`` body. JAX's plain form, JAX's CPU form (:mod:`p2l_jax.models.conv`) and PyTorch.

    python -m benchmarks.cpu_conv [--repeats 20] [--batch 1] [--tables forms small-maps winograd]

For the shapes of the embedded model (64 px) and of SD 1.5 at 128 px, including the deepest,
smallest maps (2x2 and 4x4 with many channels), this times a float32 3x3 convolution with
padding 1 (forward, and the input gradient = vjp w.r.t. x) in three ways, median of
``--repeats`` after warm-up:

* ``xla``: ``lax.conv_general_dilated`` (NHWC/HWIO) and its autodiff transpose, traced inside
  a ``lax.scan`` body (:func:`benchmarks.measure.in_loop`), as the solver's steps and the
  prompt-tuning loop are. XLA:CPU
  canonicalizes convolutions to its Eigen form only in the entry computation, so there the
  input gradient (HWOI kernel) and convs on maps smaller than the kernel (operands swapped by
  the algebraic simplifier) run in the elemental loop emitter;
* ``cpu``: :func:`p2l_jax.models.conv.conv2d` in the same scan (canonical input-gradient
  conv; patch matrix product for small maps);
* ``torch``: ``torch.nn.functional.conv2d`` (NCHW, oneDNN) and, for the input gradient
  alone, ``torch.nn.grad.conv2d_input``.

Both JAX programs compute their result in a two-trip loop body that XLA can neither inline
nor hoist: the forward reads x through the loop carry, the input gradient (which does not
depend on x) the cotangent.

A second table weighs the CPU form's small-map rule: for maps at least as large as the kernel
with few positions and many channels (``SMALL_MAPS``), the forward plus input gradient in the
scan as the patch matrix product (:func:`p2l_jax.models.conv.patch_conv`) against the Eigen
convolution with the canonical input gradient (``_canonical_conv``), with the ratio of output
positions Ho Wo to output channels O on which :func:`p2l_jax.models.conv.conv2d` decides.
A third weighs the Winograd rule (``WINOGRAD_MAPS``): forward plus input gradient as
Winograd F(2x2, 3x3) (:func:`p2l_jax.models.conv.winograd_conv`, kernel transforms included)
against the Eigen convolution, and whether the rule picks Winograd for that shape.

Prints GFLOP/s (2 H W C_in C_out 9 per image and direction) and JAX / torch ratios. Timing a
convolution at top level instead (an entry computation, canonicalized) hides the slow form:
that is how docs/BENCHMARKS.md once concluded the convolutions were not the cause.
"""

from __future__ import annotations

import argparse
import os
import sys

#: (label, side, channels): embedded model at 64 px (decoder 64/32/16 px maps, UNet 2x2 level),
#: SD 1.5 at 128 px (decoder 128 px, UNet 16/4/2 px levels)
SHAPES = (("embedded 64x64x16", 64, 16), ("embedded 16x16x64", 16, 64),
          ("embedded 2x2x48", 2, 48), ("sd15@128 128x128x128", 128, 128),
          ("sd15@128 32x32x512", 32, 512), ("sd15@128 16x16x320", 16, 320),
          ("sd15@128 4x4x1280", 4, 1280), ("sd15@128 2x2x1280", 2, 1280))

#: (label, side, channels) for the small-map rule: UNet levels of the embedded model (8x8x64,
#: 4x4x64) and of SD 1.5 at 128 px (16/8/4 px) and 256 px (16x16x640)
SMALL_MAPS = (("embedded 8x8x64", 8, 64), ("embedded 4x4x64", 4, 64),
              ("sd15@128 16x16x320", 16, 320), ("sd15@128 8x8x640", 8, 640),
              ("sd15@128 4x4x1280", 4, 1280), ("sd15@256 16x16x640", 16, 640))

#: (label, side, channels) for the Winograd rule: VAE decoder levels of SD 1.5 at 128 px
#: (32x32x512, 64x64x256, 128x128x128), at 256 px (64x64x512, 128x128x256) and UNet levels
#: at 256 and 512 px (32x32x320, 64x64x320, 32x32x640), and two below the floors
WINOGRAD_MAPS = (("sd15@128 dec 32x32x512", 32, 512), ("sd15@128 dec 64x64x256", 64, 256),
                 ("sd15@128 dec 128x128x128", 128, 128), ("sd15@256 dec 64x64x512", 64, 512),
                 ("sd15@256 dec 128x128x256", 128, 256), ("sd15@256 unet 32x32x320", 32, 320),
                 ("sd15@512 unet 64x64x320", 64, 320), ("sd15@512 unet 32x32x640", 32, 640),
                 ("sd15@128 dec 16x16x512 (patch rule)", 16, 512))


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after two untimed calls (:func:`benchmarks.measure.median_time`,
    which also waits for JAX results)."""
    from benchmarks.measure import median_time

    return median_time(fn, repeats, warmup=2)[0]


def conv_programs(side: int, ch: int, batch: int):
    """``(fwd, fwd_args), (vjp, vjp_args)``: a 3x3 conv (padding 1) and its input gradient,
    each jitted in a ``lax.scan`` body (:func:`benchmarks.measure.in_loop`) under the
    current ``P2L_JAX_CONV``. The input gradient is linear in the cotangent and does not
    depend on x, so the loop carries the cotangent: carrying x would leave the body
    loop-invariant, and XLA would hoist it out of the loop and compute it once (which once
    halved this script's input-gradient times)."""
    import jax

    from benchmarks.measure import in_loop
    from p2l_jax.models.conv import conv2d

    x = jax.random.normal(jax.random.key(0), (batch, side, side, ch))
    w = jax.random.normal(jax.random.key(1), (3, 3, ch, ch)) * 0.05
    g = jax.random.normal(jax.random.key(2), x.shape)
    conv = lambda x, w: conv2d(x, w, (1, 1), ((1, 1), (1, 1)))
    vjp = lambda w, x, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
    return (in_loop(conv, carried=0), (x, w)), (in_loop(vjp, carried=2), (w, x, g))


def time_jax(side: int, ch: int, batch: int, repeats: int, form: str) -> tuple[float, float]:
    """(forward s, input-gradient s) of one conv in a ``lax.scan`` body, ``P2L_JAX_CONV=form``."""
    from benchmarks.measure import LOOP_TRIPS, conv_form

    with conv_form(form):
        (fwd, fargs), (bwd, bargs) = conv_programs(side, ch, batch)
        return (median_seconds(lambda: fwd(*fargs), repeats) / LOOP_TRIPS,
                median_seconds(lambda: bwd(*bargs), repeats) / LOOP_TRIPS)


def time_sub_forms(side: int, ch: int, batch: int, repeats: int,
                   names: tuple[str, ...]) -> dict[str, float]:
    """Seconds of forward + input gradient of one conv in a ``lax.scan`` body, per CPU sub-form
    in ``names`` (``patch``: :func:`~p2l_jax.models.conv.patch_conv`; ``eigen``: the canonical
    conv with its custom input gradient; ``winograd``: :func:`~p2l_jax.models.conv.winograd_conv`,
    kernel transforms included), whatever :func:`~p2l_jax.models.conv.conv2d` would pick."""
    import jax

    from benchmarks.measure import LOOP_TRIPS, in_loop
    from p2l_jax.models import conv

    x = jax.random.normal(jax.random.key(0), (batch, side, side, ch))
    w = jax.random.normal(jax.random.key(1), (3, 3, ch, ch)) * 0.05
    pad = ((1, 1), (1, 1))
    forms = {"patch": lambda x, w: conv.patch_conv(x, w, (1, 1), pad),
             "eigen": lambda x, w: conv._canonical_conv(x, w, (1, 1), pad),
             "winograd": conv.winograd_conv}
    out = {}
    for name in names:
        def both(c, w, f=forms[name]):
            y, pullback = jax.vjp(lambda c: f(c, w), c)
            return y + pullback(y)[0]
        prog = in_loop(both)
        out[name] = median_seconds(lambda: prog(x, w), repeats) / LOOP_TRIPS
    return out


def time_torch(side: int, ch: int, batch: int, repeats: int) -> tuple[float, float]:
    """(forward s, input-gradient s) in torch; the input gradient alone
    (``torch.nn.grad.conv2d_input``: aten's convolution backward for the input only), as the
    JAX input-gradient program computes it (its forward is dead code there)."""
    import torch

    x = torch.randn(batch, ch, side, side)
    w = torch.randn(ch, ch, 3, 3) * 0.05
    g = torch.randn(batch, ch, side, side)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w, padding=1)

    def bwd():
        with torch.no_grad():
            torch.nn.grad.conv2d_input(x.shape, w, g, padding=1)

    return median_seconds(fwd, repeats), median_seconds(bwd, repeats)


def forms_table(batch: int, repeats: int) -> None:
    """The xla / cpu / torch table over ``SHAPES``."""
    print("| conv 3x3, in scan | GFLOP | fwd GFLOP/s xla / cpu / torch | vjp GFLOP/s xla / cpu "
          "/ torch | JAX/torch fwd xla / cpu | JAX/torch vjp xla / cpu |")
    print("|---|---|---|---|---|---|")
    for label, side, ch in SHAPES:
        gflop = 2 * side * side * ch * ch * 9 * batch / 1e9
        (xf, xb), (cf, cb) = (time_jax(side, ch, batch, repeats, form) for form in ("xla", "cpu"))
        tf, tb = time_torch(side, ch, batch, repeats)
        rate = lambda *s: " / ".join(f"{gflop / v:.1f}" for v in s)
        print(f"| {label} | {gflop:.3f} | {rate(xf, cf, tf)} | {rate(xb, cb, tb)} "
              f"| {xf / tf:.2f} / {cf / tf:.2f} | {xb / tb:.2f} / {cb / tb:.2f} |", flush=True)


def small_map_table(batch: int, repeats: int) -> None:
    """patch product vs Eigen convolution over ``SMALL_MAPS`` (the small-map rule)."""
    print("\n| small map, 3x3, fwd + input grad in scan | Ho Wo / O | patch s | eigen s "
          "| patch / eigen |")
    print("|---|---|---|---|---|")
    for label, side, ch in SMALL_MAPS:
        t = time_sub_forms(side, ch, batch, repeats, ("patch", "eigen"))
        print(f"| {label} | {side * side / ch:.3g} | {t['patch']:.3g} | {t['eigen']:.3g} "
              f"| {t['patch'] / t['eigen']:.2f} |", flush=True)


def winograd_table(batch: int, repeats: int) -> None:
    """Winograd F(2x2, 3x3) vs Eigen convolution over ``WINOGRAD_MAPS`` (the Winograd rule)."""
    import jax
    import jax.numpy as jnp

    from p2l_jax.models import conv

    print("\n| 3x3 conv, fwd + input grad in scan | rule picks Winograd | eigen s | winograd s "
          "| winograd / eigen |")
    print("|---|---|---|---|---|")
    for label, side, ch in WINOGRAD_MAPS:
        t = time_sub_forms(side, ch, batch, repeats, ("eigen", "winograd"))
        x = jax.ShapeDtypeStruct((batch, side, side, ch), jnp.float32)
        w = jax.ShapeDtypeStruct((3, 3, ch, ch), jnp.float32)
        picks = conv.winograd_applies(x, w, (1, 1), ((1, 1), (1, 1)))
        print(f"| {label} | {'yes' if picks else 'no'} | {t['eigen']:.3g} | {t['winograd']:.3g} "
              f"| {t['winograd'] / t['eigen']:.2f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tables", nargs="+", choices=("forms", "small-maps", "winograd"),
                   default=["forms", "small-maps", "winograd"], help="which tables to print")
    args = p.parse_args(argv)
    import torch

    print(f"float32, batch {args.batch}, median of {args.repeats}, load average "
          f"{os.getloadavg()[0]:.1f}, {len(os.sched_getaffinity(0))} usable CPUs; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)\n")
    if "forms" in args.tables:
        forms_table(args.batch, args.repeats)
    if "small-maps" in args.tables:
        small_map_table(args.batch, args.repeats)
    if "winograd" in args.tables:
        winograd_table(args.batch, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
