"""Load times of a Stable-Diffusion-1.5-sized checkpoint: safetensors vs the orbax cache.

    python -m benchmarks.load_times --arch sd15 --workdir /tmp/p2l_load_times

Writes a random checkpoint of the named architecture (``p2l_jax/random_model.py`` configs)
in real diffusers layout with diffusers/transformers ``save_pretrained`` (safetensors), then
times, each in a fresh process so no cache of ours is warm:

* ``load_model(diffusers_dir)``: read safetensors, check keys/shapes, transpose to NNX layout;
* ``p2l-jax convert`` (one-off) and ``load_model(converted_dir)``: orbax restore.

The operating system's file cache is warm for both (the files were just written), which is the
usual case for a second run on the same machine. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

_TIMED_LOAD = """
import json, sys, time
t0 = time.perf_counter()
import jax, p2l_jax
t1 = time.perf_counter()
m = p2l_jax.load_model(sys.argv[1])
jax.block_until_ready(jax.tree_util.tree_leaves(m.params))
t2 = time.perf_counter()
n = sum(x.size for x in jax.tree_util.tree_leaves(m.params))
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "parameters": int(n)}))
"""


def write_random_checkpoint(arch: str, directory: Path, seed: int = 0) -> Path:
    """A random ``arch`` pipeline saved by diffusers in its own layout (safetensors)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from p2l_jax.random_model import ARCHITECTURES
    from p2l_jax.tokenizer import default_tokenizer_dir, load_tokenizer

    cfg = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(cfg["unet"]),
        vae=AutoencoderKL.from_config(cfg["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        tokenizer=load_tokenizer(default_tokenizer_dir()),
        scheduler=DDIMScheduler.from_config(cfg["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def _timed_load(directory: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _TIMED_LOAD, str(directory)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size_gb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args(argv)
    work = args.workdir / args.arch
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source, converted = work / "diffusers", work / "converted"
    t0 = time.perf_counter()
    write_random_checkpoint(args.arch, source)
    written = time.perf_counter() - t0
    diffusers_load = _timed_load(source)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "p2l_jax", "convert", "--model", str(source),
                    "--output", str(converted)], check=True, capture_output=True)
    convert_s = time.perf_counter() - t0
    orbax_load = _timed_load(converted)
    result = {"arch": args.arch, "write_checkpoint_s": written,
              "diffusers_dir_gb": _size_gb(source), "converted_dir_gb": _size_gb(converted),
              "load_safetensors": diffusers_load, "convert_process_s": convert_s,
              "load_orbax": orbax_load}
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
