"""Inputs of ``p2l-jax restore``: which files are images to restore or ``degrade``
measurements (``<stem>.npy`` + ``<stem>.json`` sidecar), one item per stem, with output names
that cannot collide or leave the output folder."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from p2l_jax import imageio
from p2l_jax.errors import P2LError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to restore: ``identity`` (input stem) and where its data comes from."""

    identity: str
    path: Path                      # the image, or the measurement .npy
    sidecar: dict | None = None     # degrade sidecar for measurements

    @property
    def name(self) -> str:
        """Output file stem: the identity restricted to ``[A-Za-z0-9._-]``, never hidden."""
        return re.sub(r"^\.", "_", re.sub(r"[^A-Za-z0-9._-]", "_", self.identity))


def _sidecar(path: Path) -> dict | None:
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    record = imageio.read_json(side)
    return record if isinstance(record, dict) and "operator" in record else None


def _item(path: Path) -> Item | None:
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES | {".npy", ".json"}:
        return None
    side = _sidecar(path)
    if side is not None:
        npy = path.with_suffix(".npy")
        if not npy.is_file():
            raise P2LError(f"{path.with_suffix('.json')}: degrade sidecar without {npy.name}")
        return Item(path.stem, npy, side)
    return Item(path.stem, path) if suffix in IMAGE_SUFFIXES or suffix == ".npy" else None


def collect_inputs(paths: list[Path]) -> list[Item]:
    """Items of the ``--input`` paths, sorted by identity; one per stem."""
    items: dict[str, Item] = {}
    for path in paths:
        if not path.exists():
            raise P2LError(f"--input {path}: no such file or folder")
        if path.is_dir():
            found = [i for i in map(_item, sorted(p for p in path.iterdir() if p.is_file())) if i]
            if not found:
                raise P2LError(f"--input {path}: folder has no images or degrade outputs")
        else:
            found = [_item(path)]
            if found[0] is None:
                raise P2LError(f"--input {path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))})"
                               " or a degrade output")
        for item in found:
            old = items.get(item.identity)
            if old is not None and old.path != item.path:
                raise P2LError(f"{item.path}: same stem as {old.path}; outputs would collide")
            items[item.identity] = item
    names = {}
    for item in items.values():
        if item.name in names:
            raise P2LError(f"{item.path}: output name {item.name!r} collides with "
                           f"{names[item.name]}")
        names[item.name] = item.path
    return sorted(items.values(), key=lambda i: i.identity)
