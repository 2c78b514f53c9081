"""Where the CPU time goes: one 3x3 convolution, XLA:CPU vs PyTorch (oneDNN), same shapes.

    python -m benchmarks.cpu_conv [--repeats 20] [--batch 1]

The VAE decoder dominates a P2L step (forward + input gradient through it, twice per step), and
it is a stack of 3x3 convolutions. For the convolution shapes of the embedded model's decoder
(64 px: 16 channels at 64x64, 32 at 32x32, 64 at 16x16) and of the SD 1.5 decoder at 128 px,
this times the forward and the input-gradient (vjp) of one float32 3x3 convolution with
padding 1 in JAX (``lax.conv_general_dilated``, NHWC, jitted) and in PyTorch
(``torch.nn.functional.conv2d``, NCHW, autograd), median of ``--repeats`` after warm-up, and
prints GFLOP/s (2 * H * W * Cin * Cout * 9 per image and direction) and the ratio JAX / torch.
"""

from __future__ import annotations

import argparse
import sys

#: (label, side, channels): embedded decoder at 64 px; SD 1.5 decoder at 128 px
SHAPES = (("embedded 64x64x16", 64, 16), ("embedded 32x32x32", 32, 32),
          ("embedded 16x16x64", 16, 64), ("sd15@128 128x128x128", 128, 128),
          ("sd15@128 32x32x512", 32, 512))


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after two untimed calls (:func:`benchmarks.measure.median_time`,
    which also waits for JAX results)."""
    from benchmarks.measure import median_time

    return median_time(fn, repeats, warmup=2)[0]


def time_jax(side: int, ch: int, batch: int, repeats: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (batch, side, side, ch))
    w = jax.random.normal(jax.random.key(1), (3, 3, ch, ch)) * 0.05

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(conv)
    bwd = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    g = jnp.ones_like(x)
    f_s = median_seconds(lambda: fwd(x, w), repeats)
    b_s = median_seconds(lambda: bwd(x, w, g), repeats)
    return f_s, b_s


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    print(f"float32, batch {args.batch}, median of {args.repeats}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, mkldnn {torch.backends.mkldnn.is_available()})\n")
    print("| conv 3x3 | GFLOP | JAX fwd GFLOP/s | torch fwd GFLOP/s | JAX/torch fwd | "
          "JAX vjp GFLOP/s | torch vjp GFLOP/s | JAX/torch vjp |")
    print("|---|---|---|---|---|---|---|---|")
    for label, side, ch in SHAPES:
        gflop = 2 * side * side * ch * ch * 9 * args.batch / 1e9
        jf, jb = time_jax(side, ch, args.batch, args.repeats)
        tf, tb = time_torch(side, ch, args.batch, args.repeats)
        print(f"| {label} | {gflop:.3f} | {gflop / jf:.1f} | {gflop / tf:.1f} | {jf / tf:.2f} | "
              f"{gflop / jb:.1f} | {gflop / tb:.1f} | {jb / tb:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
