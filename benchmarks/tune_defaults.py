"""Choose P2L's and LDPS's defaults on the validation split (disjoint from the test split).

    python -m benchmarks.tune_defaults [--model DIR] [--output DIR] [--quick] [--metric psnr]

A coordinate sweep: starting from the configs' current defaults, for each axis in turn (P2L:
rho, learning_rate, project_every, lam, num_steps, clip_decoded; LDPS: rho) every value is evaluated with the
other axes at their best so far, and the axis keeps the value with the best objective. The
values of one axis run together as one settings sweep (:func:`p2l_jax.solvers.sweep`: one
compiled program vmapped over the points, per batch of images); only num_steps and
clip_decoded, the structural axes, need a program per value. The objective is the mean over tasks of the
per-task mean ``--metric`` over ``n`` validation images (task settings and scores as
benchmarks.restoration_quality; LPIPS is minimised, PSNR / SSIM maximised). Settings that give the same solver config (for example
``lam=0.01`` and ``lam=0.01, num_steps=25`` when 25 is the base) are evaluated once.

Every evaluation is appended, as it finishes, to ``tune_defaults.journal.jsonl`` in the output
folder; a rerun with the same sweep settings, model (path and weights' digest) and seed reuses the journal's evaluations
instead of recomputing them (a crash or kill loses at most the evaluation in flight). The
journal is kept after the final files are written and the grids are not part of its identity,
so widening a grid after a run computes only the new points. (Before settings were arrays of
the program every grid point compiled its own program, and keeping them exhausted the memory
of a 24 GiB machine after ten evaluations; now one program serves a solver structure.)

Prints and writes (``tune_defaults.json`` / ``.md``) every evaluation the sweep asked for (reused
ones included, each once) and ``best``: the values the solver configs' documented defaults
should take (P2LConfig.rho / project_every / lam / num_steps, OptimizerConfig.learning_rate,
LDPSConfig.rho). ``restoration_quality --settings`` runs the table with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax.numpy as jnp
import numpy as np

from benchmarks import quality
from benchmarks.restoration_quality import SETTING_NAMES, resolve
from p2l_jax.errors import P2LError
from p2l_jax.overrides import parse_values
from p2l_jax.parallel import map_batches
from p2l_jax.solvers import LDPSConfig, P2LConfig, compiled_programs, split
from p2l_jax.solvers.sweep import sweep_configs

NAME = "tune_defaults"
LOWER_IS_BETTER = {"lpips"}
TUNABLE = ("rho", "learning_rate", "project_every", "lam", "num_steps", "clip_decoded")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Sweep axes as (setting, values); ``steps`` is num_steps unless the sweep sets it."""

    n: int = 16
    tasks: tuple[str, ...] = ("sr", "gaussian-blur", "inpaint-box")
    sigma: float = 0.05
    steps: int = 50
    batch_size: int = 16
    split: str = "validation"
    metric: str = "psnr"
    p2l_grid: tuple[tuple[str, tuple], ...] = (
        ("rho", (0.1, 0.3, 1.0, 3.0)), ("learning_rate", (1e-4, 1e-3, 1e-2)),
        ("project_every", (2, 4, 8)), ("lam", (0.1, 1.0, 10.0)), ("num_steps", (25, 50, 100)))
    ldps_grid: tuple[tuple[str, tuple], ...] = (("rho", (0.1, 0.3, 1.0, 3.0)),)


def get_config(quick: bool = False) -> TuneConfig:
    if quick:
        return TuneConfig(n=4, tasks=("inpaint-box",), steps=10, batch_size=4,
                          p2l_grid=(("rho", (0.3, 1.0, 3.0)), ("learning_rate", (1e-4, 1e-2))),
                          ldps_grid=(("rho", (0.3, 1.0, 3.0)),))
    return TuneConfig()


def parse_grid(items, config, option: str) -> tuple[tuple[str, tuple], ...] | None:
    """``["rho=0.3,1", "lam=4"]`` -> (("rho", (0.3, 1.0)), ("lam", (4.0,))), each value parsed
    as ``config``'s field by the library's override parser; None stays None."""
    if items is None:
        return None
    grid = []
    for item in items:
        name, values = parse_values(config, item, option=option, names=SETTING_NAMES)
        if name not in TUNABLE:
            raise P2LError(f"{option} {item!r}: {name} is not a tuned setting; one of "
                           f"{', '.join(TUNABLE)}")
        grid.append((name, values))
    return tuple(grid)


