"""``p2l-jax restore``: restore a set of images on every device, resumable, with records.

Inputs (``--input`` files and/or folders; a folder means its files, not sub-folders):

- measurements written by ``p2l-jax degrade``: ``<stem>.npy`` with its ``<stem>.json``
  sidecar (a ``.png`` next to a sidecar also selects that measurement). The sidecar rebuilds
  the operator exactly; its ``input`` ground truth, if still there, is used for metrics;
- plain images (PNG, JPEG, ...; greyscale/RGBA converted, said in the record): with
  ``--simulate`` they are ground truth (degraded with ``--sigma``, restored, scored), without
  it they are the measurement ``y`` of ``--task``.

Size policy: image sides must be multiples of the model's ``f * 2^(L-1)`` (64 for SD);
other sizes are refused with a message naming the file. Nothing is resized.

Outputs in ``--output`` (names are the input stems, sanitised, so they stay in the folder):
``<stem>.png`` (restored), ``<stem>.json`` (record: settings, seed, key, timings, residual,
metrics), ``grid/<stem>.png`` with ``--grid`` (measurement | restored | ground truth), and
``summary.json`` + ``summary.csv``. Every file is written atomically (temp file + rename); the
record is written after the image, so a record means a complete output.

Rerun after a kill: images whose record exists are skipped; everything else (the batch that
was in flight) is recomputed (from its last in-flight checkpoint with
``--checkpoint-every``), and the temp files a kill left for those images are removed. A rerun
with different settings into the same folder is refused. Inputs are never overwritten.

Progress inside a batch: ``--progress-every K`` prints ``step s/N`` on stderr every K
sampler steps (default: every ``N // 10`` steps when ``--steps`` >= 100, off for shorter runs;
0 turns it off). The sampler then runs in chunks (:mod:`p2l_jax.solvers.resumable`: one
compiled "advance k steps" program called ``N / k`` times, same results).

In-flight checkpoints: ``--checkpoint-every N`` saves the sampler state of the batch in
flight every N steps under ``OUTPUT/.inflight/<batch id>/`` (orbax, atomic); a rerun with the
same settings and batch resumes from the last saved step, and the folder is deleted once the
batch's outputs are written (a checkpoint of other settings or of a batch that no longer
exists, e.g. after a new ``--batch-size``, is not used and is removed at the end of a
single-process run). With both options the chunk is gcd(K, N) steps.

Multi-host: with ``--coordinator`` (or ``P2L_COORDINATOR_ADDRESS``) each process restores its
share of the sorted inputs; process 0 writes the summary once all have finished.

Every input, option, the output folder (created and written to with a test file) and the
model are checked before any image is restored; a bad one gives a one-line error and exit 2.
One run at a time per output folder: a second run on a folder in use refuses, naming the
first one's pid (:mod:`p2l_jax.cli.output_folder`). Ctrl-C ends the run at once with exit
130 and leaves the folder resumable. A non-finite result is recorded per image (status
``non-finite``, no PNG) and the run exits 1; non-finite numbers in records are written as
``null``. docs/faults.md lists every fault case.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import dataclasses
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from p2l_jax import imageio
from p2l_jax.cli import output_folder
from p2l_jax.cli.degrade import add_task_options, task_options
from p2l_jax.cli.inputs import Item, collect_inputs
from p2l_jax.cli.solver_options import PRESETS, SOLVERS, default_steps_help, solver_config
from p2l_jax.errors import P2LError
from p2l_jax.fingerprint import digest, settings_fingerprint

DEFAULT_SIGMA = 0.05


def register(subparsers) -> None:
    p = subparsers.add_parser("restore", help="restore images (P2L or a baseline) on all devices",
                              description=__doc__.split("\n\n")[0])
    add_task_options(p, seed=False)  # degrade's operator options; --seed is below
    p.add_argument("--task", help="degradation task (required unless inputs are degrade outputs)")
    p.add_argument("--solver", default="p2l", help=f"one of: {', '.join(SOLVERS)} (%(default)s)")
    p.add_argument("--steps", type=int, default=None, help=default_steps_help())
    p.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH")
    p.add_argument("--output", required=True, type=Path, metavar="DIR")
    p.add_argument("--model", type=Path, default=None, help="diffusers-layout model directory "
                   "(default: the embedded model)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.ckpt pickled weights (read with torch.load("
                        "weights_only=True); needs torch)")
    p.add_argument("--simulate", action="store_true",
                   help="inputs are ground truth: degrade, restore and score them")
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA,
                   help="--simulate: measurement noise on the [-1, 1] scale (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="run seed (%(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: one per local device)")
    p.add_argument("--prompt", default=None, help="text prompt (default: the solver's, \"\")")
    p.add_argument("--preset", default="default", choices=PRESETS,
                   help="solver settings: 'default' (this project's, tuned on the embedded "
                        "model) or 'paper' (P2L's paper settings: 1000 steps, projection every "
                        "8 steps with lambda 1, Adam 1e-4); --steps and --set apply on top")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="override a solver config field, e.g. --set rho=0.5 --set project_every=4 "
                        "--set gradient=joint --set optimizer.learning_rate=1e-3 (repeatable)")
    p.add_argument("--progress-every", type=int, default=None, metavar="K",
                   help="print timestep progress every K steps inside a batch (default: "
                        "steps // 10 when --steps >= 100, else off; 0: off)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="save the in-flight sampler state every N steps under "
                        "OUTPUT/.inflight/ and resume it on a rerun (default: off)")
    p.add_argument("--parallel", default="shard_map", choices=("shard_map", "pmap"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--grid", action="store_true", help="also write grid/<stem>.png")
    p.add_argument("--coordinator", default=None, help="jax.distributed coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------ checks
def _check_options(args) -> None:
    if args.steps is not None and args.steps <= 0:
        raise P2LError(f"--steps must be a positive integer, got {args.steps}")
    if not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise P2LError(f"--sigma must be a finite number >= 0, got {args.sigma}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise P2LError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.progress_every is not None and args.progress_every < 0:
        raise P2LError(f"--progress-every must be an integer >= 0, got {args.progress_every}")
    if args.checkpoint_every is not None and args.checkpoint_every <= 0:
        raise P2LError(f"--checkpoint-every must be a positive integer, got "
                       f"{args.checkpoint_every}")
    if args.solver not in SOLVERS:
        raise P2LError(f"unknown --solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    if args.scale <= 0:
        raise P2LError(f"--scale must be a positive integer, got {args.scale}")
    from p2l_jax.operators import TASKS

    if args.task is not None and args.task not in TASKS:
        raise P2LError(f"unknown --task {args.task!r}; choose one of {', '.join(TASKS)}")


@dataclasses.dataclass
class Job:
    """An item with its data as read and checked once (``data``: the ground truth with
    ``--simulate``, else the measurement), its operator and (when known) the path of its
    ground truth."""

    item: Item
    operator: object
    truth: Path | None
    info: dict
    image_size: tuple[int, int]
    data: np.ndarray


def plan_jobs(items: list[Item], args) -> list[Job]:
    """Read and check every item once (readable, finite, operator fits); write nothing. The
    arrays read are kept in the jobs, so no input is read twice."""
    from p2l_jax.operators import from_dict, make_operator, measurement_shape

    options = task_options(args)
    operators: dict = {}
    jobs = []
    for item in items:
        try:
            if item.sidecar is not None:
                if args.simulate:
                    raise P2LError("is a degrade measurement; --simulate needs ground-truth images")
                side = item.sidecar
                if args.task is not None and side.get("task") != args.task:
                    raise P2LError(f"was degraded with task {side.get('task')!r}, not --task "
                                   f"{args.task}")
                y, info = imageio.read_image(item.path)
                hw = tuple(side.get("image_size", y.shape[:2]))
                op = from_dict(side["operator"])
                truth = Path(side["input"]) if side.get("input") else None
                truth = truth if truth is not None and truth.is_file() else None
            else:
                if args.task is None:
                    raise P2LError("is a plain image; give --task")
                y, info = imageio.read_image(item.path)
                if args.simulate:  # ground truth: [-1, 1] like a decoded image
                    imageio.check_image_values(item.path, y)
                hw = y.shape[:2]
                if not args.simulate and args.task == "sr":
                    hw = (hw[0] * args.scale, hw[1] * args.scale)
                if (args.task, hw) not in operators:
                    operators[(args.task, hw)] = make_operator(args.task, hw, options)
                op = operators[(args.task, hw)]
                truth = item.path if args.simulate else None
            if not np.all(np.isfinite(y)):
                raise P2LError("contains NaN or inf")
            op.validate_shape((1, *hw, 3))
            if item.sidecar is None and not args.simulate:
                expected = measurement_shape(op, (1, *hw, 3))[1:]
                if tuple(y.shape) != expected:
                    raise P2LError(f"measurement shape {y.shape} does not match {args.task} "
                                   f"of a {hw[0]}x{hw[1]} image {expected}")
        except P2LError as err:
            msg = str(err)
            raise P2LError(msg if msg.startswith(str(item.path)) else f"{item.path}: {msg}") from None
        jobs.append(Job(item, op, truth, info, tuple(int(v) for v in hw), y))
    return jobs


# ----------------------------------------------------------------------------- outputs
def _fingerprint(args, config) -> str:
    from p2l_jax.pipeline import config_record

    settings = {"config": config_record(config), "seed": args.seed, "simulate": args.simulate,
                "sigma": args.sigma if args.simulate else None, "task": args.task,
                "model": str(args.model.resolve()) if args.model else "embedded",
                "dtype": args.dtype,
                "task_options": dataclasses.asdict(task_options(args))}
    return settings_fingerprint(settings)


def _done(job: Job, out: Path, fingerprint: str) -> bool:
    record_path = out / f"{job.item.name}.json"
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False  # not ours / unreadable: recompute (atomic writes never leave half a file)
    if record.get("fingerprint") != fingerprint:
        raise P2LError(f"{record_path}: holds a result of different settings; use another "
                       "--output or remove it")
    return record.get("status") != "ok" or (out / f"{job.item.name}.png").is_file()


def _grid_row(y: np.ndarray, restored: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    h, w = restored.shape[:2]
    if y.shape[:2] != (h, w):  # e.g. super-resolution: nearest-neighbour up to the image size
        y = np.repeat(np.repeat(y, h // y.shape[0], axis=0), w // y.shape[1], axis=1)
    panels = [y, restored] + ([truth] if truth is not None else [])
    return np.concatenate(panels, axis=1)


class Progress:
    """A plain-stderr bar over images with elapsed time and ETA (no dependencies)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.start = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        filled = int(30 * self.done / max(self.total, 1))
        self.stream.write(f"restore [{'#' * filled}{'.' * (30 - filled)}] {self.done}/"
                          f"{self.total} images  {elapsed:6.1f}s elapsed  ETA {eta:6.1f}s\n")
        self.stream.flush()


