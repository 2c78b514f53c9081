"""Chunked, resumable sampling: the driver's timestep loop as jitted calls of ONE compiled
"advance k steps" program, with progress and an optional orbax checkpoint between chunks.

    result = solve(model, op, y, key, config, chunk_steps=25,
                   on_chunk=lambda done, n: print(done, n), checkpoint="run/.inflight")

The carry (:class:`Carry`) is the scan state (z, C, optimizer state, z0hat) plus the per-step
records so far. A run is ``start`` (z_T, C0, S0), ``ceil(N / k)`` calls of ``advance`` and
``finish`` (the decode). Chunk boundaries change nothing mathematically: step i sees the same
inputs and its DDIM noise comes from fold_in(key_b, 1 + i) whichever chunk runs it; results
equal the one-scan ``solve`` up to XLA's fusion-dependent rounding (tests: <= 1e-5).

Last chunk: when k does not divide N the per-step inputs are padded to ``ceil(N/k) k`` steps
and the padded steps are skipped by a ``lax.cond`` (their state passes through unchanged,
their records are NaN and cut off), so every chunk runs the same compiled program and no
padded step costs a network call. ``advance`` takes the chunk's first step as an array
argument, so the chunk index never recompiles.

Checkpoints (:class:`InflightStore`): after a chunk whose end is a multiple of
``checkpoint_every`` (and before the last), the carry's leaves are saved with an orbax
``CheckpointManager`` (atomic: written to a temporary folder, then renamed; one step kept)
next to a JSON ``meta`` holding the step and a fingerprint of (config, operator, y, keys,
embeddings, latent shape, k, model path and dtype). A rerun with the same fingerprint restores
the carry and runs only the remaining chunks; a checkpoint with another fingerprint is
ignored with a message and replaced as the run goes.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p2l_jax.errors import P2LError
from p2l_jax.solvers.common import State, StepInput
from p2l_jax.solvers.driver import (SolveResult, initial_state, make_problem, prepare,
                                    schedule_inputs)
from p2l_jax.solvers.registry import SOLVERS


class Carry(NamedTuple):
    """The in-flight sampler: the scan state and the (B, ceil(N/k) k) per-step records."""

    state: State
    residual: jax.Array
    prompt_loss: jax.Array


def padded_steps(num_steps: int, k: int) -> int:
    return -(-num_steps // k) * k


def padded_inputs(model, config, k: int) -> StepInput:
    """:func:`schedule_inputs` padded to a multiple of k steps: indices continue past N (the
    skip test), the other inputs repeat the last step's (finite values, never used)."""
    inputs = schedule_inputs(model, config)
    pad = padded_steps(config.num_steps, k) - config.num_steps
    padded = StepInput(*(np.concatenate([a, np.repeat(a[-1:], pad)]) for a in inputs))
    return padded._replace(index=np.arange(config.num_steps + pad, dtype=np.int32))


# ----------------------------------------------------------- traceable pieces of a run
def start_carry(model, operator, y, keys, C0, C_neg, config, latent_shape, k) -> Carry:
    """The carry before step 0 (call inside a jitted function)."""
    state = initial_state(make_problem(model, operator, y, keys, config, C_neg), C0,
                          latent_shape)
    nan = jnp.full((keys.shape[0], padded_steps(config.num_steps, k)), jnp.nan, jnp.float32)
    return Carry(state, nan, nan)


def advance_carry(model, operator, y, keys, C_neg, carry: Carry, start, config, k) -> Carry:
    """Steps start .. start + k - 1 of the driver's scan (those >= N skipped)."""
    problem = make_problem(model, operator, y, keys, config, C_neg)
    step = SOLVERS[type(config)]
    inputs = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(jnp.asarray(a),
                                                                           start, k),
                                    padded_inputs(model, config, k))

    def body(state, inp):
        run = lambda s: step(problem, s, inp)
        if config.num_steps % k == 0:
            return run(state)
        nan = lambda r: jnp.full(r.shape, jnp.nan, r.dtype)
        skip = lambda s: (s, jax.tree_util.tree_map(nan, jax.eval_shape(run, s)[1]))
        return jax.lax.cond(inp.index < config.num_steps, run, skip, state)

    state, records = jax.lax.scan(body, carry.state, inputs)
    put = lambda buf, r: jax.lax.dynamic_update_slice_in_dim(buf, r.T.astype(buf.dtype),
                                                             start, axis=1)
    return Carry(state, put(carry.residual, records.residual),
                 put(carry.prompt_loss, records.prompt_loss))