def current_value(config, name: str):
    return config.optimizer.learning_rate if name == "learning_rate" else getattr(config, name)


class Evaluator:
    """Scores settings of one solver on the validation images; caches by settings, and with
    a :class:`benchmarks.quality.Journal` records each finished evaluation and starts from the
    journal's. Points of one solver structure are evaluated together, as one settings sweep."""

    def __init__(self, model, cfg: TuneConfig, seed: int, log=print,
                 journal: quality.Journal | None = None):
        self.model, self.cfg, self.log = model, cfg, log
        self.journal = journal
        S = model.image_size
        imgs = quality.load_images(cfg.split, cfg.n, S, seed)
        self.indices, self.truth, self.captions, self.keys = (imgs.indices, imgs.truth,
                                                              imgs.captions, imgs.keys)
        self.C0 = imgs.embeddings(model)[0]
        self.ops = {t: quality.operator_for(t, S) for t in cfg.tasks}
        self.ys = {t: imgs.measure(op, cfg.sigma) for t, op in self.ops.items()}
        self.records: list[dict] = journal.load() if journal is not None else []
        self.swept: list[dict] = []   # this sweep's evaluations, each once, in call order

    def __call__(self, solver: str, base, points: list[dict]) -> list[float]:
        """The objective of each point (settings dict) of ``solver`` from ``base``."""
        configs = [resolve(base, settings) for settings in points]
        todo: dict = {}  # structure -> {config not yet evaluated: its settings as asked}
        for settings, config in zip(points, configs):
            if self._known(solver, base, config) is None:
                todo.setdefault(split(config)[0], {}).setdefault(config, settings)
        for group in todo.values():
            self._run(solver, list(group.values()), list(group))
        found = [self._known(solver, base, c) for c in configs]
        for record, settings in zip(found, points):
            self._swept(record, settings)
        return [float("nan") if r["objective"] is None else r["objective"] for r in found]

    def _known(self, solver, base, config):
        """The recorded evaluation of ``config`` (however its settings are spelt), or None."""
        for r in self.records:
            try:
                if r["solver"] == solver and resolve(base, r["settings"]) == config:
                    return r
            except P2LError:  # a record of an option this version no longer has
                continue
        return None

    def _run(self, solver: str, points: list[dict], configs: list) -> list[dict]:
        """Evaluate configs of one structure as one sweep per task and batch of images."""
        start, programs, P = time.perf_counter(), compiled_programs(), len(configs)
        batch = min(self.cfg.batch_size, self.cfg.n)
        per_task = [{} for _ in configs]
        for task, op in self.ops.items():
            def fn(yb, kb, cb):
                out = sweep_configs(self.model, op, yb, kb, configs, embedding=cb)
                return jnp.moveaxis(out.images, 0, 1)   # (B, P, ...): batch-leading

            images, _ = map_batches(fn, batch, self.ys[task], self.keys, self.C0)
            for p in range(P):
                scores = quality.score_images(images[:, p], self.truth, op, self.ys[task],
                                              self.captions)
                per_task[p][task] = quality.interval(scores[self.cfg.metric])
        seconds, compiled = time.perf_counter() - start, compiled_programs() - programs
        records = []
        for settings, tasks in zip(points, per_task):
            means = [c["mean"] for c in tasks.values() if c["mean"] is not None]
            objective = float(np.mean(means)) if means else float("nan")
            record = {"solver": solver, "settings": dict(settings), "per_task": tasks,
                      "objective": objective, "seconds": seconds / P, "sweep_points": P,
                      "programs_compiled": compiled}
            self.records.append(record)
            if self.journal is not None:
                self.journal.append(record)
            self.log(f"{solver} {settings}: {self.cfg.metric} {objective:.4f}")
            records.append(record)
        return records

    def _swept(self, record: dict, settings: dict) -> None:
        """Note ``record`` as one of this sweep's evaluations, spelt as the sweep asked."""
        entry = {**record, "settings": dict(settings)}
        if entry not in self.swept:
            self.swept.append(entry)


