"""One 3x3 convolution, forward and input gradient, where the solver runs it: inside a
``lax.scan`` body. JAX's plain form, JAX's CPU form (:mod:`p2l_jax.models.conv`) and PyTorch.

    python -m benchmarks.cpu_conv [--repeats 20] [--batch 1]

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
* ``torch``: ``torch.nn.functional.conv2d`` (NCHW, oneDNN) and autograd.

A second table weighs the CPU form's small-map rule: for maps at least as large as the kernel
with few positions and many channels (``SMALL_MAPS``), the forward plus input gradient in the
scan as the patch matrix product (:func:`p2l_jax.models.conv.patch_conv`) against the Eigen
convolution with the canonical input gradient (``_canonical_conv``), with the ratio of output
positions Ho Wo to output channels O on which :func:`p2l_jax.models.conv.conv2d` decides.

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


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after two untimed calls (:func:`benchmarks.measure.median_time`,
    which also waits for JAX results)."""
    from benchmarks.measure import median_time

    return median_time(fn, repeats, warmup=2)[0]


def time_jax(side: int, ch: int, batch: int, repeats: int, form: str) -> tuple[float, float]:
    """(forward s, input-gradient s) of one conv in a ``lax.scan`` body, ``P2L_JAX_CONV=form``."""
    import jax
    import jax.numpy as jnp

    from benchmarks.measure import LOOP_TRIPS, conv_form, in_loop
    from p2l_jax.models.conv import conv2d

    x = jax.random.normal(jax.random.key(0), (batch, side, side, ch))
    w = jax.random.normal(jax.random.key(1), (3, 3, ch, ch)) * 0.05
    g = jnp.ones_like(x)
    conv = lambda x, w: conv2d(x, w, (1, 1), ((1, 1), (1, 1)))
    vjp = lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]

    with conv_form(form):
        fwd, bwd = in_loop(conv), in_loop(vjp)
        return (median_seconds(lambda: fwd(x, w), repeats) / LOOP_TRIPS,
                median_seconds(lambda: bwd(x, w, g), repeats) / LOOP_TRIPS)


def time_small_map_forms(side: int, ch: int, batch: int, repeats: int) -> dict[str, float]:
    """Seconds of forward + input gradient of one conv in a ``lax.scan`` body, per CPU sub-form
    (``patch``: :func:`~p2l_jax.models.conv.patch_conv`, ``eigen``: the canonical conv with its
    custom input gradient), whatever :func:`~p2l_jax.models.conv.conv2d` would pick."""
    import jax

    from benchmarks.measure import LOOP_TRIPS, in_loop
    from p2l_jax.models import conv

    x = jax.random.normal(jax.random.key(0), (batch, side, side, ch))
    w = jax.random.normal(jax.random.key(1), (3, 3, ch, ch)) * 0.05
    pad = ((1, 1), (1, 1))
    forms = {"patch": lambda x, w: conv.patch_conv(x, w, (1, 1), pad),
             "eigen": lambda x, w: conv._canonical_conv(x, w, (1, 1), pad)}
    out = {}
    for name, f in forms.items():
        def both(c, w, f=f):
            y, pullback = jax.vjp(lambda c: f(c, w), c)
            return y + pullback(y)[0]
        prog = in_loop(both)
        out[name] = median_seconds(lambda: prog(x, w), repeats) / LOOP_TRIPS
    return out


def time_torch(side: int, ch: int, batch: int, repeats: int) -> tuple[float, float]:
    import torch

    x = torch.randn(batch, ch, side, side)
    w = torch.randn(ch, ch, 3, 3) * 0.05
    g = torch.ones(batch, ch, side, side)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w, padding=1)

    def bwd():
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.conv2d(xg, w, padding=1), xg, g)

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
        t = time_small_map_forms(side, ch, batch, repeats)
        print(f"| {label} | {side * side / ch:.3g} | {t['patch']:.3g} | {t['eigen']:.3g} "
              f"| {t['patch'] / t['eigen']:.2f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tables", nargs="+", choices=("forms", "small-maps"),
                   default=["forms", "small-maps"], help="which tables to print")
    args = p.parse_args(argv)
    import torch

    print(f"float32, batch {args.batch}, median of {args.repeats}, load average "
          f"{os.getloadavg()[0]:.1f}, {len(os.sched_getaffinity(0))} usable CPUs; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)\n")
    if "forms" in args.tables:
        forms_table(args.batch, args.repeats)
    if "small-maps" in args.tables:
        small_map_table(args.batch, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
