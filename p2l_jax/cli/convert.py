"""``p2l-jax convert``: cache a diffusers checkpoint's parameters as an orbax-checkpoint.

Before the model loads: ``--output`` must not exist and its parent must be a folder (or
creatable), and every file to copy must be a regular file inside ``--model``
(:func:`p2l_jax.convert.files_to_copy`). Ctrl-C removes the temporary folder of the run."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from p2l_jax.errors import P2LError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a diffusers-format model to a directory with orbax parameters",
        description="Load a Stable Diffusion directory once and write a copy whose parameters are "
                    "an orbax-checkpoint in Flax layout; load_model/--model accept either form.")
    p.add_argument("--model", required=True, type=Path, help="diffusers-format model directory")
    p.add_argument("--output", required=True, type=Path,
                   help="new directory to write (must not exist)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.ckpt pickles (loaded with torch.load(weights_only=True); "
                        "needs torch)")
    p.set_defaults(func=run)


def _check_output(output: Path) -> None:
    if output.exists() or output.is_symlink():
        raise P2LError(f"--output {output} already exists; choose a new directory")
    parent = next((p for p in output.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise P2LError(f"--output {output}: {parent} is not a folder")


def run(args) -> int:
    from p2l_jax.cli import interrupts
    from p2l_jax.convert import files_to_copy, save_converted
    from p2l_jax.model import load_model

    _check_output(args.output)
    if args.model.is_dir():
        files_to_copy(args.model)  # refuses links out of the folder before the slow load
    start = time.perf_counter()
    model = load_model(args.model, allow_pickle=args.allow_pickle)
    loaded = time.perf_counter()
    parent = args.output.absolute().parent
    before = set(parent.glob(f".{args.output.name}.*")) if parent.is_dir() else set()

    def remove_temp() -> None:  # on Ctrl-C: the temp folder this run created
        for tmp in set(parent.glob(f".{args.output.name}.*")) - before:
            shutil.rmtree(tmp, ignore_errors=True)

    forget = interrupts.on_interrupt(remove_temp)
    try:
        out = save_converted(model, args.output)
    finally:
        forget()
    print(f"converted {args.model} -> {out} (load {loaded - start:.1f} s, "
          f"save {time.perf_counter() - loaded:.1f} s)")
    return 0