def _write_summary(out: Path, jobs: list[Job], fingerprint: str) -> dict:
    rows = []
    for job in jobs:
        path = out / f"{job.item.name}.json"
        rec = imageio.read_json(path) if path.is_file() else {"status": "missing"}
        m = rec.get("metrics") or {}
        rows.append({"identity": job.item.identity, "status": rec.get("status"),
                     "output": f"{job.item.name}.png" if rec.get("status") == "ok" else None,
                     "psnr": m.get("psnr"), "ssim": m.get("ssim"), "lpips": m.get("lpips"),
                     "residual_final": rec.get("residual_final"),
                     "seconds": (rec.get("timing") or {}).get("seconds_per_image")})

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    summary = {"fingerprint": fingerprint, "images": len(rows),
               "ok": sum(r["status"] == "ok" for r in rows),
               "failed": [r["identity"] for r in rows if r["status"] != "ok"],
               "mean": {k: mean(k) for k in ("psnr", "ssim", "lpips", "residual_final",
                                             "seconds")},
               "per_image": rows}
    write_record(out / "summary.json", summary)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    imageio.write_text(out / "summary.csv", buf.getvalue())
    return summary


# --------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from p2l_jax import parallel

    _check_options(args)
    items = collect_inputs(args.input)
    output_folder.check_targets(args.output, [f"{i.name}{s}" for i in items
                                              for s in (".png", ".json")]
                                + ["summary.json", "summary.csv"], [i.path for i in items])
    all_jobs = plan_jobs(items, args)
    config = solver_config(args)
    args.steps = config.num_steps  # --steps default: the solver config's
    created = output_folder.prepare(args.output)
    try:
        parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
        process = parallel.process_index() if parallel.process_count() > 1 else None
        with output_folder.OutputLock(args.output, process):
            return _restore_all(args, all_jobs, config)
    except BaseException:
        if created:  # an error before anything was written leaves no empty folder behind
            with contextlib.suppress(OSError):
                args.output.rmdir()
        raise


