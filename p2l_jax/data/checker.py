"""Deterministic attribute checker: reads back from pixels what :mod:`~p2l_jax.data.shapes` drew.

It scores whether a (generated or restored) image shows what its caption says. Every estimate
uses how the generator draws (the numbers of :data:`~p2l_jax.data.shapes.SPEC`):

- foreground mask: the ground is achromatic and the shape saturated. ``c = box3(max(rgb) -
  min(rgb))`` (rgb in [0, 1]; the 3 x 3 mean keeps pixel noise out); the mask is
  ``c > max(chroma_threshold, edge_level * p90(c over c > chroma_threshold))``, a cut relative
  to the shape's own chroma so that blur does not grow the shape.
- background: mean grey level outside the mask dilated by 2 px, light above the midpoint of
  the light and dark level ranges.
- position: the mask centroid's nearest anchor; size: ``sqrt(area) / side`` against the
  geometric mean of the small and large sides.
- color: hue of the mean foreground RGB (adding grey or scaling by the texture's shade does
  not move the hue), nearest of the six hues on the circle.
- texture: inside the mask eroded by 1 px, value ``v = max(rgb)``; solid when the spread
  ``(p90 - p10) / p90`` of v is below ``solid_contrast``; otherwise striped when the
  gradient structure tensor of v is coherent (one orientation: ``(l1 - l2) / (l1 + l2)`` above
  ``stripe_coherence``), else checkered or dotted by the dark tone's share of the area,
  ``mean(clip((p95 - v) / (p95 * (1 - shade)), 0, 1))`` (linear in anti-aliasing and blur):
  1/2 for a checkerboard against pi * dot_radius^2 ~ 0.2 for dots, cut at the midpoint.
- shape: intersection-over-union of the mask with each shape drawn at the mask's centroid and
  area, over rotations spanning the generator's range; the best wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2l_jax.data.shapes import (ANCHORS, ATTRIBUTES, HUES_DEG, SPEC, anchor, parse_caption,
                                 pixel_grid, placed_shape_mask)


@dataclass(frozen=True)
class CheckerConfig:
    """Thresholds of the checker (see the module docstring for where each enters)."""

    chroma_threshold: float = 0.15
    edge_level: float = 0.35
    solid_contrast: float = 0.15
    stripe_coherence: float = 0.5
    rotations: int = 7


CHECKER = CheckerConfig()


def _shift_all(mask: np.ndarray, reduce) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    views = [padded[i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return reduce(np.stack(views), axis=0)


def _erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _shift_all(mask, np.all)
    return mask


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _shift_all(mask, np.any)
    return mask


def _hue_deg(rgb: np.ndarray) -> float:
    # Hue as the angle of the chroma vector in the plane orthogonal to grey.
    r, g, b = rgb
    return float(np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0)


def _nearest_hue(hue: float) -> str:
    return min(HUES_DEG, key=lambda c: abs((hue - HUES_DEG[c] + 180.0) % 360.0 - 180.0))


def _texture(value: np.ndarray, inner: np.ndarray, cfg: CheckerConfig) -> str:
    v = value[inner]
    lo, bright = np.percentile(v, [10, 90])
    if bright <= 0 or (bright - lo) / bright < cfg.solid_contrast:
        return "solid"
    gy, gx = np.gradient(value)
    core = _erode(inner) if _erode(inner).sum() >= 8 else inner
    jxx, jyy, jxy = (gx * gx)[core].sum(), (gy * gy)[core].sum(), (gx * gy)[core].sum()
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / max(jxx + jyy, 1e-12)
    if coherence > cfg.stripe_coherence:
        return "striped"
    bright = np.percentile(v, 95)
    dark_share = np.mean(np.clip((bright - v) / (bright * (1.0 - SPEC.shade)), 0.0, 1.0))
    return "checkered" if dark_share > 0.5 * (0.5 + np.pi * SPEC.dot_radius ** 2) else "dotted"


def _shape(mask: np.ndarray, centre, side: float, cfg: CheckerConfig) -> str:
    x, y = pixel_grid(mask.shape[0])
    rotations = np.deg2rad(np.linspace(-SPEC.rotation_deg, SPEC.rotation_deg, cfg.rotations))
    best, best_iou = "circle", -1.0
    for shape in ATTRIBUTES["shape"]:
        for rotation in rotations[:1] if shape == "circle" else rotations:
            drawn = placed_shape_mask(shape, x, y, centre, side, rotation)
            iou = np.logical_and(drawn, mask).sum() / max(np.logical_or(drawn, mask).sum(), 1)
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


def estimate_attributes(image: np.ndarray, cfg: CheckerConfig = CHECKER) -> dict[str, str | None]:
    """The attribute words an ``(S, S, 3)`` image in [-1, 1] shows; None where no shape is found."""
    rgb = np.clip((np.asarray(image, np.float64) + 1.0) / 2.0, 0.0, 1.0)
    size_px = rgb.shape[0]
    chroma = rgb.max(-1) - rgb.min(-1)
    smooth = _shift_all(chroma, np.mean)
    mask = smooth > cfg.chroma_threshold
    if mask.any():
        mask = smooth > max(cfg.chroma_threshold,
                            cfg.edge_level * np.percentile(smooth[mask], 90))
    outside = ~_dilate(mask, 2)
    grey = rgb.mean(-1)[outside].mean() if outside.any() else rgb.mean()
    light = 0.5 * (SPEC.light_level[0] + SPEC.dark_level[1])
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    found["background"] = "light" if grey > light else "dark"
    if mask.sum() < 4:
        return found

    x, y = pixel_grid(size_px)
    area = mask.sum()
    centre = (float((mask * x).sum() / area), float((mask * y).sum() / area))
    found["position"] = min(ANCHORS, key=lambda p: np.hypot(*np.subtract(anchor(p), centre)))
    side = np.sqrt(area) / size_px
    found["size"] = "large" if side > np.sqrt(SPEC.small_side * SPEC.large_side) else "small"
    found["color"] = _nearest_hue(_hue_deg(rgb[mask].mean(0)))
    inner = _erode(mask) if _erode(mask).sum() >= 8 else mask
    found["texture"] = _texture(rgb.max(-1), inner, cfg)
    found["shape"] = _shape(mask, centre, side, cfg)
    return found


def check_attributes(image: np.ndarray, caption: str, cfg: CheckerConfig = CHECKER
                     ) -> dict[str, bool]:
    """For each attribute the caption names, whether ``image`` shows it."""
    wanted = parse_caption(caption)
    found = estimate_attributes(image, cfg)
    return {name: found[name] == word for name, word in wanted.items()}


def attribute_accuracy(images, captions, cfg: CheckerConfig = CHECKER) -> dict[str, float]:
    """Fraction of images showing each attribute of their caption, and their mean as ``"all"``."""
    checks = [check_attributes(image, caption, cfg) for image, caption in zip(images, captions)]
    scores = {name: float(np.mean([c[name] for c in checks])) for name in ATTRIBUTES}
    scores["all"] = float(np.mean(list(scores.values())))
    return scores
