"""Task names of the command line -> operators, with the DPS/PSLD defaults of algorithm.md.

- ``sr``: :class:`SuperResolution`, ``scale=4``;
- ``gaussian-blur``: :class:`GaussianBlur`, ``kernel_size=61``, ``blur_sigma=3.0``;
- ``motion-blur``: :class:`MotionBlur`, ``kernel_size=61``, ``intensity=0.5``, kernel seed ``seed``;
- ``inpaint-box``: :class:`Inpainting` with :func:`box_mask`, ``box_size`` None = half the
  shorter side (128 at 256 px), centred;
- ``inpaint-random``: :class:`Inpainting` with :func:`random_mask`, ``fraction=0.7`` missing,
  mask seed ``seed``;
- ``inpaint-freeform``: :class:`Inpainting` with :func:`freeform_mask`, mask seed ``seed``;
- ``denoise``: :class:`Denoising`.

Masks depend on the image size, so operators are made per ``(task, image size, options)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from p2l_jax.errors import P2LError
from p2l_jax.operators.base import LinearOperator
from p2l_jax.operators.blur import GaussianBlur, MotionBlur
from p2l_jax.operators.denoising import Denoising
from p2l_jax.operators.inpainting import Inpainting
from p2l_jax.operators.kernels import (DEFAULT_BLUR_SIGMA, DEFAULT_KERNEL_SIZE,
                                       DEFAULT_MOTION_INTENSITY)
from p2l_jax.operators.masks import (DEFAULT_FRACTION_MISSING, box_mask, freeform_mask,
                                     random_mask)
from p2l_jax.operators.resize import SuperResolution


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Options of every task (each task reads the ones it needs); defaults per algorithm.md."""

    scale: int = 4
    kernel_size: int = DEFAULT_KERNEL_SIZE
    blur_sigma: float = DEFAULT_BLUR_SIGMA
    intensity: float = DEFAULT_MOTION_INTENSITY
    box_size: int | None = None
    fraction: float = DEFAULT_FRACTION_MISSING
    seed: int = 0


TaskFactory = Callable[[tuple[int, int], TaskOptions], LinearOperator]

TASKS: dict[str, TaskFactory] = {
    "sr": lambda hw, o: SuperResolution(o.scale),
    "gaussian-blur": lambda hw, o: GaussianBlur(o.kernel_size, o.blur_sigma),
    "motion-blur": lambda hw, o: MotionBlur(o.kernel_size, o.intensity, o.seed),
    "inpaint-box": lambda hw, o: Inpainting(box_mask(hw, o.box_size)),
    "inpaint-random": lambda hw, o: Inpainting(random_mask(hw, o.fraction, o.seed)),
    "inpaint-freeform": lambda hw, o: Inpainting(freeform_mask(hw, o.seed)),
    "denoise": lambda hw, o: Denoising(),
}


def make_operator(task: str, image_size: tuple[int, int],
                  options: TaskOptions = TaskOptions()) -> LinearOperator:
    """The operator of ``task`` for images of ``image_size = (H, W)``."""
    if task not in TASKS:
        raise P2LError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task](tuple(image_size), options)
