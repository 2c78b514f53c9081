"""Procedural captioned images: one coloured, textured shape on a grey, faintly textured ground.

Each image is a pure function of an integer index. ``numpy.random.Generator(PCG64(index))``
draws, in this order (no global random state):

1. the six caption attributes, each uniform and independent (``rng.integers``), in the order of
   :data:`ATTRIBUTES`: size, color, texture, shape, background, position;
2. the nuisance parameters, all uniform (``rng.uniform``) over the ranges of :class:`DrawSpec`:
   shape side (x [1 - j, 1 + j]), centre offset from the position's anchor, rotation, hue
   offset, saturation, value, background grey level, texture period, angle and phase, and
   three background plane waves (direction, period, phase). All are drawn whatever the
   attributes, so the stream layout never depends on them.

Drawing (all lengths relative to the image side, so an index shows the same scene at any size):

- shape: an area-normalised polygon (square, triangle, star, cross) or disc whose side, the
  square root of its area, is ``small_side`` or ``large_side``; its centroid sits at the
  position's anchor (centre, or ``anchor_offset`` left/right/up/down of it); small rotation.
- color: HSV with hue 0/60/120/180/240/300 degrees (red, yellow, green, cyan, blue, magenta).
- texture: a second tone ``shade * color`` drawn as stripes (period T, half dark), a
  checkerboard (cells ``checker_cell * T``) or dots (radius ``dot_radius * T`` on a T grid),
  at a uniform angle and phase; solid has none. T is at least ``min_period_px`` pixels.
- background: achromatic, a light or dark grey level plus three faint plane waves.
- rendering: ``supersample`` x ``supersample`` samples per pixel averaged (anti-aliased,
  sharp edges), then quantised to 8 bits, so results agree bit for bit across machines unless
  a value falls exactly on a rounding boundary.

Caption grammar: ``"a {size} {color} {texture} {shape} on a {background} background,
{position}"``, e.g. ``"a large red striped circle on a dark background, left"``; every one of
the 2 * 6 * 4 * 5 * 2 * 5 = 2400 attribute combinations is a distinct caption.

Example::

    image, caption, attributes = sample(7, image_size=64)   # (64, 64, 3) float32 in [-1, 1]
"""

from __future__ import annotations

import colorsys
import itertools
import re
from dataclasses import dataclass

import numpy as np

from p2l_jax.errors import P2LError

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": ("small", "large"),
    "color": ("red", "yellow", "green", "cyan", "blue", "magenta"),
    "texture": ("solid", "striped", "checkered", "dotted"),
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "background": ("light", "dark"),
    "position": ("left", "right", "top", "bottom", "center"),
}
HUES_DEG = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0,
            "magenta": 300.0}
ANCHORS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}

_CAPTION = "a {size} {color} {texture} {shape} on a {background} background, {position}"
_CAPTION_RE = re.compile(
    r"a (?P<size>\w+) (?P<color>\w+) (?P<texture>\w+) (?P<shape>\w+) "
    r"on a (?P<background>\w+) background, (?P<position>\w+)")

MIN_SIZE, MAX_SIZE = 32, 256


@dataclass(frozen=True)
class DrawSpec:
    """How the generator draws; the attribute checker reads the same numbers.

    Lengths are fractions of the image side; ``(lo, hi)`` pairs are uniform ranges.
    """

    small_side: float = 0.20          # sqrt(shape area) of a "small" shape
    large_side: float = 0.32          # sqrt(shape area) of a "large" shape
    side_jitter: float = 0.06         # side x U(1 - j, 1 + j)
    anchor_offset: float = 0.20       # left/right/top/bottom anchors, from the image centre
    position_jitter: float = 0.015    # centroid = anchor + U(-j, j) in x and y
    rotation_deg: float = 12.0        # shape rotation U(-r, r)
    hue_jitter_deg: float = 6.0
    saturation: tuple[float, float] = (0.8, 1.0)
    value: tuple[float, float] = (0.85, 1.0)
    shade: float = 0.45               # texture's second tone = shade * color
    period: tuple[float, float] = (0.07, 0.10)
    min_period_px: float = 3.0
    checker_cell: float = 0.75        # checkerboard cell side / period
    dot_radius: float = 0.25          # dot radius / period
    light_level: tuple[float, float] = (0.72, 0.88)
    dark_level: tuple[float, float] = (0.08, 0.22)
    wave_amplitude: float = 0.02      # each of the three background plane waves
    wave_period: tuple[float, float] = (0.08, 0.3)
    supersample: int = 2


