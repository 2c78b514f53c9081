"""The one runner: a solver run whole or in chunks, with progress, in-flight checkpoints
and resume. :func:`run` drives every run: ``p2l_jax.solvers.solve`` and the sharded
:class:`p2l_jax.pipeline.P2LPipeline` (hence the CLI) hand it their :class:`Programs`.

    result = solve(model, op, y, key, config, chunk_steps=25,
                   on_chunk=lambda done, n: print(done, n), checkpoint="run/.inflight")

Whole: one call of the one-scan program. Chunked: ``start`` (z_T, C0, S0), ``ceil(N / k)``
calls of ONE compiled "advance k steps" program (the chunk's first step is an array
argument), ``finish`` (the decode); the traceable pieces are in
:mod:`p2l_jax.solvers.program`. Chunk boundaries change nothing mathematically; results
equal the one-scan run up to XLA's fusion-dependent rounding (tests: <= 1e-5).

Checkpoints (:class:`InflightStore`): after a chunk whose end is a multiple of
``checkpoint_every`` (and before the last), the carry's leaves are saved with an orbax
``CheckpointManager`` (atomic: written to a temporary folder, then renamed; one step kept)
next to a JSON ``meta`` holding the step and a fingerprint
(:func:`p2l_jax.fingerprint.tree_fingerprint`) of the run's identity (config,
operator, y, keys, embeddings, latent shape, model path and dtype) and k. A rerun with the
same fingerprint restores the carry and runs only the remaining chunks; a checkpoint with
another fingerprint is ignored with a message and kept until this run saves its own (so a
rerun with other settings that dies before its first save loses no one's progress).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p2l_jax.errors import P2LError
from p2l_jax.fingerprint import tree_fingerprint
from p2l_jax.solvers.program import Carry


class Programs(NamedTuple):
    """How one run executes: ``whole()`` the one-scan program; ``start(k)``,
    ``advance(carry, first_step, k)`` and ``finish(carry)`` the chunked ones."""

    whole: Callable[[], Any]
    start: Callable[[int], Carry]
    advance: Callable[[Carry, jax.Array, int], Carry]
    finish: Callable[[Carry], Any]


# ------------------------------------------------------------------------ checkpoints
def run_identity(model, operator, config, latent_shape, *arrays) -> tuple:
    """What determines a run's carry (with k): hashed into its checkpoint's fingerprint."""
    return (repr(config), tuple(latent_shape), str(model.path), str(model.dtype), operator,
            *arrays)


def _stderr(message: str) -> None:
    print(f"p2l-jax: {message}", file=sys.stderr, flush=True)


class InflightStore:
    """One run's in-flight checkpoint in ``directory`` (orbax; see the module docstring)."""

    def __init__(self, directory, key: str, log: Callable[[str], None] = _stderr):
        import orbax.checkpoint as ocp  # heavy: only runs that checkpoint pay for it

        self.directory, self.key, self.log, self._ocp = Path(directory), key, log, ocp
        self._foreign = False  # a checkpoint of another run is there (deleted at our save)
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
                         f"{step}) ignored; starting from step 0 (it is replaced at this "
                         "run's first save)")
                self._foreign = True
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
        if self._foreign:  # only now is the other run's state replaced by ours
            self.clear()
            self._foreign = False
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


# ------------------------------------------------------------------------- the runner
def run(programs: Programs, num_steps: int, *, chunk_steps: int | None = None, on_chunk=None,
        checkpoint=None, checkpoint_every: int | None = None, identity: tuple = (),
        keep_checkpoint: bool = False):
    """Run ``programs`` whole (no chunking option given) or in chunks of ``chunk_steps``:
    from a checkpoint in the folder ``checkpoint`` when one of this run (``identity`` and k)
    is there, saving every ``checkpoint_every`` steps (default k), calling
    ``on_chunk(steps_done, num_steps)`` after each chunk. The finished run's checkpoint is
    deleted unless ``keep_checkpoint`` (a caller that deletes it once its outputs are safe)."""
    if chunk_steps is None and checkpoint is None and on_chunk is None:
        return programs.whole()
    k, every = check_chunking(num_steps, chunk_steps, checkpoint_every)
    store = (None if checkpoint is None
             else InflightStore(checkpoint, tree_fingerprint(k, *identity)))
    try:
        carry, done = programs.start(k), 0
        restored = store.load(carry) if store is not None else None
        if restored is not None:
            carry, done = restored
        every = every or k
        while done < num_steps:
            carry = programs.advance(carry, jnp.int32(done), k)
            done = min(done + k, num_steps)
            if store is not None and done < num_steps and done % every == 0:
                store.save(carry, done)
            if on_chunk is not None:
                jax.block_until_ready(carry)
                on_chunk(done, num_steps)
        result = programs.finish(carry)
        if store is not None and not keep_checkpoint:
            store.clear()
        return result
    finally:
        if store is not None:
            store.close()


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
