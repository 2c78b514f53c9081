"""``p2l-jax degrade``: simulate measurements ``y = A x + sigma n`` of images.

Per input ``<stem>.<ext>`` (the stem is everything before the last dot, so ``photo.v1.png``
and ``photo.v2.png`` stay apart) it writes into ``--output``:

- ``<stem>.png``: the measurement for viewing (8-bit, [-1, 1] -> [0, 255]; the small image
  for ``sr``, zeros shown grey for inpainting);
- ``<stem>.npy``: the exact float32 ``(h, w, 3)`` measurement;
- ``<stem>.json``: the sidecar: ``operator`` (``op.to_dict()``, rebuilt by
  ``p2l_jax.operators.from_dict``), ``task``, ``task_options``, ``sigma``, ``seed``, ``input``,
  ``image_size``, ``measurement_shape``, ``input_info`` and ``noise_key`` (its derivation
  from ``seed`` and the stem, see :mod:`p2l_jax.operators.noise`).

The noise of an image depends on ``(seed, stem)`` only, not on its position in the list.
Random operators (motion kernel, random and free-form masks) are drawn from ``--seed`` and are
the same for every image of a size. Every input is read and checked (``.npy`` values finite
and in [-1, 1], as decoded images are by construction), and the output folder created and
written to with a test file, before any measurement is written; an output that would replace
an input is refused. On a bad input the command writes nothing, prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from p2l_jax import imageio
from p2l_jax.cli import output_folder
from p2l_jax.errors import P2LError
from p2l_jax.operators import (NOISE_KEY_DERIVATION, TASKS, TaskOptions, make_operator,
                               noise_key)
from p2l_jax.operators.noise import stem_hash

#: DPS / PSLD measurement noise on the [-1, 1] scale (algorithm.md).
DEFAULT_SIGMA = 0.05


#: Help of each TaskOptions field's flag (``--kernel-size`` for ``kernel_size``). Flags, the
#: TaskOptions a command builds and restore's run fingerprint all come from the dataclass's
#: fields, so a new task option needs a line here and nothing else (a missing line fails at
#: import time).
TASK_OPTION_HELP = {
    "scale": "sr: down-sampling factor (%(default)s)",
    "kernel_size": "blur kernel size in pixels (%(default)s; 121 at 512 px)",
    "blur_sigma": "gaussian-blur: kernel standard deviation in pixels (%(default)s)",
    "intensity": "motion-blur: trajectory intensity in [0, 1] (%(default)s)",
    "box_size": "inpaint-box: hole side in pixels (default: half the shorter side, 128 at "
                "256 px)",
    "fraction": "inpaint-random: fraction of pixels missing (%(default)s)",
    "seed": "seed of the noise and of random kernels/masks (%(default)s)",
}
_FIELDS = dataclasses.fields(TaskOptions)
if {f.name for f in _FIELDS} != set(TASK_OPTION_HELP):
    raise RuntimeError("TASK_OPTION_HELP must name every TaskOptions field exactly once")


def add_task_options(p, seed: bool = True) -> None:
    """The operator options shared by ``degrade`` and ``restore`` (DPS / PSLD defaults): one
    flag per :class:`TaskOptions` field, typed by the field's default. ``seed=False`` leaves
    ``--seed`` to the command (restore's run seed, which also seeds kernels and masks)."""
    d = TaskOptions()
    for f in _FIELDS:
        if f.name == "seed" and not seed:
            continue
        default = getattr(d, f.name)
        kind = int if f.name == "box_size" else type(default)  # box_size: int or None
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       help=TASK_OPTION_HELP[f.name])


def task_options(args) -> TaskOptions:
    """The TaskOptions of parsed arguments (every field from its flag)."""
    return TaskOptions(**{f.name: getattr(args, f.name) for f in _FIELDS})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "degrade", help="simulate noisy measurements of images (y = A x + sigma n)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    add_task_options(p)
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA,
                   help="measurement noise std on the [-1, 1] scale (%(default)s)")
    p.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH",
                   help="images (PNG, JPEG, ... or .npy float in [-1, 1])")
    p.add_argument("--output", required=True, type=Path, metavar="DIR",
                   help="output folder (created if missing)")
    p.set_defaults(func=run)


@jax.jit
def _measure(op, x, key, sigma):
    return op.measure(x, key, sigma)


def _check_inputs(args, options: TaskOptions) -> dict:
    """Read every input and build its operator; raise before anything is written."""
    stems: dict[str, Path] = {}
    operators = {}
    for path in args.input:
        if path.stem in stems:
            raise P2LError(f"{path}: same file stem as {stems[path.stem]}; outputs would collide")
        stems[path.stem] = path
        image, _ = imageio.read_image(path)
        imageio.check_image_values(path, image)
        hw = image.shape[:2]
        try:
            if hw not in operators:
                operators[hw] = make_operator(args.task, hw, options)
            operators[hw].validate_shape((1, *image.shape))
        except P2LError as err:
            raise P2LError(f"{path}: {err}") from None
    return operators


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise P2LError(f"--sigma must be a finite number >= 0, got {args.sigma}")
    if args.task not in TASKS:
        raise P2LError(f"unknown --task {args.task!r}; choose one of {', '.join(TASKS)}")
    options = task_options(args)
    operators = _check_inputs(args, options)
    names = [f"{path.stem}.{ext}" for path in args.input for ext in ("png", "npy", "json")]
    output_folder.check_targets(args.output, names, args.input)
    output_folder.prepare(args.output)
    for path in args.input:
        image, info = imageio.read_image(path)
        op = operators[image.shape[:2]]
        y = np.asarray(_measure(op, image[None], noise_key(args.seed, path.stem),
                                np.float32(args.sigma)))[0]
        record = {
            "task": args.task,
            "operator": op.to_dict(),
            "task_options": dataclasses.asdict(options),
            "sigma": args.sigma,
            "seed": args.seed,
            "input": str(path),
            "image_size": list(image.shape[:2]),
            "measurement_shape": list(y.shape),
            "input_info": info,
            "noise_key": {"derivation": NOISE_KEY_DERIVATION, "seed": args.seed,
                          "stem": path.stem, "crc32": stem_hash(path.stem)},
        }
        out = args.output / path.stem  # not with_suffix: it would cut "photo.v1" to "photo"
        imageio.write_npy(f"{out}.npy", y.astype(np.float32))
        imageio.write_png(f"{out}.png", y)
        imageio.write_json(f"{out}.json", record)
        print(f"{path} -> {out}.{{png,npy,json}}  {args.task} {tuple(y.shape)} sigma={args.sigma}")
    return 0