SPEC = DrawSpec()


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _regular(n: int, start: float) -> np.ndarray:
    angles = start + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _cross(half_width: float = 0.35) -> np.ndarray:
    a = half_width
    return np.array([(a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1),
                     (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a), (-a, -1)], float)


def _unit_area(vertices: np.ndarray) -> np.ndarray:
    x, y = vertices.T
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return vertices / np.sqrt(area)


# Vertices in image orientation (y down, so "up" is -y), centroid at 0, area 1.
POLYGONS: dict[str, np.ndarray] = {
    "square": _unit_area(_regular(4, np.pi / 4)),
    "triangle": _unit_area(_regular(3, -np.pi / 2)),
    "star": _unit_area(_star()),
    "cross": _unit_area(_cross()),
}


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean inside-test of the unit-area ``shape`` at coordinates (x, y) of its own frame."""
    if shape == "circle":
        return x * x + y * y <= 1.0 / np.pi
    vertices = POLYGONS[shape]
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)
    for (ax, ay), (bx, by) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if ay == by:
            continue  # a horizontal edge never crosses the ray
        crosses = (ay > y) != (by > y)
        inside ^= crosses & (x < ax + (y - ay) * (bx - ax) / (by - ay))
    return inside


def placed_shape_mask(shape: str, grid_x: np.ndarray, grid_y: np.ndarray, centre, side: float,
                      rotation: float) -> np.ndarray:
    """``shape`` with area ``side**2``, centroid ``centre`` and rotation (radians) on a grid."""
    dx, dy = grid_x - centre[0], grid_y - centre[1]
    c, s = np.cos(rotation), np.sin(rotation)
    return shape_mask(shape, (c * dx + s * dy) / side, (-s * dx + c * dy) / side)


def pixel_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of an n x n pixel grid in relative coordinates: x (1, n) and y (n, 1)."""
    c = (np.arange(n) + 0.5) / n
    return c[None, :], c[:, None]


def anchor(position: str, spec: DrawSpec = SPEC) -> tuple[float, float]:
    ax, ay = ANCHORS[position]
    return 0.5 + ax * spec.anchor_offset, 0.5 + ay * spec.anchor_offset


def _texture_dark(texture: str, x, y, period: float, angle: float, phase,
                  spec: DrawSpec) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = (c * x + s * y) / period + phase[0]
    v = (-s * x + c * y) / period + phase[1]
    if texture == "striped":
        return (u % 1.0) < 0.5
    if texture == "checkered":
        return (np.floor(u / spec.checker_cell) + np.floor(v / spec.checker_cell)) % 2 == 1
    if texture == "dotted":
        return (u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2 < spec.dot_radius ** 2
    return np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)


def _draw_parameters(index: int, spec: DrawSpec) -> tuple[dict[str, str], dict]:
    rng = np.random.Generator(np.random.PCG64(index))
    attributes = {name: words[int(rng.integers(len(words)))] for name, words in ATTRIBUTES.items()}
    u = rng.uniform
    nuisance = {
        "side_factor": u(1 - spec.side_jitter, 1 + spec.side_jitter),
        "offset": u(-spec.position_jitter, spec.position_jitter, size=2),
        "rotation": np.deg2rad(u(-spec.rotation_deg, spec.rotation_deg)),
        "hue_offset": u(-spec.hue_jitter_deg, spec.hue_jitter_deg),
        "saturation": u(*spec.saturation),
        "value": u(*spec.value),
        "level": u(0.0, 1.0),
        "period": u(*spec.period),
        "texture_angle": u(0.0, np.pi),
        "texture_phase": u(0.0, 1.0, size=2),
        "wave_angle": u(0.0, 2 * np.pi, size=3),
        "wave_period": u(*spec.wave_period, size=3),
        "wave_phase": u(0.0, 2 * np.pi, size=3),
    }
    return attributes, nuisance


