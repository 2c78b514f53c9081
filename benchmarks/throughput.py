"""Throughput of the compiled solver, side by side with the PyTorch reference step.

    python -m benchmarks.throughput --model sd15 --resolution 128 --steps 3 --dtype bfloat16
    python -m p2l_jax bench ...            (the same options, from the repository root)

For one configuration (model, resolution, batch, steps, solver, gradient variant, dtype,
attention implementation, remat, convolution form) it measures, in one process:

* ``compile_s``: lowering + XLA compilation of the whole solve (one ``lax.scan`` program);
  ``compile_s_no_projection`` the same with ``projection="none"`` (solvers that project);
  with ``--compilation-cache DIR`` and ``--second-process``, the solve's compile in a fresh
  process that reads the persistent cache (``compile_s_second_process``);
* ``solve_time_s`` (median), ``time_per_image_s``, ``images_per_s`` of the fused solve;
* ``solve_step_time_s``: the real per-step time inside the solve's scan,
  (solve time - one decode) / steps, with the configured projection, and
  ``solve_step_time_no_projection_s`` the same for the solve with ``projection="none"``;
* ``step_time_s``: one solver step compiled alone, at the first timestep without projection;
  ``dispatch_time_s`` = steps x step_time_s, the unfused alternative;
* FLOPs per step: XLA's cost analysis of the compiled step (which counts the projection
  branch of its ``lax.cond``) and the analytic count of :mod:`benchmarks.flops`, with their
  ratio; ``achieved_flops_per_s`` = analytic step FLOPs / step_time_s and ``utilization``
  against ``matmul_peak`` (a large matmul in the same dtype, timed in this run);
* ``peak_memory`` (device peak, or the process RSS high-water mark on CPU, read after the
  JAX programs ran and before torch is loaded) and XLA's planned buffers of the solve and of
  the step (``xla_memory``, ``xla_memory_step``); ``torch_side["peak_memory"]`` the same
  read after the torch steps (of the torch process with ``--torch-process``, else of the
  whole process: JAX and torch together);
* ``torch``: the reference P2L step (benchmarks/torch_reference.py) on the same weights and batch,
  without and (solvers that project) with projection, eager and torch.compile;
  ``jax_over_torch`` = JAX isolated step / torch step and ``jax_over_torch_solve`` = JAX
  per-step time inside the solve / torch step, without and with projection (< 1: JAX faster).

All JAX programs and torch steps are timed interleaved, round robin (``--repeats`` rounds,
:func:`benchmarks.measure.interleaved_times`), so load from other processes hits both sides
alike; the load average is recorded at the start and the end (``device.load_average``,
``load_average_end``). ``--torch-process`` times the torch steps first, in a child process
(the same command line with the hidden ``--torch-side FILE``, :func:`torch_side_main`) that
rebuilds the same model and inputs from the same seed, then the JAX side in this one: a run's
peak memory is then the larger side's, not their sum (SD 1.5 at 256 px on a small host). The
two sides are then not interleaved, so a change of load between them moves the ratios; the
child's load averages and input fingerprint (shapes and sums of mask, y, z and the prompt
embedding, checked equal to this process's) are in ``torch_side``. ``--conv xla`` measures
the plain ``lax.conv_general_dilated`` form (what the networks ran before the CPU form of
:mod:`p2l_jax.models.conv`), ``--conv auto`` (default) what the package picks. The JAX
programs compile through :func:`p2l_jax.jit.jit`, as the package's do; the record keeps the
XLA options that gave (``compiler_options``: on the CPU, convolutions kept out of YNNPACK)
and the environment's ``XLA_FLAGS`` (``xla_flags``).

It prints a markdown row (:func:`markdown_row`) and writes the JSON record (``--json``).
The measurement y is an inpainting of random images (``--task``, default ``inpaint-random``),
the operator the PyTorch reference implements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = ("tiny", "sd15", "sd21")
SOLVER_NAMES = ("p2l", "ldps", "gml-dps", "psld")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration; ``model`` is ``embedded``, an architecture name of
    :data:`p2l_jax.random_model.ARCHITECTURES` (random weights) or a model directory."""

    model: str = "tiny"
    resolution: int | None = None  # pixels; None: the model's native size
    batch: int = 1
    steps: int = 3
    solver: str = "p2l"
    gradient: str = "full"
    dtype: str = "float32"
    attention: str = "einsum"
    remat: bool = False
    task: str = "inpaint-random"
    repeats: int = 3
    torch_modes: tuple[str, ...] = ("eager", "compile")
    compilation_cache: str | None = None
    second_process: bool = False
    compile_only: bool = False
    seed: int = 0
    conv: str = "auto"
    torch_process: bool = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--model", default=d.model,
                   help=f"embedded, {', '.join(ARCHS)} (random weights) or a model directory")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--solver", default=d.solver, choices=SOLVER_NAMES)
    p.add_argument("--gradient", default=d.gradient, help="full, no_unet_jacobian or joint")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"))
    p.add_argument("--attention", default=d.attention, help="einsum, xla or cudnn")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--task", default=d.task, help="inpaint-random | inpaint-box (torch needs "
                                                   "an inpainting task)")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--torch", default=",".join(d.torch_modes),
                   help="comma list of eager,compile, or none (%(default)s)")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache (jax_compilation_cache_dir)")
    p.add_argument("--second-process", action="store_true",
                   help="also time the compile in a fresh process using the cache")
    p.add_argument("--compile-only", action="store_true",
                   help="only compile the solve; print its compile_s and XLA's planned memory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--conv", default=d.conv, choices=("auto", "xla", "cpu"),
                   help="convolution form (P2L_JAX_CONV, p2l_jax.models.conv): auto, xla "
                        "(plain lax.conv_general_dilated) or cpu (%(default)s)")
    p.add_argument("--torch-process", action="store_true",
                   help="time the torch steps in a separate process, before the JAX side, so "
                        "a run's peak memory is the larger side's, not their sum")
    p.add_argument("--torch-side", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="write the JSON record here")
    p.add_argument("--markdown", type=Path, default=None, help="append the markdown row here")


