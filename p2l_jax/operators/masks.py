"""Inpainting masks: float32 ``(H, W)`` numpy arrays, **1 = observed**, 0 = missing.

``image_size`` is an int (square) or ``(height, width)``. Random masks are reproducible per
``seed`` (``numpy.random.default_rng(seed)``) and differ across seeds.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from p2l_jax.errors import P2LError

#: DPS/PSLD box: 128 px at 256 px, i.e. half the shorter side.
BOX_FRACTION = 0.5
#: DPS/PSLD random inpainting: 70 % of the pixels missing.
DEFAULT_FRACTION_MISSING = 0.7
#: Free-form strokes, DeepFill v2 / Palette generator settings at 256 px (widths scale with
#: the shorter side): strokes per mask, vertices per stroke, brush width, turning angles.
FREEFORM_STROKES = (1, 4)
FREEFORM_VERTICES = (4, 12)
FREEFORM_WIDTH_256 = (12, 40)
FREEFORM_MEAN_ANGLE = 2 * math.pi / 5
FREEFORM_ANGLE_RANGE = 2 * math.pi / 15


def image_hw(image_size) -> tuple[int, int]:
    """``(H, W)`` from an int or a pair; :class:`P2LError` on anything else."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise P2LError(f"mask image size must be an int or (height, width), got {image_size!r}") \
            from None
    if h < 1 or w < 1:
        raise P2LError(f"mask image size must be positive, got {(h, w)}")
    return h, w


def box_mask(image_size, box_size: int | None = None, top: int | None = None,
             left: int | None = None) -> np.ndarray:
    """A ``box_size`` square hole (default: ``BOX_FRACTION`` of the shorter side, 128 at 256 px),
    centred unless ``top``/``left`` are given."""
    h, w = image_hw(image_size)
    b = round(BOX_FRACTION * min(h, w)) if box_size is None else int(box_size)
    top = (h - b) // 2 if top is None else int(top)
    left = (w - b) // 2 if left is None else int(left)
    if b < 1 or top < 0 or left < 0 or top + b > h or left + b > w:
        raise P2LError(f"--box-size {b} at top={top}, left={left} does not fit in a {h}x{w} image")
    mask = np.ones((h, w), np.float32)
    mask[top:top + b, left:left + b] = 0.0
    return mask


def random_mask(image_size, fraction_missing: float = DEFAULT_FRACTION_MISSING,
                seed: int = 0) -> np.ndarray:
    """Exactly ``round(fraction_missing * H * W)`` pixels missing, chosen uniformly."""
    h, w = image_hw(image_size)
    if not 0.0 <= float(fraction_missing) <= 1.0:
        raise P2LError(f"--fraction must be in [0, 1], got {fraction_missing!r}")
    missing = np.random.default_rng(int(seed)).permutation(h * w)[:round(fraction_missing * h * w)]
    mask = np.ones(h * w, np.float32)
    mask[missing] = 0.0
    return mask.reshape(h, w)


def freeform_mask(image_size, seed: int = 0, strokes=FREEFORM_STROKES,
                  vertices=FREEFORM_VERTICES, width_256=FREEFORM_WIDTH_256) -> np.ndarray:
    """Brush-stroke holes as DeepFill v2's / Palette's free-form generator.

    For each of ``U{strokes}`` strokes: ``U{vertices}`` vertices, starting at a uniform point,
    each segment of length ``N(r, r/2)`` clipped to ``[0, 2r]`` with ``r = diag / 8``, turning by
    angles around ``2 pi/5`` alternately left and right; drawn as a polyline with round joints of
    width ``U(width_256) * min(H, W) / 256``; then random left-right and top-bottom flips.
    """
    h, w = image_hw(image_size)
    rng = np.random.default_rng(int(seed))
    radius = math.hypot(h, w) / 8
    scale = min(h, w) / 256
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(strokes[0], strokes[1])):
        n = int(rng.integers(vertices[0], vertices[1]))
        lo = FREEFORM_MEAN_ANGLE - rng.uniform(0, FREEFORM_ANGLE_RANGE)
        hi = FREEFORM_MEAN_ANGLE + rng.uniform(0, FREEFORM_ANGLE_RANGE)
        points = [(float(rng.integers(0, w)), float(rng.integers(0, h)))]
        for i in range(n):
            angle = rng.uniform(lo, hi)
            angle = 2 * math.pi - angle if i % 2 == 0 else angle
            r = float(np.clip(rng.normal(radius, radius / 2), 0, 2 * radius))
            x = float(np.clip(points[-1][0] + r * math.cos(angle), 0, w))
            y = float(np.clip(points[-1][1] + r * math.sin(angle), 0, h))
            points.append((x, y))
        width = max(int(rng.uniform(*width_256) * scale), 1)
        draw.line(points, fill=255, width=width)
        for x, y in points:
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    hole = np.asarray(canvas) > 0
    if rng.normal() > 0:
        hole = hole[:, ::-1]
    if rng.normal() > 0:
        hole = hole[::-1, :]
    return np.where(hole, 0.0, 1.0).astype(np.float32)
