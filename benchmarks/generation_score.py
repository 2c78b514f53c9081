"""Is the model a real prior? Text-to-image generation scored by the attribute checker.

    python -m benchmarks.generation_score [--model DIR] [--output DIR] [--quick]

For ``n`` held-out captions (the captions of the first ``n`` test-split indices of
:mod:`p2l_jax.data`), DDIM (``steps`` = 50, eta 0) with classifier-free guidance
``eps = eps(z, "") + w (eps(z, C) - eps(z, ""))`` generates one image per caption (sampler key
from ``(seed, index)``), and :func:`p2l_jax.data.check_attributes` reads back which of the
caption's attributes the image shows. Reported: accuracy per attribute with its Wilson 95%
interval, ``all`` = the mean over attributes (:func:`p2l_jax.data.attribute_accuracy`), the
share of images with every attribute right, the same scores of the dataset's own images of
those indices (the checker's ceiling), and the target ``all >= 0.8``.

Writes ``generation_score.json``, ``generation_score.md`` and ``generation_samples.png`` (the
first images, row-major) to ``--output``; ``--results-md docs/RESULTS.md`` also updates that
file's ``generation_score`` section.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax.numpy as jnp
import numpy as np

from benchmarks import quality
from p2l_jax import data
from p2l_jax.imageio import write_png
from p2l_jax.parallel import map_batches
from p2l_jax.solvers import DDIMConfig, solve

TARGET = 0.8
NAME = "generation_score"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """n held-out captions, DDIM steps, guidance scale w [DDIMConfig's default], batch size."""

    n: int = 200
    steps: int = 50
    guidance_scale: float = DDIMConfig().guidance_scale
    batch_size: int = 25
    split: str = "test"
    sheet: int = 16


def get_config(quick: bool = False) -> GenerationConfig:
    return GenerationConfig(n=16, batch_size=8) if quick else GenerationConfig()


def generate(model, captions, keys, cfg: GenerationConfig):
    """Generated images (n, S, S, 3) in [-1, 1] and the run's timing."""
    ddim = DDIMConfig(num_steps=cfg.steps, guidance_scale=cfg.guidance_scale)
    batch = min(cfg.batch_size, len(captions))
    C = np.asarray(model.text_embeddings(list(captions)))
    C_neg = None if ddim.guidance_scale == 1.0 else jnp.broadcast_to(
        model.text_embeddings([ddim.negative_prompt]), (batch,) + C.shape[1:])

    def fn(keys, C_batch):
        return solve(model, None, None, keys, ddim, embedding=C_batch,
                     negative_embedding=C_neg).images

    return map_batches(fn, batch, keys, C)


def scores(images, captions) -> dict:
    """Accuracies (attribute_accuracy's definition), their intervals, per-image misses."""
    checks = [data.check_attributes(im, cap) for im, cap in zip(images, captions)]
    per = {name: quality.wilson(sum(c[name] for c in checks), len(checks))
           for name in data.ATTRIBUTES}
    accuracy = {name: per[name]["mean"] for name in data.ATTRIBUTES}
    accuracy["all"] = float(np.mean(list(accuracy.values())))
    return {"accuracy": accuracy, "interval": per,
            "every_attribute": quality.wilson(sum(all(c.values()) for c in checks), len(checks)),
            "missed": [[name for name, ok in c.items() if not ok] for c in checks]}


def markdown(record: dict) -> str:
    g, r = record["generated"], record["dataset_images"]
    cfg = record["config"]
    lines = quality.header(
        "Generation: attribute accuracy of DDIM samples from held-out captions",
        record["command"], record["machine"],
        [f"{cfg['n']} captions of the {cfg['split']} split, DDIM {cfg['steps']} steps, eta 0, "
         f"guidance {cfg['guidance_scale']}, model `{quality.model_label(record)}`",
         f"Intervals: {quality.PROPORTION_METHOD}. Target: overall >= {TARGET:.0%} -> "
         f"**{'met' if record['meets_target'] else 'not met'}** "
         f"({g['accuracy']['all']:.1%})"])
    lines += ["| attribute | generated | dataset images (checker ceiling) |", "|---|---|---|"]
    for name in data.ATTRIBUTES:
        lines.append(f"| {name} | {quality.fmt_range(g['interval'][name], 3)} | "
                     f"{quality.fmt_range(r['interval'][name], 3)} |")
    lines.append(f"| **overall** (mean over attributes) | **{g['accuracy']['all']:.3f}** | "
                 f"{r['accuracy']['all']:.3f} |")
    lines.append(f"| every attribute right | {quality.fmt_range(g['every_attribute'], 3)} | "
                 f"{quality.fmt_range(r['every_attribute'], 3)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.add_common_arguments(p, "results/generation", NAME)
    p.add_argument("--n", type=int, default=None, help="number of held-out captions")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args(argv)
    cfg = get_config(args.quick)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in dict(
        n=args.n, steps=args.steps, guidance_scale=args.guidance,
        batch_size=args.batch_size).items() if v is not None})

    start = time.perf_counter()
    model = quality.setup(args)
    imgs = quality.load_images(cfg.split, cfg.n, model.image_size, args.seed)
    indices, truth, captions = imgs.indices, imgs.truth, imgs.captions
    images, timing = generate(model, captions, imgs.keys, cfg)
    generated, reference = scores(images, captions), scores(truth, captions)
    missed = generated.pop("missed")
    reference.pop("missed")
    record = {
        "command": quality.command_line(argv, "benchmarks.generation_score"),
        "machine": quality.machine(), "model": args.model,
        "model_digest": quality.model_digest(str(args.model)), "seed": args.seed,
        "config": cfg, "target": TARGET,
        "meets_target": generated["accuracy"]["all"] >= TARGET,
        "generated": generated, "dataset_images": reference,
        "samples": [{"index": int(i), "caption": c, "missed": m}
                    for i, c, m in zip(indices, captions, missed)],
        "timing": {**timing, "total_s": time.perf_counter() - start},
    }
    sheet = images[:cfg.sheet]
    cols = max(1, int(np.ceil(np.sqrt(len(sheet)))))
    args.output.mkdir(parents=True, exist_ok=True)
    write_png(args.output / "generation_samples.png",
              quality.tile([sheet[i:i + cols] for i in range(0, len(sheet), cols)]))
    quality.write_outputs(args.output, NAME, record, markdown(quality.plain(record)),
                          args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