def _restore_all(args, all_jobs: list[Job], config) -> int:
    from p2l_jax import parallel
    from p2l_jax.pipeline import P2LPipeline

    pipe = P2LPipeline.from_pretrained(args.model, args.dtype, parallel=args.parallel,
                                       allow_pickle=args.allow_pickle)
    for job in all_jobs:
        pipe.check_size(job.image_size, str(job.item.path))
    fingerprint = _fingerprint(args, config)
    jobs = parallel.my_share(all_jobs)
    parallel.clear_marker(str(args.output), "restore-done")
    pending = [j for j in jobs if not _done(j, args.output, fingerprint)]
    for job in pending:  # temp files of a killed run (only this process's own images)
        for stale in args.output.glob(f".{glob.escape(job.item.name)}.*.tmp"):
            stale.unlink()
    print(f"restore: {len(all_jobs)} images, {len(jobs)} in this process, "
          f"{len(jobs) - len(pending)} already done, {len(pending)} to run on "
          f"{pipe.num_devices} device(s)", file=sys.stderr)
    args.batch_size = args.batch_size or pipe.num_devices
    groups: dict = {}
    for job in pending:
        key = (json.dumps(job.operator.to_dict(), sort_keys=True), job.image_size,
               job.truth is not None)
        groups.setdefault(key, []).append(job)
    progress = Progress(len(pending))
    failed = 0
    for group in groups.values():
        for start in range(0, len(group), args.batch_size):
            batch = group[start:start + args.batch_size]
            failed += _run_batch(batch, args, pipe, config, fingerprint)
            progress.update(len(batch))
    if parallel.process_count() == 1:  # every batch is written: what is left there is stale
        shutil.rmtree(args.output / ".inflight", ignore_errors=True)
    gathered = parallel.gather_via_files(str(args.output), "restore-done", {"failed": failed})
    if gathered is not None:
        summary = _write_summary(args.output, all_jobs, fingerprint)
        print(f"restore: {summary['ok']}/{summary['images']} ok -> {args.output}/summary.json",
              file=sys.stderr)
        failed = sum(g["failed"] for g in gathered)
    return 1 if failed else 0


