"""Image and record files: reading to float [-1, 1], writing PNG / .npy / JSON atomically.

Reading: ``read_image(path)`` returns ``(image, info)`` with ``image`` an ``(H, W, 3)`` float32
array in [-1, 1] (``x = 2 v / v_max - 1`` for integer pixel values ``v``) and ``info`` a dict
saying what was converted (greyscale replicated to 3 channels, alpha discarded, palette
expanded, 16-bit scaled). Pillow decodes 16-bit *colour* PNGs to 8 bits per channel; such an
image is read at that precision and ``info["converted"]`` says so (16-bit greyscale keeps its
16 bits). ``.npy`` files holding an ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` float array are
accepted too; :func:`check_image_values` checks that an image's values are finite and in
[-1, 1]. Unreadable files, and sizes over Pillow's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``), raise :class:`P2LError` naming the file.

Writing: every writer goes through a temporary file in the destination folder and
``os.replace``, so a reader never sees a partial file and a failed write leaves nothing; an
``OSError`` (disk full, no permission, a folder in the way) becomes a :class:`P2LError`
naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from p2l_jax.errors import P2LError

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """Permissions of an ordinary new file (0o666 less the umask); mkstemp's are 0o600."""
    return 0o666 & ~current_umask()


def _read_npy(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise P2LError(f"{path}: cannot read .npy array: {err}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or not np.issubdtype(arr.dtype, np.floating):
        raise P2LError(f"{path}: expected a float (H, W), (H, W, 1) or (H, W, 3) array, got "
                       f"{arr.dtype} {arr.shape}")
    info = {"format": "npy", "mode": f"float{arr.shape[2]}", "converted": []}
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
        info["converted"].append("greyscale replicated to RGB")
    return arr.astype(np.float32), info


def check_image_values(path: str | os.PathLike, image: np.ndarray) -> None:
    """Raise :class:`P2LError` naming ``path`` unless ``image`` is finite and in [-1, 1]."""
    if not np.all(np.isfinite(image)):
        raise P2LError(f"{path}: contains NaN or inf")
    low, high = float(np.min(image)), float(np.max(image))
    if low < -1.0 or high > 1.0:
        raise P2LError(f"{path}: values outside [-1, 1] (min {low:.4g}, max {high:.4g}); "
                       "images as .npy must be scaled to [-1, 1]")


def _sixteen_bit_colour(img) -> bool:
    """Whether Pillow is about to decode 16-bit colour samples to 8 bits (``RGB;16B`` ...)."""
    return img.mode in ("RGB", "RGBA") and any(
        isinstance(t.args, str) and ";16" in t.args for t in (img.tile or []))


def _declared_size(path: Path) -> str:
    """``WxH`` from the header of an image refused for its size (never decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # header only: Image.open decodes nothing
    try:
        with Image.open(path) as img:
            return f"{img.width}x{img.height}"
    except Exception:  # noqa: BLE001 - only the message depends on it
        return "its"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``(H, W, 3)`` float32 image in [-1, 1] and an info dict (format, mode, conversions)."""
    path = Path(path)
    if not path.is_file():
        raise P2LError(f"{path}: no such input file (or not a regular file)")
    if path.suffix.lower() == ".npy":
        return _read_npy(path)
    try:
        with warnings.catch_warnings():  # the warning level of the limit is refused too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise P2LError(f"{path}: {_declared_size(path)} pixels exceed Pillow's decompression-"
                       f"bomb limit ({Image.MAX_IMAGE_PIXELS} pixels); refused") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise P2LError(f"{path}: cannot read image: {err}") from None
    try:
        with img:
            deep_colour = _sixteen_bit_colour(img)
            img.load()
            fmt, mode = img.format, img.mode
            converted = []
            if deep_colour:
                converted.append(f"16-bit {mode} read at 8-bit precision (Pillow decodes "
                                 "16-bit colour to 8 bits per channel)")
            if mode in _SIXTEEN_BIT_MODES:
                arr = np.asarray(img, dtype=np.float64) / 65535.0
                arr = np.repeat(arr[:, :, None], 3, axis=2)
                converted.append(f"{mode} greyscale scaled by 1/65535 and replicated to RGB")
            else:
                if mode != "RGB":
                    if "A" in mode or "transparency" in img.info:
                        converted.append(f"{mode}: alpha discarded")
                    if mode in ("L", "LA", "1"):
                        converted.append("greyscale replicated to RGB")
                    elif mode not in ("RGBA",):
                        converted.append(f"{mode} converted to RGB")
                    img = img.convert("RGB")
                arr = np.asarray(img, dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise P2LError(f"{path}: cannot read image: {err}") from None
    image = (2.0 * arr - 1.0).astype(np.float32)
    return image, {"format": fmt, "mode": mode, "converted": converted}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    An ``OSError`` while writing (disk full, permissions, a folder at ``path``) is raised as
    :class:`P2LError` naming ``path``; the temporary file is removed in every case."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise P2LError(f"{path}: cannot write ({err.strerror or err})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise P2LError(f"{path}: cannot write ({err.strerror or err})") from None
        raise


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 by ``round((x + 1) * 127.5)``, clipped."""
    return np.clip(np.rint((np.asarray(image, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` image in [-1, 1] as 8-bit PNG (a
    ``uint8`` array is written as it is: pictures already in 0..255)."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise P2LError(f"{path}: cannot write an image of shape {np.shape(image)} as PNG")
    with atomic_path(path) as tmp:
        Image.fromarray(arr if arr.dtype == np.uint8 else to_uint8(arr)).save(tmp, format="PNG")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` exactly as ``.npy``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON (strict: no NaN/inf)."""
    write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON record; :class:`P2LError` naming the file if it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise P2LError(f"{path}: cannot read JSON: {err}") from None
