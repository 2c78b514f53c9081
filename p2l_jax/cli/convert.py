"""``p2l-jax convert``: cache a diffusers checkpoint's parameters as an orbax-checkpoint."""

from __future__ import annotations

import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a diffusers-format model to a directory with orbax parameters",
        description="Load a Stable Diffusion directory once and write a copy whose parameters are "
                    "an orbax-checkpoint in Flax layout; load_model/--model accept either form.")
    p.add_argument("--model", required=True, help="diffusers-format model directory")
    p.add_argument("--output", required=True, help="new directory to write (must not exist)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.ckpt pickles (loaded with torch.load(weights_only=True))")
    p.set_defaults(func=run)


def run(args) -> int:
    from p2l_jax.convert import save_converted
    from p2l_jax.model import load_model

    start = time.perf_counter()
    model = load_model(args.model, allow_pickle=args.allow_pickle)
    loaded = time.perf_counter()
    out = save_converted(model, args.output)
    print(f"converted {args.model} -> {out} (load {loaded - start:.1f} s, "
          f"save {time.perf_counter() - loaded:.1f} s)")
    return 0