def _json_safe(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_record(path: Path, record: dict) -> None:
    """Write a record or summary as strict JSON; NaN/inf (a diverged sample, an infinite
    PSNR) become ``null`` instead of failing the run after its work is done."""
    imageio.write_json(path, _json_safe(record))


def progress_every(args) -> int:
    """``--progress-every``, or its automatic value: steps // 10 from 100 steps on, else 0."""
    if args.progress_every is not None:
        return args.progress_every
    return args.steps // 10 if args.steps >= 100 else 0


def chunking(args, ids: list[str]) -> dict:
    """The pipeline's chunk options for one batch from ``--progress-every`` and
    ``--checkpoint-every`` (empty: one scan)."""
    every, save = progress_every(args), args.checkpoint_every
    if not every and not save:
        return {}
    started = time.monotonic()

    label = ids[0] if len(ids) == 1 else f"{ids[0]} (+{len(ids) - 1})"

    def report(done: int, total: int) -> None:
        if every and (done % every == 0 or done == total):
            print(f"restore: {label}: step {done}/{total}  {time.monotonic() - started:6.1f}s",
                  file=sys.stderr, flush=True)

    options = {"chunk_steps": math.gcd(every, save or 0), "on_chunk": report}
    if save:
        options.update(checkpoint=inflight_dir(args.output, ids), checkpoint_every=save)
    return options


def inflight_dir(out: Path, ids: list[str]) -> Path:
    """``OUTPUT/.inflight/<batch id>``: the batch id hashes the batch's identities."""
    return out / ".inflight" / digest(["\0".join(ids).encode()])


def _drop_inflight(out: Path, ids: list[str]) -> None:
    folder = inflight_dir(out, ids)
    if folder.exists():
        shutil.rmtree(folder)
        try:
            folder.parent.rmdir()
        except OSError:
            pass  # another batch's (or process's) checkpoint is still there


def _run_batch(batch: list[Job], args, pipe, config, fingerprint: str) -> int:
    from p2l_jax import parallel

    data = np.stack([j.data for j in batch])
    ids = [j.item.identity for j in batch]
    op = batch[0].operator
    chunks = chunking(args, ids)
    if args.simulate:
        result = pipe(images=data, operator=op, config=config, seed=args.seed, identities=ids,
                      sigma=args.sigma, pad_to=args.batch_size, **chunks)
        truths = data
    else:
        result = pipe(measurements=data, operator=op, config=config, seed=args.seed,
                      identities=ids, image_size=batch[0].image_size,
                      pad_to=args.batch_size, **chunks)
        truths = None
        if all(j.truth is not None for j in batch):
            truths = np.stack([imageio.read_image(j.truth)[0] for j in batch])
            if truths.shape != result.images.shape:
                truths = None
    quality = None
    if truths is not None and not args.simulate:
        from p2l_jax.metrics import image_metrics

        quality = image_metrics(result.images, truths, pipe.lpips_net)
    failed = 0
    for i, job in enumerate(batch):
        record = dict(result.records[i], fingerprint=fingerprint, input=str(job.item.path),
                      process=parallel.process_index(), process_count=parallel.process_count(),
                      input_info=job.info, simulate=args.simulate, task=args.task,
                      ground_truth=str(job.truth) if truths is not None else None)
        if quality is not None and record["status"] == "ok":
            record["metrics"] = {k: v[i] for k, v in quality.items()}
        png, rec = args.output / f"{job.item.name}.png", args.output / f"{job.item.name}.json"
        if record["status"] == "ok":
            imageio.write_png(png, result.images[i])
            if args.grid:
                (args.output / "grid").mkdir(exist_ok=True)
                imageio.write_png(args.output / "grid" / f"{job.item.name}.png", _grid_row(
                    result.measurements[i], result.images[i],
                    None if truths is None else truths[i]))
            record["output"] = png.name
        else:
            failed += 1
            print(f"restore: {job.item.path}: sampling produced NaN/inf; no image written "
                  f"(see {rec})", file=sys.stderr)
        write_record(rec, record)
    _drop_inflight(args.output, ids)
    return failed