def finish_carry(model, carry: Carry, num_steps: int) -> SolveResult:
    """The driver's result from a finished carry: D(z0hat) and the first N records."""
    s = carry.state
    return SolveResult(model.decode(s.z0hat), s.z, s.C, carry.residual[:, :num_steps],
                       carry.prompt_loss[:, :num_steps])


_start = jax.jit(start_carry, static_argnames=("config", "latent_shape", "k"))
_advance = jax.jit(advance_carry, static_argnames=("config", "k"), donate_argnames=("carry",))
_finish = jax.jit(finish_carry, static_argnames=("num_steps",))
_PROGRAMS = (_start, _advance, _finish)


# ------------------------------------------------------------------------ checkpoints
def fingerprint(*parts) -> str:
    """SHA-256 (16 hex digits) of pytrees of arrays (shape, dtype, bytes; PRNG keys by their
    data) and other values (by ``repr``), in order."""
    h = hashlib.sha256()
    for part in parts:
        leaves, treedef = jax.tree_util.tree_flatten(part)
        h.update(str(treedef).encode())
        for leaf in leaves:
            if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
                if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                    leaf = jax.random.key_data(leaf)
                a = np.ascontiguousarray(np.asarray(leaf))
                h.update(f"{a.shape}{a.dtype}".encode() + a.tobytes())
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()[:16]


def run_fingerprint(model, operator, config, k, latent_shape, *arrays) -> str:
    """The fingerprint of one run: everything that determines its carry."""
    return fingerprint(repr(config), k, tuple(latent_shape), str(model.path), str(model.dtype),
                       operator, *arrays)


def _stderr(message: str) -> None:
    print(f"p2l-jax: {message}", file=sys.stderr, flush=True)


class InflightStore:
    """One run's in-flight checkpoint in ``directory`` (orbax; see the module docstring)."""

    def __init__(self, directory, key: str, log: Callable[[str], None] = _stderr):
        import orbax.checkpoint as ocp

        self.directory, self.key, self.log, self._ocp = Path(directory), key, log, ocp
        if self.directory.exists() and not self.directory.is_dir():
            raise P2LError(f"option checkpoint: {self.directory} exists and is not a folder")
        self.directory.mkdir(parents=True, exist_ok=True)
        me = jax.process_index()  # each process checkpoints its own batches, no barriers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=False, cleanup_tmp_directories=True,
            create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me},
                barrier_sync_key_prefix=f"p2l-inflight-{me}"))
        self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)

    def load(self, like: Carry) -> tuple[Carry, int] | None:
        """(carry, steps done) of a checkpoint of this run, else None (and a message when
        one of another run is there)."""
        ocp, step = self._ocp, self._manager.latest_step()
        if step is None:
            return None
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
            if meta.get("fingerprint") != self.key:
                self.log(f"{self.directory}: in-flight checkpoint of other settings (step "
                         f"{step}) ignored; starting from step 0")
                self.clear()
                return None
            leaves, treedef = jax.tree_util.tree_flatten(like)
            target = {f"{i:04d}": np.asarray(a) for i, a in enumerate(leaves)}
            saved = self._manager.restore(step, args=ocp.args.Composite(
                carry=ocp.args.StandardRestore(target)))["carry"]
        except (ValueError, KeyError, OSError, TypeError) as err:
            raise P2LError(f"{self.directory}: cannot read the in-flight checkpoint of step "
                           f"{step} ({type(err).__name__}); remove the folder") from None
        self.log(f"{self.directory}: resuming in-flight sampler state at step {step}")
        # placed like the fresh carry (sharding, committed or not): programs are reused
        placed = [jax.device_put(saved[name], a.sharding) if getattr(a, "committed", False)
                  else jnp.asarray(saved[name]) for name, a in zip(sorted(saved), leaves)]
        return jax.tree_util.tree_unflatten(treedef, placed), step

    def save(self, carry: Carry, step: int) -> None:
        ocp = self._ocp
        leaves = {f"{i:04d}": np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(carry))}
        self._manager.save(step, args=ocp.args.Composite(
            carry=ocp.args.StandardSave(leaves),
            meta=ocp.args.JsonSave({"fingerprint": self.key, "step": step})), force=True)
        self._manager.wait_until_finished()

    def clear(self) -> None:
        """Delete the saved steps (the run is finished or the checkpoint is not ours)."""
        for step in self._manager.all_steps():
            self._manager.delete(step)

    def close(self) -> None:
        self._manager.close()