def config_from_args(args) -> BenchConfig:
    modes = tuple(m for m in args.torch.split(",") if m and m != "none")
    return BenchConfig(model=args.model, resolution=args.resolution, batch=args.batch,
                       steps=args.steps, solver=args.solver, gradient=args.gradient,
                       dtype=args.dtype, attention=args.attention, remat=args.remat,
                       task=args.task, repeats=args.repeats, torch_modes=modes,
                       compilation_cache=args.compilation_cache,
                       second_process=args.second_process, compile_only=args.compile_only,
                       seed=args.seed, conv=args.conv, torch_process=args.torch_process)


def enable_compilation_cache(directory: str) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def build_model(cfg: BenchConfig):
    """(model, config dicts for the torch side)."""
    from p2l_jax.model import embedded_model_dir, load_model
    from p2l_jax.random_model import ARCHITECTURES, random_model

    if cfg.model in ARCHITECTURES:
        return (random_model(cfg.model, cfg.dtype, cfg.attention, cfg.seed),
                ARCHITECTURES[cfg.model])
    path = embedded_model_dir() if cfg.model == "embedded" else Path(cfg.model)
    model = load_model(None if cfg.model == "embedded" else path, cfg.dtype,
                       attention=cfg.attention)
    dicts = {n: json.loads((path / n / "config.json").read_text()) for n in ("unet", "vae")}
    dicts["scheduler"] = model.scheduler_config
    return model, dicts


def solver_config(cfg: BenchConfig):
    from p2l_jax.solvers import BY_NAME

    return BY_NAME[cfg.solver].config(num_steps=cfg.steps, gradient=cfg.gradient, remat=cfg.remat)


