"""The README's restoration picture: ground truth | measurement | baselines | P2L.

    python scripts/make_readme_grid.py [--model DIR] [--output docs/images] [--steps 50]

One row per (task, test-split image): the clean image, the measurement y (shown at image size:
nearest-neighbour upsampled for super-resolution, masked pixels at 0 = mid grey for
inpainting), then each method's restoration, all from benchmarks.restoration_quality (same task
settings, same keys and noise as the table). Writes ``restoration_grid.png`` (tiles upscaled
``--zoom`` times, nearest, with a header row of column names) and ``restoration_grid.json``
(command, machine, rows, columns, per-tile PSNR).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quality  # noqa: E402
from benchmarks.restoration_quality import RestorationConfig, method_config, restore  # noqa: E402
from p2l_jax import metrics  # noqa: E402
from p2l_jax.imageio import to_uint8, write_json, write_png  # noqa: E402

NAME = "restoration_grid"
DEFAULT_METHODS = ("pseudo-inverse", "ldps", "psld", "p2l")


def show_measurement(y: np.ndarray, size: int) -> np.ndarray:
    """y as an (size, size, 3) picture: itself when it has the image's shape, else upsampled."""
    if y.shape[:2] == (size, size):
        return y
    f = size // y.shape[0]
    return np.repeat(np.repeat(y, f, axis=0), f, axis=1)


HEADER_PX, ROW_LABEL_PX = 14, 90


def labelled(grid: np.ndarray, columns, rows, tile: int, pad: int, zoom: int) -> np.ndarray:
    """Upscale ``grid`` by ``zoom``; add a header band naming each column and a left band
    naming each row (uint8)."""
    big = np.repeat(np.repeat(to_uint8(grid), zoom, axis=0), zoom, axis=1)
    out = np.full((big.shape[0] + HEADER_PX, big.shape[1] + ROW_LABEL_PX, 3), 255, np.uint8)
    out[HEADER_PX:, ROW_LABEL_PX:] = big
    image = Image.fromarray(out)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for j, name in enumerate(columns):
        draw.text((ROW_LABEL_PX + (pad + j * (tile + pad)) * zoom + 2, 1), name, fill=(0, 0, 0),
                  font=font)
    for i, name in enumerate(rows):
        draw.text((2, HEADER_PX + (pad + i * (tile + pad) + tile // 2) * zoom - 6), name,
                  fill=(0, 0, 0), font=font)
    return np.asarray(image)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.add_common_arguments(p, "docs/images")
    p.add_argument("--tasks", nargs="+", default=["sr", "inpaint-box"], choices=quality.TASKS)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--images", type=int, default=2, help="test-split images per task")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--zoom", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 10)

    start = time.perf_counter()
    model = quality.setup(args)
    S = model.image_size
    cfg = RestorationConfig(n=args.images, steps=args.steps, tasks=tuple(args.tasks))
    imgs = quality.load_images("test", args.images, S, args.seed)
    indices, truth, captions, keys = imgs.indices, imgs.truth, imgs.captions, imgs.keys
    C_null, C_true = imgs.embeddings(model)
    columns = ["ground truth", "measurement", *args.methods]
    rows, tiles = [], []
    for task in args.tasks:
        op = quality.operator_for(task, S)
        y = imgs.measure(op, args.sigma)
        out = {}
        for method in args.methods:
            config = method_config(method, task, cfg)
            C0 = C_true if method == "p2l-oracle" else C_null
            out[method] = restore(model, op, y, keys, config, C0, args.images)[0]
        psnr = {m: np.asarray(metrics.psnr(out[m], truth)) for m in out}
        for i in range(args.images):
            rows.append({"task": task, "index": int(indices[i]), "caption": captions[i],
                         "psnr": {m: float(v[i]) for m, v in psnr.items()}})
            tiles.append([truth[i], show_measurement(y[i], S), *[out[m][i] for m in out]])

    pad = 2
    names = [r["task"] for r in rows]
    picture = labelled(quality.tile(tiles, pad), columns, names, S, pad, args.zoom)
    args.output.mkdir(parents=True, exist_ok=True)
    write_png(args.output / f"{NAME}.png", picture)
    write_json(args.output / f"{NAME}.json", quality.plain({
        "command": " ".join(["python scripts/make_readme_grid.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": quality.machine(), "model": args.model, "seed": args.seed,
        "steps": args.steps, "sigma": args.sigma, "columns": columns, "rows": rows,
        "seconds": time.perf_counter() - start}))
    print(f"wrote {args.output / (NAME + '.png')} ({len(rows)} rows x {len(columns)} columns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