def _render(attributes: dict[str, str], p: dict, image_size: int, spec: DrawSpec) -> np.ndarray:
    n = image_size * spec.supersample
    x, y = pixel_grid(n)
    side = spec.large_side if attributes["size"] == "large" else spec.small_side
    side *= p["side_factor"]
    centre = np.add(anchor(attributes["position"], spec), p["offset"])
    inside = placed_shape_mask(attributes["shape"], x, y, centre, side, p["rotation"])

    hue = (HUES_DEG[attributes["color"]] + p["hue_offset"]) / 360.0 % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, p["saturation"], p["value"]))
    period = max(p["period"], spec.min_period_px / image_size)
    dark = _texture_dark(attributes["texture"], x, y, period, p["texture_angle"],
                         p["texture_phase"], spec)
    tone = np.where(inside, np.where(dark, spec.shade, 1.0), 0.0)

    lo, hi = spec.light_level if attributes["background"] == "light" else spec.dark_level
    ground = lo + p["level"] * (hi - lo)
    for angle, period_w, phase in zip(p["wave_angle"], p["wave_period"], p["wave_phase"]):
        # cos(a x + b y + phase) from 1-D factors: a plane wave is separable.
        ax, by = 2 * np.pi * np.cos(angle) * x / period_w, 2 * np.pi * np.sin(angle) * y / period_w
        ground = ground + spec.wave_amplitude * (
            np.cos(ax) * np.cos(by + phase) - np.sin(ax) * np.sin(by + phase))

    # Pixel = mean over its samples of (shape tone x color, or ground): two maps, then color.
    f = spec.supersample
    image = (_pool(tone, f)[..., None] * rgb
             + _pool(np.where(inside, 0.0, ground), f)[..., None])
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0) / 255.0
    return (image * 2.0 - 1.0).astype(np.float32)


def _pool(a: np.ndarray, f: int) -> np.ndarray:
    """Mean of each f x f block."""
    return sum(a[i::f, j::f] for i in range(f) for j in range(f)) / (f * f)


def _validate(index, image_size) -> None:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise P2LError(f"dataset index must be a non-negative integer, got {index!r}")
    if not isinstance(image_size, (int, np.integer)) or not MIN_SIZE <= image_size <= MAX_SIZE:
        raise P2LError(f"image_size must be in [{MIN_SIZE}, {MAX_SIZE}], got {image_size}")


def sample(index: int, image_size: int = 64, spec: DrawSpec = SPEC
           ) -> tuple[np.ndarray, str, dict[str, str]]:
    """Image ``(image_size, image_size, 3)`` float32 in [-1, 1], caption, attributes."""
    _validate(index, image_size)
    attributes, nuisance = _draw_parameters(int(index), spec)
    return _render(attributes, nuisance, image_size, spec), caption_of(attributes), attributes


def batch(indices, image_size: int = 64, spec: DrawSpec = SPEC
          ) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """:func:`sample` for each index: images ``(B, S, S, 3)``, captions, attribute dicts."""
    items = [sample(int(i), image_size, spec) for i in np.asarray(indices).reshape(-1)]
    if not items:
        return np.zeros((0, image_size, image_size, 3), np.float32), [], []
    images, caps, attrs = zip(*items)
    return np.stack(images), list(caps), list(attrs)


def caption_of(attributes: dict[str, str]) -> str:
    """The caption that names ``attributes`` (grammar in the module docstring)."""
    return _CAPTION.format(**attributes)


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of :func:`caption_of`; :class:`P2LError` if ``caption`` is not in the grammar."""
    match = _CAPTION_RE.fullmatch(caption.strip().lower())
    if match is None:
        raise P2LError(f"caption {caption!r} does not follow {_CAPTION!r}")
    attributes = match.groupdict()
    for name, word in attributes.items():
        if word not in ATTRIBUTES[name]:
            raise P2LError(f"caption {caption!r}: {name} {word!r} is not one of "
                           f"{', '.join(ATTRIBUTES[name])}")
    return attributes


def captions() -> list[str]:
    """All distinct captions (2400), in the order of :data:`ATTRIBUTES`' product."""
    names = list(ATTRIBUTES)
    return [caption_of(dict(zip(names, words)))
            for words in itertools.product(*ATTRIBUTES.values())]