def problem_inputs(cfg: BenchConfig, model) -> dict:
    """The inputs both sides run on, all from ``cfg.seed``: solver ``config``, operator ``op``,
    measurement ``y``, per-sample ``keys``, prompt embedding ``C0``, ``latent_shape`` and the
    latent ``z`` of the torch step. A torch side in its own process rebuilds them from the
    same configuration (:func:`torch_side_main`), so they are equal there too."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from p2l_jax.operators import make_operator
    from p2l_jax.solvers import per_sample_keys

    side = cfg.resolution or model.image_size
    f = model.vae_scale_factor
    if side % f:
        raise SystemExit(f"--resolution {side} must be a multiple of {f}")
    config = solver_config(cfg)
    op = make_operator(cfg.task, (side, side))
    rng = np.random.default_rng(cfg.seed)
    x = rng.uniform(-1, 1, (cfg.batch, side, side, 3)).astype(np.float32)
    y = jax.jit(lambda op, x, k: op.measure(x, k, 0.05))(op, x, jax.random.key(cfg.seed))
    latent_shape = (side // f, side // f, model.latent_channels)
    z = jax.random.normal(jax.random.key(cfg.seed), (cfg.batch, *latent_shape), jnp.float32)
    return {"config": config, "op": op, "y": y, "C0": model.text_embeddings([config.prompt]),
            "keys": per_sample_keys(jax.random.key(cfg.seed), cfg.batch),
            "latent_shape": latent_shape, "z": z}


def input_fingerprint(inputs: dict) -> dict:
    """``{name: [shape, sum]}`` of the arrays the torch step reads: equal fingerprints in the
    JAX process and the torch process show that both timed the same problem."""
    import numpy as np

    arrays = {"mask": inputs["op"].mask, "y": inputs["y"], "z": inputs["z"], "C0": inputs["C0"]}
    return {k: [list(np.shape(a)), float(np.asarray(a, np.float64).sum())]
            for k, a in arrays.items()}


_T0 = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr (a large model on a CPU takes minutes per phase)."""
    print(f"[bench {time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def _lower_compile(fn, *args, **static):
    start = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    return compiled, time.perf_counter() - start


def run_jax(cfg: BenchConfig, model) -> tuple[dict, dict, dict]:
    """The JAX programs: (record fields, {name: timed call}, arrays the torch side reuses).
    Compiles the solve (as configured and without projection), one step and a decode, and
    calls each once, so ``peak_memory`` covers them."""
    import jax
    import jax.numpy as jnp

    from benchmarks import flops as flopcount
    from benchmarks.measure import block, peak_memory
    from p2l_jax.jit import jit
    from p2l_jax.solvers import split
    from p2l_jax.solvers.program import initial_state, make_problem, solve_prepared, step_inputs
    from p2l_jax.solvers.registry import solver_of

    arrays = problem_inputs(cfg, model)
    config, op, y, keys, C0 = (arrays[k] for k in ("config", "op", "y", "keys", "C0"))
    latent_shape = arrays["latent_shape"]
    structure, settings = split(config)
    log("compiling the solve")
    solve, compile_s = _lower_compile(solve_prepared, model, op, y, keys, C0, None, settings,
                                      structure=structure, latent_shape=latent_shape)
    out = {"compile_s": compile_s, "projection": getattr(config, "projection", "none"),
           "xla_memory": _xla_memory(solve.memory_analysis())}
    if cfg.compile_only:
        return out, {}, {}
    calls = {"jax_solve": lambda: solve(model, op, y, keys, C0, None, settings)}
    projects = getattr(config, "projection", "none") != "none"
    out["compile_s_no_projection"] = None
    if projects:
        log(f"compiled in {compile_s:.1f} s; compiling the solve without projection")
        plain, plain_settings = split(dataclasses.replace(config, projection="none"))
        solve_np, out["compile_s_no_projection"] = _lower_compile(
            solve_prepared, model, op, y, keys, C0, None, plain_settings, structure=plain,
            latent_shape=latent_shape)
        calls["jax_solve_no_projection"] = lambda: solve_np(model, op, y, keys, C0, None,
                                                            plain_settings)

    def init(model, op, y, keys, C0, settings):
        problem = make_problem(model, op, y, keys, structure, settings)
        return initial_state(problem, C0, latent_shape)

    def step(model, op, y, keys, settings, state, inp):
        problem = make_problem(model, op, y, keys, structure, settings)
        return solver_of(type(config)).step(problem, state, inp)

    state = jax.jit(init)(model, op, y, keys, C0, settings)
    inputs = step_inputs(model, structure, settings, 1)
    inp = jax.tree_util.tree_map(lambda a: a[0], inputs)
    inp = inp._replace(project=jnp.asarray(False))
    log("compiling one step")
    step_c, step_compile_s = _lower_compile(jit(step), model, op, y, keys, settings, state,
                                            inp)
    calls["jax_step"] = lambda: step_c(model, op, y, keys, settings, state, inp)
    decode = jit(lambda m, z: m.decode(z)).lower(model, state.z).compile()
    calls["jax_decode"] = lambda: decode(model, state.z)
    log("first calls")
    for call in calls.values():
        block(call())
    xla_step = float(step_c.cost_analysis().get("flops", float("nan")))
    forwards = flopcount.network_forwards(model, cfg.batch, latent_shape[:2])
    analytic = flopcount.step_flops(forwards, config)
    analytic["step_program"] = analytic["step"] + analytic["projection"]
    analytic["forward"] = {k: v.total for k, v in forwards.items()}
    n_proj = int(jnp.sum(inputs.project))
    out.update({
        "step_compile_s": step_compile_s, "peak_memory": peak_memory(),
        "flops_per_step_xla": xla_step, "flops_per_step_analytic": analytic,
        "xla_over_analytic": xla_step / analytic["step_program"],
        "solve_flops": (cfg.steps * analytic["step"] + n_proj * analytic["projection"]
                        + forwards["decoder"].total),
        "xla_memory_step": _xla_memory(step_c.memory_analysis()),
    })
    return out, calls, arrays


def _xla_memory(mem) -> dict:
    return {"argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes)}


def timing_fields(cfg: BenchConfig, times: dict, out: dict) -> dict:
    """Record fields from :func:`benchmarks.measure.interleaved_times` of the JAX calls."""
    med = lambda name: times[name]["median_s"] if name in times else None
    samples = lambda name: times[name]["samples_s"] if name in times else None
    solve_s, step_s, decode_s = med("jax_solve"), med("jax_step"), med("jax_decode")
    per_step = lambda total: (total - decode_s) / cfg.steps
    # a solver that never projects: its solve is the solve without projection
    no_proj_s = med("jax_solve_no_projection") or solve_s
    return {
        "solve_time_s": solve_s, "solve_samples_s": samples("jax_solve"),
        "time_per_image_s": solve_s / cfg.batch, "images_per_s": cfg.batch / solve_s,
        "solve_step_time_s": per_step(solve_s),
        "solve_no_projection_time_s": no_proj_s,
        "solve_step_time_no_projection_s": per_step(no_proj_s),
        "decode_time_s": decode_s,
        "step_time_s": step_s, "step_samples_s": samples("jax_step"),
        "dispatch_time_s": cfg.steps * step_s,
        "achieved_flops_per_s": out["flops_per_step_analytic"]["step"] / step_s,
        "achieved_flops_per_s_solve": out["solve_flops"] / solve_s,
    }


def _argv(cfg: BenchConfig, *flags: str) -> list[str]:
    """This benchmark's command line for ``cfg``'s problem (model, shapes, solver, dtype,
    task, seed, ...), plus ``flags``: what a child process runs."""
    argv = [sys.executable, "-m", "benchmarks.throughput",
            "--model", cfg.model, "--batch", str(cfg.batch), "--steps", str(cfg.steps),
            "--solver", cfg.solver, "--gradient", cfg.gradient, "--dtype", cfg.dtype,
            "--attention", cfg.attention, "--task", cfg.task, "--seed", str(cfg.seed),
            "--conv", cfg.conv, "--repeats", str(cfg.repeats), *flags]
    argv += ["--resolution", str(cfg.resolution)] if cfg.resolution else []
    return argv + (["--remat"] if cfg.remat else [])


_ROOT = Path(__file__).resolve().parents[1]


def _second_process_compile(cfg: BenchConfig) -> float | None:
    """compile_s of the same configuration in a fresh interpreter (reads the cache)."""
    argv = _argv(cfg, "--compile-only", "--torch", "none",
                 "--compilation-cache", str(cfg.compilation_cache))
    proc = subprocess.run(argv, cwd=_ROOT, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["compile_s"]


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "host": platform.node(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "jax_version": jax.__version__}


def torch_calls(cfg: BenchConfig, model, dicts: dict, inputs: dict) -> dict:
    """``{("torch", mode, projected): step()}`` for :func:`benchmarks.measure.interleaved_times`:
    the reference step of each mode in ``cfg.torch_modes`` on :func:`problem_inputs`."""
    from benchmarks.torch_baseline import torch_step_fns

    log(f"torch reference step: {', '.join(cfg.torch_modes)}")
    fns = torch_step_fns(model, dicts, inputs["config"], inputs["op"].mask, inputs["y"],
                         inputs["z"], inputs["C0"], dtype=cfg.dtype, modes=cfg.torch_modes)
    return {("torch", mode, projected): fn for (mode, projected), fn in fns.items()}


def torch_side_main(cfg: BenchConfig, path: Path) -> None:
    """The torch side alone (``--torch-process``'s child): build the model and the inputs as
    the JAX side does, time the torch steps interleaved among themselves, and write to
    ``path`` their times, this process's peak memory, load averages and input fingerprint."""
    from benchmarks.measure import interleaved_times, peak_memory
    from p2l_jax.imageio import write_text

    start, load = time.perf_counter(), list(os.getloadavg())
    model, dicts = build_model(cfg)
    inputs = problem_inputs(cfg, model)
    times = interleaved_times(torch_calls(cfg, model, dicts, inputs), cfg.repeats)
    side = {"process": "subprocess", "peak_memory": peak_memory(), "load_average": load,
            "load_average_end": list(os.getloadavg()), "wall_s": time.perf_counter() - start,
            "inputs": input_fingerprint(inputs),
            "times": [{"mode": mode, "projected": projected, **t}
                      for (_, mode, projected), t in times.items()]}
    write_text(path, json.dumps(side, indent=2))


def torch_subprocess(cfg: BenchConfig, directory: Path) -> tuple[dict, dict]:
    """(torch times keyed as :func:`torch_calls`, the ``torch_side`` record) from
    :func:`torch_side_main` in a child process; its progress goes to this stderr.
    Raises P2LError (one line) if the child fails."""
    from p2l_jax.errors import P2LError

    path = directory / "torch_side.json"
    argv = _argv(cfg, "--torch", ",".join(cfg.torch_modes), "--torch-side", str(path))
    log("torch reference step in a separate process")
    proc = subprocess.Popen(argv, cwd=_ROOT, stderr=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stderr:
        sys.stderr.write(line)
        last = line.strip() or last
    code = proc.wait()
    if code or not path.exists():
        why = (f"killed by signal {-code}{' (out of memory?)' if code == -9 else ''}"
               if code < 0 else f"exit status {code}")
        raise P2LError(f"--torch-process: the torch side ({' '.join(argv[1:])}) failed, "
                       f"{why}: {last or 'no output'}")
    side = json.loads(path.read_text())
    times = {("torch", t.pop("mode"), t.pop("projected")): t for t in side.pop("times")}
    return times, side


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run one configuration and return its JSON record (see the module docstring)."""
    from benchmarks.measure import conv_form

    with conv_form(cfg.conv):
        return _run_benchmark(cfg)


def _run_benchmark(cfg: BenchConfig) -> dict:
    import jax
    import numpy as np

    from benchmarks.measure import interleaved_times, matmul_peak, peak_memory
    from p2l_jax.errors import P2LError
    from p2l_jax.jit import compiler_options

    if cfg.compilation_cache:
        enable_compilation_cache(cfg.compilation_cache)
    device = device_info()
    torch_times, torch_side = {}, None
    runs_torch = bool(cfg.torch_modes) and cfg.task.startswith("inpaint")
    if cfg.torch_process and runs_torch and not cfg.compile_only:
        # first, in its own process: its memory is returned before the JAX side starts
        with tempfile.TemporaryDirectory() as tmp:
            torch_times, torch_side = torch_subprocess(cfg, Path(tmp))
    start = time.perf_counter()
    log(f"building {cfg.model} ({cfg.dtype}, attention {cfg.attention}, conv {cfg.conv})")
    model, dicts = build_model(cfg)
    record = {"config": dataclasses.asdict(cfg), "device": device,
              "compiler_options": compiler_options(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "model_build_s": time.perf_counter() - start,
              "parameters": int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(
                  model.params)))}
    jax_fields, calls, arrays = run_jax(cfg, model)
    record.update(jax_fields)
    if cfg.compile_only:
        return record
    record["compile_s_second_process"] = (_second_process_compile(cfg)
                                          if cfg.second_process and cfg.compilation_cache
                                          else None)
    record["torch"], record["jax_over_torch"], record["jax_over_torch_solve"] = {}, {}, {}
    if cfg.torch_modes and not cfg.task.startswith("inpaint"):
        record["torch"] = {m: {"error": "the torch reference implements inpainting only"}
                           for m in cfg.torch_modes}
    elif torch_side is not None and torch_side["inputs"] != input_fingerprint(arrays):
        raise P2LError(f"--torch-process: the torch side timed other inputs than the JAX "
                       f"side: {torch_side['inputs']} against {input_fingerprint(arrays)}")
    elif cfg.torch_modes and torch_side is None:
        calls.update(torch_calls(cfg, model, dicts, arrays))
    log(f"timing {len(calls)} calls interleaved, {cfg.repeats} rounds")
    times = {**interleaved_times(calls, cfg.repeats), **torch_times}
    if runs_torch and torch_side is None:  # torch ran here: the whole process's high-water
        torch_side = {"process": "same", "peak_memory": peak_memory()}
    record["torch_side"] = torch_side
    record.update(timing_fields(cfg, times, record))
    record["load_average_end"] = list(os.getloadavg())
    for mode in cfg.torch_modes:
        if mode not in record["torch"]:  # else: the inpainting-only error
            torch_ratios(record, mode, times.get(("torch", mode, False), {}),
                         times.get(("torch", mode, True), {}))
    log("matmul peak")
    record["matmul_peak"] = matmul_peak(model.dtype)
    record["utilization"] = record["achieved_flops_per_s"] / record["matmul_peak"]["flops_per_s"]
    return record


def torch_ratios(record: dict, mode: str, plain: dict, projected: dict) -> None:
    """Fill ``record["torch"][mode]`` and the JAX / torch ratios from the interleaved times
    of the torch step without (``plain``) and with (``projected``) projection."""
    if "error" in plain:
        record["torch"][mode] = {"error": plain["error"]}
        return
    t = {"step_time_s": plain["median_s"], "samples_s": plain["samples_s"],
         "compile_s": max(plain["first_call_s"] - plain["median_s"], 0.0),
         "step_time_projection_s": projected.get("median_s")}
    record["torch"][mode] = t
    record["jax_over_torch"][mode] = record["step_time_s"] / t["step_time_s"]
    record["jax_over_torch_solve"][mode] = {
        "no_projection": record["solve_step_time_no_projection_s"] / t["step_time_s"],
        "projection": (None if t["step_time_projection_s"] is None
                       else record["solve_step_time_s"] / t["step_time_projection_s"])}


#: Top-level keys of every full record (``--compile-only`` records stop after ``compile_s``
#: and ``xla_memory``: the solve's planned memory, nothing run).
RECORD_FIELDS = (
    "config", "device", "model_build_s", "parameters", "compile_s", "projection",
    "compile_s_no_projection", "compile_s_second_process",
    "solve_time_s", "solve_samples_s", "time_per_image_s", "images_per_s", "solve_step_time_s",
    "solve_no_projection_time_s", "solve_step_time_no_projection_s", "decode_time_s",
    "step_compile_s", "step_time_s", "step_samples_s", "dispatch_time_s", "flops_per_step_xla",
    "flops_per_step_analytic", "xla_over_analytic", "achieved_flops_per_s",
    "achieved_flops_per_s_solve", "peak_memory", "xla_memory", "xla_memory_step",
    "matmul_peak", "utilization", "torch", "jax_over_torch", "jax_over_torch_solve",
    "torch_side", "load_average_end")

MARKDOWN_HEADER = ("| model | px | steps | solver / gradient | dtype | conv | compile s "
                   "| step s | solve step s (no proj / proj) | torch eager step s (no proj / "
                   "proj) | JAX / eager: step | JAX / eager: solve step (no proj / proj) "
                   "| JAX / compile: step | s / image | GFLOP/step (XLA / analytic) | util. "
                   "| peak mem GiB (JAX / torch process) | XLA temp GiB (solve) | load avg |\n"
                   + "|---" * 19 + "|")


def markdown_row(r: dict) -> str:
    """One table row of a record (columns of :data:`MARKDOWN_HEADER`; n/a where absent)."""
    c, t = r["config"], r.get("torch", {})
    fmt = lambda v, spec=".3g": "n/a" if v is None else format(v, spec)
    pair = lambda a, b, spec=".3g": f"{fmt(a, spec)} / {fmt(b, spec)}"
    eager = t.get("eager", {})
    solve_ratio = r.get("jax_over_torch_solve", {}).get("eager", {})
    px = c["resolution"] or "native"
    a = r["flops_per_step_analytic"]
    load = r["device"]["load_average"][0], r.get("load_average_end", [None])[0]
    batch = f" x{c['batch']}" if c["batch"] != 1 else ""
    proj = r["solve_step_time_s"] if r.get("projection", "none") != "none" else None
    side = r.get("torch_side") or {}
    peak = fmt(r["peak_memory"]["bytes"] / 2**30)
    if side.get("process") == "subprocess":
        peak += f" / {fmt(side['peak_memory']['bytes'] / 2**30)}"
    return (f"| {c['model']}{batch} | {px} | {c['steps']} | {c['solver']} / {c['gradient']} "
            f"| {c['dtype']} | {c.get('conv', 'xla')} | {fmt(r['compile_s'])} "
            f"| {fmt(r['step_time_s'])} "
            f"| {pair(r['solve_step_time_no_projection_s'], proj)} "
            f"| {pair(eager.get('step_time_s'), eager.get('step_time_projection_s'))} "
            f"| {fmt(r.get('jax_over_torch', {}).get('eager'), '.2f')} "
            f"| {pair(solve_ratio.get('no_projection'), solve_ratio.get('projection'), '.2f')} "
            f"| {fmt(r.get('jax_over_torch', {}).get('compile'), '.2f')} "
            f"| {fmt(r['time_per_image_s'])} | {fmt(r['flops_per_step_xla'] / 1e9)} / "
            f"{fmt(a['step_program'] / 1e9)} | {fmt(100 * r['utilization'], '.1f')}% "
            f"| {peak} "
            f"| {fmt(r['xla_memory']['temp_bytes'] / 2**30)} | {pair(*load, '.1f')} |")


def main(args) -> int:
    cfg = config_from_args(args)
    if args.torch_side:
        torch_side_main(cfg, args.torch_side)
        return 0
    record = run_benchmark(cfg)
    if cfg.compile_only:
        print(json.dumps({k: record[k] for k in ("compile_s", "xla_memory")}))
        return 0
    from p2l_jax.imageio import write_text  # jax is imported only once the flags are set

    row = markdown_row(record)
    print(MARKDOWN_HEADER)
    print(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(record, indent=2, default=str))
    if args.markdown:  # one more row: the file is rewritten whole, atomically
        old = (args.markdown.read_text(encoding="utf-8") if args.markdown.exists()
               else MARKDOWN_HEADER + "\n")
        write_text(args.markdown, old + row + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
