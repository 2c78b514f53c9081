"""Where a P2L step's time goes: each network pass, JAX vs PyTorch, same weights and inputs.

    python -m benchmarks.cpu_breakdown [--model embedded|tiny|sd15|sd21|DIR] [--resolution PX]
        [--repeats 5] [--forms xla,cpu] [--decoder-blocks]

A P2L step (``full`` gradient) is two forward + input-gradient passes through UNet and
decoder (prompt update, latent update), plus an encoder forward when it projects. This times
each piece alone in PyTorch eager (diffusers modules carrying the same parameters,
``benchmarks.torch_baseline``) and jitted in JAX inside a ``lax.scan`` body, where the solver
runs them (:func:`benchmarks.measure.in_loop`: XLA:CPU compiles loop bodies differently from
the entry computation, see p2l_jax/models/conv.py; the JAX figure is a call's time divided by
the loop's trips), once per convolution form of ``--forms`` (``P2L_JAX_CONV``; and
``cpu-ynn``: the CPU form compiled with XLA:CPU's default options, which hand convolutions to
YNNPACK, where ``cpu`` compiles through :func:`p2l_jax.jit.jit` as the package does), at
batch 1, float32, t = 500: UNet forward, UNet vjp w.r.t. (z_t, C), decoder forward, decoder
vjp w.r.t. z, encoder forward. Prints seconds (median of ``--repeats``) and JAX / torch, so a
slower end-to-end step can be traced to the network pass that causes it.

``--decoder-blocks`` adds a table one level down for the decoder, the pass that stays slower
than torch on SD-sized maps: each block (conv_in, mid block, each up block, output norm + SiLU
+ conv) on its real input (the previous block's output), forward and vjp (cotangent = its own
output) in JAX (inside a ``lax.scan`` body as above, the package's convolution form and
options for the backend) and in PyTorch eager on the same weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks.cpu_conv import median_seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--forms", default="xla,cpu",
                   help="comma list of convolution forms (P2L_JAX_CONV: xla, cpu; cpu-ynn = cpu "
                        "with XLA's default YNNPACK fusions) to time (%(default)s)")
    p.add_argument("--decoder-blocks", action="store_true",
                   help="also time each decoder block, forward and vjp, JAX vs torch")
    args = p.parse_args(argv)
    forms = [f for f in args.forms.split(",") if f]
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.measure import LOOP_TRIPS, conv_form, in_loop
    from benchmarks.throughput import BenchConfig, build_model
    from benchmarks.torch_baseline import torch_modules

    model, dicts = build_model(BenchConfig(model=args.model, resolution=args.resolution))
    side = (args.resolution or model.image_size) // model.vae_scale_factor
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, side, side, model.latent_channels)).astype(np.float32)
    C = np.array(model.text_embeddings([""]))  # writable: torch.from_numpy shares it
    t = 500
    x_shape = (1, side * model.vae_scale_factor, side * model.vae_scale_factor, 3)
    gx = np.ones(x_shape, np.float32)

    def unet_vjp(m, z, C):
        out, pull = jax.vjp(lambda z, C: m.eps(z, jnp.asarray([t]), C), z, C)
        return pull(jnp.ones_like(out))

    def dec_vjp(m, z, g):
        return jax.vjp(m.decode, z)[1](g)[0]

    x = np.zeros(x_shape, np.float32)
    parts = {
        "unet forward": (lambda m, z, C: m.eps(z, jnp.asarray([t]), C), (model, z, C)),
        "unet vjp (z, C)": (unet_vjp, (model, z, C)),
        "decoder forward": (lambda m, z: m.decode(z), (model, z)),
        "decoder vjp (z)": (dec_vjp, (model, z, gx)),
        "encoder forward": (lambda m, x: m.encode(x), (model, x)),
    }
    unet, vae, _ = torch_modules(model, dicts, "float32")
    zt = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous()
    Ct, gt = torch.from_numpy(C), torch.from_numpy(gx).permute(0, 3, 1, 2).contiguous()
    tt = torch.tensor([t])

    def t_unet_fwd():
        with torch.no_grad():
            unet(zt, tt, encoder_hidden_states=Ct).sample

    def t_unet_vjp():
        a, b = zt.clone().requires_grad_(True), Ct.clone().requires_grad_(True)
        out = unet(a, tt, encoder_hidden_states=b).sample
        torch.autograd.grad(out, (a, b), torch.ones_like(out))

    def t_dec_fwd():
        with torch.no_grad():
            vae.decode(zt).sample

    def t_dec_vjp():
        a = zt.clone().requires_grad_(True)
        torch.autograd.grad(vae.decode(a).sample, a, gt)

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def t_enc_fwd():
        with torch.no_grad():
            vae.encode(xt).latent_dist.mean

    torch_parts = {"unet forward": t_unet_fwd, "unet vjp (z, C)": t_unet_vjp,
                   "decoder forward": t_dec_fwd, "decoder vjp (z)": t_dec_vjp,
                   "encoder forward": t_enc_fwd}
    print(f"model {args.model}, {x_shape[1]} px, batch 1, float32, median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)\n")
    cols = " | ".join(f"JAX {f} s" for f in forms)
    ratios = " | ".join(f"JAX {f} / torch" for f in forms)
    print(f"| pass | {cols} | torch eager s | {ratios} |")
    print("|---" * (2 + 2 * len(forms)) + "|")
    for name, (fn, fargs) in parts.items():
        seconds = []
        for form in forms:
            with conv_form(form.removesuffix("-ynn")):  # a new jitted function per form
                jitted = in_loop(fn, carried=1, package_options=not form.endswith("-ynn"))
                seconds.append(median_seconds(lambda: jitted(*fargs), args.repeats)
                               / LOOP_TRIPS)
        tr = median_seconds(torch_parts[name], args.repeats)
        print(f"| {name} | {' | '.join(f'{j:.4g}' for j in seconds)} | {tr:.4g} | "
              f"{' | '.join(f'{j / tr:.2f}' for j in seconds)} |", flush=True)
    if args.decoder_blocks:
        decoder_block_table(model._net("vae").decoder, vae.decoder, z / model.scaling_factor,
                            args.repeats)
    return 0


def decoder_block_table(dec, tdec, z, repeats: int) -> None:
    """Print forward and vjp seconds of each decoder block, JAX (``dec``, NNX) vs torch
    (``tdec``, diffusers), each block fed the previous block's output, starting from the
    unscaled latent ``z`` (B, h, w, c). The JAX programs take the decoder's parameters as
    arguments, as the solver's do (closed over, XLA would see constant weights and could fold
    or route them differently)."""
    import jax
    import torch
    from flax import nnx

    from benchmarks.measure import LOOP_TRIPS, in_loop

    graphdef, params = nnx.split(dec)
    n_up = len(dec.up_blocks)
    blocks = [("conv_in", lambda d, v: d.conv_in(v), tdec.conv_in),
              ("mid block", lambda d, v: d.mid_block(v), lambda v: tdec.mid_block(v, None))]
    blocks += [(f"up block {i}", lambda d, v, i=i: d.up_blocks[i](v), tdec.up_blocks[i])
               for i in range(n_up)]
    blocks += [("norm_out + SiLU + conv_out",
                lambda d, v: d.conv_out(jax.nn.silu(d.conv_norm_out(v))),
                lambda v: tdec.conv_out(tdec.conv_act(tdec.conv_norm_out(v))))]
    print("\n| decoder block | input (B, H, W, C) | JAX fwd s | torch fwd s | JAX / torch fwd "
          "| JAX vjp s | torch vjp s | JAX / torch vjp |")
    print("|---" * 8 + "|")
    h = jax.numpy.asarray(z)
    th = torch.from_numpy(np.asarray(z)).permute(0, 3, 1, 2).contiguous()
    for name, f, tf in blocks:
        fwd = lambda p, v, f=f: f(nnx.merge(graphdef, p), v)

        def vjp(p, v, fwd=fwd):
            y, pull = jax.vjp(lambda v: fwd(p, v), v)
            return pull(y)[0]

        j_fwd, j_vjp = in_loop(fwd, carried=1), in_loop(vjp, carried=1)
        jf = median_seconds(lambda: j_fwd(params, h), repeats) / LOOP_TRIPS
        jv = median_seconds(lambda: j_vjp(params, h), repeats) / LOOP_TRIPS

        def t_fwd(tf=tf):
            with torch.no_grad():
                return tf(th)

        def t_vjp(tf=tf):
            a = th.clone().requires_grad_(True)
            y = tf(a)
            torch.autograd.grad(y, a, y)

        tfs, tvs = median_seconds(t_fwd, repeats), median_seconds(t_vjp, repeats)
        print(f"| {name} | {tuple(h.shape)} | {jf:.4g} | {tfs:.4g} | {jf / tfs:.2f} | {jv:.4g} "
              f"| {tvs:.4g} | {jv / tvs:.2f} |", flush=True)
        h, th = j_fwd(params, h), t_fwd()


if __name__ == "__main__":
    sys.exit(main())
