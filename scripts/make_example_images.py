"""Write a few held-out images of the procedural dataset as PNGs (the README's example inputs).

    python scripts/make_example_images.py --output docs/examples --count 4

Images come from the ``test`` split (never seen in training), at the embedded model's native
64 px; each PNG is named by its dataset index and its caption is written beside it in
``captions.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from p2l_jax.data import sample, split_indices
from p2l_jax.imageio import write_json, write_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("docs/examples"))
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    captions = {}
    for index in split_indices("test", args.count):
        image, caption, _ = sample(int(index), args.image_size)
        name = f"test_{int(index)}.png"
        write_png(args.output / name, image)
        captions[name] = caption
    write_json(args.output / "captions.json", captions)
    print(json.dumps(captions, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