# ------------------------------------------------------------------------- host loop
def run_chunks(start: Callable[[], Carry], advance: Callable[[Carry, jax.Array], Carry],
               finish: Callable[[Carry], SolveResult], *, num_steps: int, chunk_steps: int,
               on_chunk=None, store: InflightStore | None = None,
               checkpoint_every: int | None = None):
    """Drive ``advance`` over the steps in chunks of ``chunk_steps`` (from a checkpoint in
    ``store`` when there is one of this run), saving every ``checkpoint_every`` steps and
    calling ``on_chunk(steps_done, num_steps)`` after each chunk; return ``finish(carry)``."""
    carry, done = start(), 0
    if store is not None:
        restored = store.load(carry)
        if restored is not None:
            carry, done = restored
    every = checkpoint_every or chunk_steps
    while done < num_steps:
        carry = advance(carry, jnp.int32(done))
        done = min(done + chunk_steps, num_steps)
        if store is not None and done < num_steps and done % every == 0:
            store.save(carry, done)
        if on_chunk is not None:
            jax.block_until_ready(carry)
            on_chunk(done, num_steps)
    return finish(carry)


def check_chunking(num_steps: int, chunk_steps, checkpoint_every, names=("chunk_steps",
                                                                        "checkpoint_every")):
    """Validated (k, every): positive ints, every a multiple of k (P2LError naming them)."""
    for name, v in zip(names, (chunk_steps, checkpoint_every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v <= 0):
            raise P2LError(f"option {name}: expected a positive integer, got {v!r}")
    k = int(chunk_steps or checkpoint_every or 0)
    if not k:
        raise P2LError(f"option {names[0]}: needed for progress or checkpoints")
    if checkpoint_every is not None and checkpoint_every % k:
        raise P2LError(f"option {names[1]}: {checkpoint_every} is not a multiple of "
                       f"{names[0]} {k}")
    return min(k, num_steps), checkpoint_every


def solve_chunked(model, operator, y, key, config, chunk_steps, *, on_chunk=None,
                  checkpoint=None, checkpoint_every=None, latent_size=None, embedding=None,
                  negative_embedding=None) -> SolveResult:
    """``solve`` in chunks (see :func:`p2l_jax.solvers.solve` and the module docstring)."""
    p = prepare(model, operator, y, key, config, latent_size=latent_size, embedding=embedding,
                negative_embedding=negative_embedding)
    k, every = check_chunking(config.num_steps, chunk_steps, checkpoint_every)
    statics = dict(config=config, k=k)
    store = None
    if checkpoint is not None:
        store = InflightStore(checkpoint, run_fingerprint(model, operator, config, k,
                                                          p.latent_shape, p.y, p.keys, p.C0,
                                                          p.C_neg))
    try:
        result = run_chunks(
            lambda: _start(model, operator, p.y, p.keys, p.C0, p.C_neg,
                           latent_shape=p.latent_shape, **statics),
            lambda c, i: _advance(model, operator, p.y, p.keys, p.C_neg, c, i, **statics),
            lambda c: _finish(model, c, num_steps=config.num_steps),
            num_steps=config.num_steps, chunk_steps=k, on_chunk=on_chunk, store=store,
            checkpoint_every=every)
        if store is not None:  # finished: a rerun starts afresh
            store.clear()
        return result
    finally:
        if store is not None:
            store.close()


def compiled_programs() -> int:
    """How many chunked programs (start, advance, finish) this process has compiled."""
    return sum(f._cache_size() for f in _PROGRAMS)
