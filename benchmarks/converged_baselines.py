"""LDPS and PSLD run until they fit the measurement, against P2L at equal steps and wall time.

    python -m benchmarks.converged_baselines [--model DIR] [--output DIR] [--quick]
        [--results-md docs/RESULTS.md] [--compilation-cache DIR]

At a few dozen steps LDPS and PSLD end far from the measurement (final residual
``||y - A D(z_0)||`` several times the noise's ``||n|| ~ sigma_y sqrt(m)``), so a comparison at
that step count measures their non-convergence as much as their prior. This harness first
finds a step count where they do fit y, tunes their step size there, then compares:

1. **curve** (validation split, ``n_curve`` images): for each task, each step count N of
   ``steps_grid`` in ascending order, LDPS and PSLD at every ``curve_rhos`` value; the mean
   final residual against the noise level, the clean image's residual ``||y - A x||`` on the
   same images. ``N*(task)`` is the smallest N at which both baselines, each at its best
   curve rho, reach ``tolerance x`` the noise level; when no N does, the largest N (marked
   "not reached": the curve is then the result). rho is the per-step size of the latent step
   ``z <- z - rho grad ||y - A D(z0hat)||`` and is kept per step as N grows (the DPS
   convention: the total pull grows with N); larger values are the curve's other rhos.
2. **tune** (validation split, ``n_tune`` images): each baseline's rho from ``rho_grid`` at
   ``N*(task)``, per task, by mean PSNR (:func:`benchmarks.tune_defaults.sweep`, the
   coordinate sweep of the default selection, with one axis).
3. **test** (test split, ``n`` images): LDPS and PSLD at ``N*`` with the tuned rho, P2L (its
   defaults) at ``N*`` (equal steps), at ``p2l_steps`` (the restoration table's step count)
   and at ``N_eq``, the step count whose wall time per image matches the baselines' mean at
   ``N*``, from the per-step times measured in this stage; the baselines at ``p2l_steps``
   with their default rho (the restoration table's setting), for the change (unless
   ``--no-short-baselines``).

Every solver config comes from the library configs through
:func:`benchmarks.restoration_quality.method_config` (PSLD's box-inpainting weights
included), so each run is one ``solve``: one compiled scan per (solver, task, N), whatever
rho. Images, measurements and keys: :func:`benchmarks.quality.load_images` (same y and z_T
for every method; an image's result does not depend on its batch). Scores:
:func:`benchmarks.quality.score_images`; paired differences with Student-t 95% intervals.

Wall time: seconds per image of the batches that compiled nothing in this process (a batch
that compiled is excluded), on whatever cores the process is given; the machine's load is in
the record. Every finished batch of images is appended to ``converged_baselines.journal.jsonl``
in ``--output``, keyed by split, task, solver config and first image: a killed run resumes,
the curve's images are the tuning's first batch, and a widened grid computes only what is
new.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from benchmarks import quality
from benchmarks.restoration_quality import RestorationConfig, method_config, restore
from benchmarks.tune_defaults import sweep
from p2l_jax.solvers import LDPSConfig, PSLDConfig, compiled_programs

NAME = "converged_baselines"
BASELINES = ("ldps", "psld")
#: The baselines' starting configs, read for the tuning sweep's start value only.
BASE_CONFIGS = {"ldps": LDPSConfig, "psld": PSLDConfig}
#: metric -> (label, higher is better); the table's columns.
METRICS = {"psnr": ("PSNR (dB) ↑", True), "lpips": ("LPIPS ↓", False),
           "residual": ("residual ↓", False)}


@dataclasses.dataclass(frozen=True)
class ConvergedConfig:
    """What the run covers; every number is a documented choice [ours] for this benchmark.

    tolerance: N* needs the baselines' mean final residual <= tolerance x the clean image's
    mean residual (the noise norm); 1.25 leaves room for a sample that differs from the
    truth where A does not see it, and for P2L's own level at 25 steps (about 1.4 x on SR).
    short_baselines: also run the baselines at ``p2l_steps`` with their default rho.
    equal_time: also run P2L at N_eq (the step count of equal wall time)."""

    tasks: tuple[str, ...] = ("sr", "inpaint-box")
    sigma: float = 0.05
    steps_grid: tuple[int, ...] = (100, 200, 500)
    curve_rhos: tuple[float, ...] = (0.1, 0.3, 1.0)
    tolerance: float = 1.25
    rho_grid: tuple[float, ...] = (0.1, 0.3, 1.0)
    p2l_steps: int = 25
    n_curve: int = 4
    n_tune: int = 8
    n: int = 20
    batch_size: int = 4
    short_baselines: bool = True
    equal_time: bool = True


def get_config(quick: bool = False) -> ConvergedConfig:
    if quick:
        return ConvergedConfig(tasks=("sr",), steps_grid=(10, 20), curve_rhos=(0.1,),
                               rho_grid=(0.1, 0.3), p2l_steps=5, n_curve=2, n_tune=2, n=4,
                               batch_size=2)
    return ConvergedConfig()


def config_for(method: str, task: str, steps: int, rho: float | None = None):
    """The library config of ``method`` (ldps / psld / p2l) on ``task`` at ``steps`` steps,
    with ``rho`` for the baselines (None: the config's default)."""
    settings = () if rho is None else (("rho", float(rho)),)
    return method_config(method, task, RestorationConfig(steps=steps, ldps_settings=settings))


class Runner:
    """Scores of a solver config on the first ``n`` images of a split, batch by batch, each
    batch recorded in the journal (module docstring) and reused from it."""

    def __init__(self, model, cfg: ConvergedConfig, seed: int, journal: quality.Journal,
                 log=print):
        self.model, self.cfg, self.seed, self.journal, self.log = model, cfg, seed, journal, log
        self.records = {self._key(r): r for r in journal.load()}
        self.images: dict[str, quality.Images] = {}
        self.computed = 0

    @staticmethod
    def _key(r: dict) -> str:
        return json.dumps([r["split"], r["task"], r["config"], r["start"], r["count"]],
                          sort_keys=True)

    def split(self, split: str, n: int) -> quality.Images:
        have = self.images.get(split)
        if have is None or len(have.ids) < n:
            have = quality.load_images(split, n, self.model.image_size, self.seed)
            self.images[split] = have
        return have

    def noise_level(self, split: str, n: int, task: str) -> list[float]:
        """The clean images' residuals ``||y - A x||`` (the noise norms)."""
        imgs, op = self.split(split, n), quality.operator_for(task, self.model.image_size)
        y = imgs.measure(op, self.cfg.sigma)[:n]
        return quality.score_images(imgs.truth[:n], imgs.truth[:n], op, y,
                                    imgs.captions[:n])["residual"]

    def scores(self, split: str, n: int, task: str, config) -> dict:
        """``{"scores": {metric: [per image]}, "seconds": [per image of the batches that
        compiled nothing], "batches": [...]}`` over the first ``n`` images."""
        imgs, S, B = self.split(split, n), self.model.image_size, self.cfg.batch_size
        op = quality.operator_for(task, S)
        y = imgs.measure(op, self.cfg.sigma)
        C_null = imgs.embeddings(self.model)[0]
        fields = quality.config_fields(config)
        batches = []
        for start in range(0, n, B):
            stop = min(start + B, n)
            r = {"split": split, "task": task, "config": fields, "start": start,
                 "count": stop - start}
            found = self.records.get(self._key(quality.plain(r)))
            if found is None:
                rows = slice(start, stop)
                before, t0 = compiled_programs(), time.perf_counter()
                images, _, _ = restore(self.model, op, y[rows], imgs.keys[rows], config,
                                       C_null[rows], B)
                seconds = time.perf_counter() - t0
                found = quality.plain({**r, "seconds": seconds,
                                       "compiled": compiled_programs() > before,
                                       "scores": quality.score_images(
                                           images, imgs.truth[rows], op, y[rows],
                                           imgs.captions[rows])})
                self.journal.append(found)
                self.records[self._key(found)] = found
                self.computed += 1
            batches.append(found)
        merged = {m: sum((b["scores"][m] for b in batches), []) for m in batches[0]["scores"]}
        steady = [b["seconds"] / b["count"] for b in batches if not b["compiled"]]
        return {"scores": merged, "seconds_per_image": steady,
                "first_batch_s": batches[0]["seconds"], "batch_size": B}


def choose_steps(curve: list[dict], noise: float, tolerance: float) -> tuple[int, bool]:
    """(N*, reached): the smallest N at which every baseline's best mean residual over its
    curve rhos is <= tolerance x noise; (largest N, False) when none is."""
    by_n: dict[int, dict[str, float]] = {}
    for p in curve:
        best = by_n.setdefault(p["steps"], {})
        best[p["solver"]] = min(best.get(p["solver"], np.inf), p["residual"]["mean"])
    for n in sorted(by_n):
        if set(by_n[n]) >= set(BASELINES) and all(
                by_n[n][s] <= tolerance * noise for s in BASELINES):
            return n, True
    return max(by_n), False


def equal_time_steps(baseline_s: float, p2l_s_per_step: float) -> int:
    """The P2L step count whose wall time per image matches ``baseline_s``."""
    return max(1, int(round(baseline_s / p2l_s_per_step)))


def run_curve(runner: Runner, cfg: ConvergedConfig, log=print) -> dict:
    """Stage 1 (module docstring): per task, the curve points, the noise level, N*."""
    out = {}
    for task in cfg.tasks:
        noise = quality.interval(runner.noise_level("validation", cfg.n_curve, task))
        points: list[dict] = []
        for steps in sorted(cfg.steps_grid):
            for solver in BASELINES:
                for rho in cfg.curve_rhos:
                    res = runner.scores("validation", cfg.n_curve, task,
                                        config_for(solver, task, steps, rho))
                    points.append({"solver": solver, "steps": steps, "rho": rho,
                                   "residual": quality.interval(res["scores"]["residual"]),
                                   "psnr": quality.interval(res["scores"]["psnr"])})
                    log(f"curve {task} {solver} N={steps} rho={rho}: residual "
                        f"{points[-1]['residual']['mean']:.3f} (noise {noise['mean']:.3f})")
            n_star, reached = choose_steps(points, noise["mean"], cfg.tolerance)
            if reached:
                break
        out[task] = {"noise": noise, "points": points, "steps": n_star, "reached": reached}
    return out


def run_tuning(runner: Runner, cfg: ConvergedConfig, n_star: dict[str, int], log=print
               ) -> tuple[dict, list]:
    """Stage 2: each baseline's rho at N*(task) by mean validation PSNR, per task (N* is per
    task, and one rho for both tasks would hold a baseline back where the other task
    diverges at its best value). Returns ({solver: {task: rho}}, evaluations)."""
    evaluations = []

    def evaluate(task):
        def objectives(solver, base, points):
            out = []
            for point in points:
                psnr = quality.interval(runner.scores(
                    "validation", cfg.n_tune, task,
                    config_for(solver, task, n_star[task], point["rho"]))["scores"]["psnr"])
                evaluations.append({"solver": solver, "task": task, "rho": point["rho"],
                                    "psnr": psnr})
                log(f"tune {task} {solver} rho={point['rho']}: psnr {psnr['mean']:.3f}")
                out.append(psnr["mean"])
            return out
        return objectives

    best = {s: {t: sweep(evaluate(t), s, BASE_CONFIGS[s](num_steps=1),
                         (("rho", cfg.rho_grid),), lower_is_better=False)["rho"]
                for t in cfg.tasks} for s in BASELINES}
    return best, evaluations


def run_test(runner: Runner, cfg: ConvergedConfig, n_star: dict[str, int],
             rho: dict[str, dict[str, float]], log=print) -> dict:
    """Stage 3: every method's per-image scores and wall time, and N_eq, per task. The rows
    run in passes over the tasks, cheapest and most needed first (the baselines at N* and
    P2L at ``p2l_steps``, then P2L at N*, then the equal-time and short rows), so that a run
    cut short leaves the main comparison of every task in the journal."""
    out = {t: {"steps": n_star[t], "equal_time_steps": None, "rows": {}} for t in cfg.tasks}

    def add(task, label, method, steps, r=None):
        config = config_for(method, task, steps, r)
        res = runner.scores("test", cfg.n, task, config)
        out[task]["rows"][label] = {"method": method, "steps": steps,
                                    "rho": getattr(config, "rho"), **res}
        log(f"test {task} {label}: PSNR {quality.fmt(quality.interval(res['scores']['psnr']))}"
            f", residual {quality.fmt(quality.interval(res['scores']['residual']))}")

    for task in cfg.tasks:
        for s in BASELINES:
            add(task, f"{s}@N*", s, n_star[task], rho[s][task])
        add(task, f"p2l@{cfg.p2l_steps}", "p2l", cfg.p2l_steps)
    for task in cfg.tasks:
        add(task, "p2l@N*", "p2l", n_star[task])
    for task in cfg.tasks:
        rows = out[task]["rows"]
        base_s = [np.mean(rows[f"{s}@N*"]["seconds_per_image"]) for s in BASELINES
                  if rows[f"{s}@N*"]["seconds_per_image"]]
        p2l_s = rows["p2l@N*"]["seconds_per_image"]
        if cfg.equal_time and base_s and p2l_s:
            n_eq = equal_time_steps(float(np.mean(base_s)), float(np.mean(p2l_s)) / n_star[task])
            out[task]["equal_time_steps"] = n_eq
            add(task, "p2l@N_eq", "p2l", n_eq)
        for s in BASELINES if cfg.short_baselines else ():
            add(task, f"{s}@{cfg.p2l_steps}", s, cfg.p2l_steps)
    return out


def summarize(test: dict) -> None:
    """Per row: metric intervals and mean wall time; per task: every P2L row minus every
    baseline row, paired per image, with a verdict (in place)."""
    for t in test.values():
        for row in t["rows"].values():
            row["metrics"] = {m: quality.interval(row["scores"][m]) for m in METRICS}
            s = row["seconds_per_image"]
            row["wall_s_per_image"] = float(np.mean(s)) if s else None
        t["comparisons"] = []
        for p in (k for k, r in t["rows"].items() if r["method"] == "p2l"):
            for b in (k for k, r in t["rows"].items() if r["method"] != "p2l"):
                delta = {m: quality.paired_interval(t["rows"][p]["scores"][m],
                                                    t["rows"][b]["scores"][m]) for m in METRICS}
                t["comparisons"].append({"p2l": p, "versus": b, "delta": delta, "verdict": {
                    m: quality.verdict(delta[m], METRICS[m][1]) for m in METRICS}})


def markdown(record: dict) -> str:
    cfg = record["config"]
    extra = [f"sigma_y {cfg['sigma']}, model `{quality.model_label(record)}`, seed "
             f"{record['seed']}; curve on {cfg['n_curve']} and tuning on {cfg['n_tune']} "
             f"validation images, comparison on {cfg['n']} test images, batch "
             f"{cfg['batch_size']}",
             f"N*: the smallest N of {', '.join(map(str, cfg['steps_grid']))} at which LDPS and "
             f"PSLD (each at its best rho of {', '.join(f'{r:g}' for r in cfg['curve_rhos'])}, "
             f"rho per step, not scaled with N) have a mean final residual <= "
             f"{cfg['tolerance']:g} x the clean image's",
             f"Intervals: {quality.INTERVAL_METHOD}; cells show mean ± half-width.",
             f"Wall time: {record['timing']['total_s'] / 60:.1f} min ({record['computed_batches']}"
             " batches computed, the rest from the journal); per-image times exclude batches "
             "that compiled"]
    lines = quality.header("LDPS and PSLD at a step count where they fit y",
                           record["command"], record["machine"], extra)
    lines += ["**Residual against step count** (validation; mean final ‖y − A D(z_0)‖, PSNR "
              "dB)", "", "| task | noise ‖n‖ | solver | N | rho | residual | PSNR |",
              "|---" * 7 + "|"]
    for task, c in record["curve"].items():
        for p in c["points"]:
            lines.append(f"| {task} | {c['noise']['mean']:.2f} | {p['solver']} | {p['steps']} | "
                         f"{p['rho']:g} | {quality.fmt(p['residual'])} | "
                         f"{quality.fmt(p['psnr'])} |")
    lines += [""] + [f"N*({task}) = {c['steps']}" + ("" if c["reached"] else
                     " (**not reached**: no N of the grid fits y to the tolerance)")
                     for task, c in record["curve"].items()]
    lines += ["", "**rho at N*** (validation, mean PSNR dB; bold: chosen, per task)", "",
              "| task | solver | " + " | ".join(f"rho {r:g}" for r in cfg["rho_grid"]) + " |",
              "|---" * (len(cfg["rho_grid"]) + 2) + "|"]
    for task in cfg["tasks"]:
        for s in BASELINES:
            cells = {e["rho"]: e["psnr"] for e in record["tuning"]
                     if e["task"] == task and e["solver"] == s}
            mark = lambda r, text: f"**{text}**" if r == record["rho"][s][task] else text
            lines.append(f"| {task} | {s} | " + " | ".join(
                mark(r, quality.fmt(cells.get(r))) for r in cfg["rho_grid"]) + " |")
    for task, t in record["test"].items():
        lines += ["", f"**{task} σ={cfg['sigma']:g}, test images** (N* = {t['steps']}, "
                  f"N_eq = {t['equal_time_steps']})", "",
                  "| method | steps | rho | " + " | ".join(l for l, _ in METRICS.values())
                  + " | s / image |", "|---" * (len(METRICS) + 4) + "|"]
        for label, row in t["rows"].items():
            wall = row["wall_s_per_image"]
            lines.append(f"| {label} | {row['steps']} | {row['rho']:g} | " + " | ".join(
                quality.fmt(row["metrics"][m], 2 if m == "psnr" else 3) for m in METRICS)
                + f" | {'–' if wall is None else f'{wall:.2f}'} |")
        lines += ["", "| P2L | versus | ΔPSNR (dB) | ΔLPIPS | Δresidual |", "|---" * 5 + "|"]
        for c in t["comparisons"]:
            lines.append(f"| {c['p2l']} | {c['versus']} | " + " | ".join(
                f"{quality.fmt(c['delta'][m], 2 if m == 'psnr' else 3, signed=True)} "
                f"({c['verdict'][m]})" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.add_common_arguments(p, "results/converged_baselines", NAME)
    p.add_argument("--tasks", nargs="+", default=None, choices=quality.TASKS)
    p.add_argument("--steps-grid", nargs="+", type=int, default=None)
    p.add_argument("--curve-rhos", nargs="+", type=float, default=None)
    p.add_argument("--rho-grid", nargs="+", type=float, default=None)
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--p2l-steps", type=int, default=None)
    p.add_argument("--n-curve", type=int, default=None)
    p.add_argument("--n-tune", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="number of test images")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-short-baselines", dest="short_baselines", action="store_false",
                   default=None, help="skip the baselines at --p2l-steps")
    p.add_argument("--no-equal-time", dest="equal_time", action="store_false", default=None,
                   help="skip P2L at the step count of equal wall time")
    p.add_argument("--stage", choices=("curve", "tune", "test"), default="test",
                   help="stop after this stage (the journal keeps what ran)")
    args = p.parse_args(argv)
    tuples = lambda v: v and tuple(v)
    over = dict(tasks=tuples(args.tasks), steps_grid=tuples(args.steps_grid),
                curve_rhos=tuples(args.curve_rhos), rho_grid=tuples(args.rho_grid),
                tolerance=args.tolerance, p2l_steps=args.p2l_steps, n_curve=args.n_curve,
                n_tune=args.n_tune, n=args.n, batch_size=args.batch_size,
                short_baselines=args.short_baselines, equal_time=args.equal_time)
    cfg = dataclasses.replace(get_config(args.quick),
                              **{k: v for k, v in over.items() if v is not None})

    start = time.perf_counter()
    model = quality.setup(args)
    digest = quality.model_digest(str(args.model))
    # what a batch's result depends on besides its key (split, task, config, first image)
    journal = quality.Journal(args.output / f"{NAME}.journal.jsonl", {
        "seed": args.seed, "model": str(args.model), "weights": digest, "sigma": cfg.sigma,
        "batch_size": cfg.batch_size})
    runner = Runner(model, cfg, args.seed, journal)
    record = {"command": quality.command_line(argv, f"benchmarks.{NAME}"),
              "model": args.model, "model_digest": digest, "seed": args.seed, "config": cfg}
    record["curve"] = run_curve(runner, cfg)
    n_star = {t: c["steps"] for t, c in record["curve"].items()}
    if args.stage != "curve":
        record["rho"], record["tuning"] = run_tuning(runner, cfg, n_star)
    if args.stage == "test":
        record["test"] = run_test(runner, cfg, n_star, record["rho"])
        summarize(record["test"])
    record.update(machine=quality.machine(), computed_batches=runner.computed,
                  timing={"total_s": time.perf_counter() - start})
    if args.stage != "test":
        print(json.dumps(quality.plain({k: record[k] for k in ("curve", "rho")
                                        if k in record}), indent=1))
        return 0
    quality.write_outputs(args.output, NAME, record, markdown(quality.plain(record)),
                          args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