def sweep(evaluate, solver: str, base, grid, lower_is_better: bool) -> dict:
    """Coordinate sweep (module docstring); ``evaluate(solver, base, points)`` scores a list
    of settings dicts (one axis's values) at once. Returns the best settings."""
    best = {name: current_value(base, name) for name, _ in grid}
    sign = -1.0 if lower_is_better else 1.0
    for name, values in grid:
        objectives = evaluate(solver, base, [{**best, name: v} for v in values])
        scored = [(sign * o, v) for o, v in zip(objectives, values)]
        finite = [(s, v) for s, v in scored if np.isfinite(s)]
        if finite:
            best[name] = max(finite, key=lambda sv: sv[0])[1]
    return best


def markdown(record: dict) -> str:
    cfg = record["config"]
    lines = quality.header(
        "Default selection on the validation split", record["command"], record["machine"],
        [f"{cfg['n']} {cfg['split']}-split images, tasks {', '.join(cfg['tasks'])}, "
         f"sigma_y {cfg['sigma']}, base {cfg['steps']} steps, objective: mean {cfg['metric']} "
         f"over tasks ({'lower' if cfg['metric'] in LOWER_IS_BETTER else 'higher'} is better), "
         f"coordinate sweep, model `{quality.model_label(record)}`"])
    tasks = cfg["tasks"]
    lines += ["| solver | settings | " + " | ".join(tasks) + " | objective |",
              "|---" * (len(tasks) + 3) + "|"]
    for r in record["evaluations"]:
        chosen = r["settings"] == record["best"][r["solver"]]
        settings = ", ".join(f"{k}={v:g}" for k, v in r["settings"].items())
        lines.append(f"| {r['solver']} | {'**' + settings + '**' if chosen else settings} | "
                     + " | ".join(quality.fmt(r["per_task"][t], 3) for t in tasks)
                     + f" | {quality.fmt({'mean': r['objective']}, 3)} |")
    lines += ["", "Chosen defaults: " + "; ".join(
        f"{s}: " + ", ".join(f"{k}={v:g}" for k, v in b.items())
        for s, b in record["best"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.add_common_arguments(p, "results/tune", NAME)
    p.add_argument("--n", type=int, default=None, help="number of validation images")
    p.add_argument("--tasks", nargs="+", default=None, choices=quality.TASKS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--metric", default=None, choices=("psnr", "ssim", "lpips"))
    p.add_argument("--p2l-grid", nargs="*", default=None, metavar="NAME=V1,V2",
                   help="replace P2L's sweep axes, e.g. rho=0.3,1 project_every=4,8")
    p.add_argument("--ldps-grid", nargs="*", default=None, metavar="NAME=V1,V2",
                   help="replace LDPS's sweep axes (the option with no value: no LDPS sweep; "
                        "without the option: rho=0.1,0.3,1,3)")
    args = p.parse_args(argv)
    cfg = get_config(args.quick)
    grids = dict(p2l_grid=parse_grid(args.p2l_grid, P2LConfig(), "--p2l-grid"),
                 ldps_grid=parse_grid(args.ldps_grid, LDPSConfig(), "--ldps-grid"))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in dict(
        n=args.n, tasks=args.tasks and tuple(args.tasks), steps=args.steps,
        metric=args.metric, **grids).items() if v is not None})

    start = time.perf_counter()
    model = quality.setup(args)
    # what an evaluation depends on (not the grids: a widened grid reuses finished points)
    scope = dataclasses.replace(cfg, p2l_grid=(), ldps_grid=())
    digest = quality.model_digest(str(args.model))
    journal = quality.Journal(args.output / f"{NAME}.journal.jsonl",
                      {"scope": scope, "seed": args.seed, "model": str(args.model),
                       "weights": digest})
    evaluate = Evaluator(model, cfg, args.seed, journal=journal)
    lower = cfg.metric in LOWER_IS_BETTER
    best = {"p2l": sweep(evaluate, "p2l", P2LConfig(num_steps=cfg.steps), cfg.p2l_grid, lower),
            "ldps": sweep(evaluate, "ldps", LDPSConfig(num_steps=cfg.steps), cfg.ldps_grid,
                          lower)}
    record = {"command": quality.command_line(argv, "benchmarks.tune_defaults"),
              "machine": quality.machine(), "model": args.model,
              "model_digest": digest, "seed": args.seed,
              "config": cfg, "indices": [int(i) for i in evaluate.indices],
              "evaluations": evaluate.swept, "best": best,
              "timing": {"total_s": time.perf_counter() - start}}
    quality.write_outputs(args.output, NAME, record, markdown(quality.plain(record)),
                          args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
