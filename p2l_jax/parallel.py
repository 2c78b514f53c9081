"""Devices and hosts: a 1-D ``data`` mesh, batch sharding, per-image keys, multi-host shares.

Restoring a batch is embarrassingly parallel: image ``i`` depends only on its own input and
its own key, never on another image. So a batch of ``B`` images is split along its leading
axis over ``n`` devices, each device runs the same per-shard batched function on ``B / n``
images, and the outputs are concatenated back. Everything else (model parameters, the
operator, the solver config) is replicated.

* Padding: when ``B mod n != 0`` the batch is padded with ``p = (-B) mod n`` copies of its last
  image, run, and the ``p`` padded outputs are dropped. Copies of a real image (not zeros)
  keep the padding numerically harmless (no division by an all-zero image).
* Keys: image ``i`` with identity string ``s_i`` (e.g. its file name relative to the input
  root) gets ``k_i = fold_in(PRNGKey(seed), h(s_i))`` where ``h`` is the first 32 bits of
  SHA-256 of ``s_i``. ``k_i`` does not depend on the image's position in the batch, the batch
  size, the device count or the process count, so neither does the result.
* Multi-host: under ``jax.distributed`` each process owns ``items[p::P]`` of the (identically
  ordered) input list and computes it on its own local devices; no cross-host collective is
  needed. Per-process summaries meet through files in a shared output directory
  (:func:`gather_via_files`).

Example::

    run = shard_batch(lambda b, w: {"y": b["x"] @ w}, mode="shard_map")
    out = run({"x": x}, w)          # x: (B, d) with any B; w replicated
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from p2l_jax.errors import P2LError
from p2l_jax.imageio import write_json
from p2l_jax.jit import jit

DATA_AXIS = "data"
MODES = ("shard_map", "pmap")
ENV_COORDINATOR = "P2L_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "P2L_NUM_PROCESSES"
ENV_PROCESS_ID = "P2L_PROCESS_ID"


# ----------------------------------------------------------------------------------- keys
#: How :func:`image_key` derives a key, as records state it.
IMAGE_KEY_DERIVATION = "fold_in(PRNGKey(seed), sha256(identity)[:4] LE)"


def identity_hash(identity: str) -> int:
    """``h(s)``: the first 32 bits (little endian) of SHA-256 of the UTF-8 identity string."""
    return int.from_bytes(hashlib.sha256(identity.encode("utf-8")).digest()[:4], "little")


def image_key(seed: int, identity: str) -> jax.Array:
    """``k = fold_in(PRNGKey(seed), h(identity))``: a raw uint32 key of shape (2,)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), np.uint32(identity_hash(identity)))


def image_keys(seed: int, identities: Sequence[str]) -> jax.Array:
    """Stacked :func:`image_key` for each identity: (B, 2) uint32."""
    if not identities:
        raise ValueError("image_keys needs at least one identity")
    return jnp.stack([image_key(seed, s) for s in identities])


def index_identities(indices) -> list[str]:
    """The identities of dataset items known by their index: ``str(i)`` (``"7"``), so item
    i's keys are ``image_key(seed, str(i))`` and its measurement noise ``noise_key(seed,
    str(i))``, wherever it lands (the benchmark harnesses' rule)."""
    return [str(int(i)) for i in np.asarray(indices).reshape(-1)]


# ----------------------------------------------------------------------------------- mesh
def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: this process's local devices).

    Local devices are the default because each process restores its own share of the inputs
    (see module docstring); pass ``jax.devices()`` for a mesh over every device of a pod.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


# --------------------------------------------------------------------- replicated pytrees
def _is_dynamic(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class _Static:
    """The non-array leaves of the replicated arguments plus their treedef, as a static
    (hashable) jit argument. Unhashable leaves compare by identity."""

    def __init__(self, treedef, leaves: tuple):
        self.treedef, self.leaves = treedef, leaves
        self._key = (treedef, tuple(self._leaf_key(x) for x in leaves))

    @staticmethod
    def _leaf_key(leaf):
        try:
            hash(leaf)
            return ("value", leaf)
        except TypeError:
            return ("id", id(leaf))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _split_shared(shared: tuple) -> tuple[list, _Static]:
    leaves, treedef = jax.tree.flatten(shared)
    dynamic = [x for x in leaves if _is_dynamic(x)]
    static = tuple(None if _is_dynamic(x) else x for x in leaves)
    return dynamic, _Static(treedef, static)


def _merge_shared(dynamic: list, static: _Static) -> tuple:
    it = iter(dynamic)
    leaves = [next(it) if x is None else x for x in static.leaves]
    return jax.tree.unflatten(static.treedef, leaves)


# ---------------------------------------------------------------------------- sharding
def _leading_size(batched) -> int:
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batched)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"batched leaves need one common leading batch axis, got {sizes}")
    return sizes.pop()


def pad_batch(batched, multiple: int):
    """Pad every leaf along axis 0 to a multiple of ``multiple`` with copies of its last row.

    Returns ``(padded, B)`` where ``B`` is the original size; ``padded[:B]`` is the input."""
    size = _leading_size(batched)
    pad = (-size) % multiple
    if pad == 0:
        return batched, size
    return jax.tree.map(
        lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0), batched), size


class ShardedBatchFn:
    """``fn(batched, *shared)`` run over all devices of a 1-D ``data`` mesh.

    ``batched`` is a pytree whose leaves share a leading batch axis ``B`` (any ``B >= 1``);
    ``shared`` are replicated pytrees (model, operator, config): their array leaves are jit
    arguments, their other leaves static. ``fn`` sees ``B_pad / n`` images per device and must
    return a pytree whose leaves all have that leading axis.

    The ``shard_map`` program compiles through :func:`p2l_jax.jit.jit` (the package's XLA:CPU
    options); ``pmap`` takes no compiler options, so that mode compiles with XLA's defaults.
    """

    def __init__(self, fn: Callable, mode: str = "shard_map",
                 devices: Sequence[jax.Device] | None = None):
        if mode not in MODES:
            raise P2LError(f"--parallel: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.fn, self.mode = fn, mode
        self.mesh = data_mesh(devices)
        self.devices = list(self.mesh.devices.flat)
        self.num_devices = len(self.devices)

        def per_shard(batched, dynamic, static):
            return fn(batched, *_merge_shared(dynamic, static))

        if mode == "shard_map":
            def run(batched, dynamic, static):
                return jax.shard_map(
                    lambda b, d: per_shard(b, d, static), mesh=self.mesh,
                    in_specs=(P(DATA_AXIS), P()), out_specs=P(DATA_AXIS),
                    check_vma=False)(batched, dynamic)

            self._compiled = jit(run, static_argnums=(2,))
        else:
            self._compiled = jax.pmap(per_shard, axis_name=DATA_AXIS, in_axes=(0, None),
                                      static_broadcasted_argnums=(2,), devices=self.devices)

    def compiled_programs(self) -> int:
        """How many programs this function has compiled (one per batch shape and statics)."""
        return self._compiled._cache_size()

    def __call__(self, batched, *shared, pad_to: int | None = None):
        """Run on ``batched`` (any B); ``pad_to`` pads small batches up to that size too, so
        a run whose last batch is short compiles nothing new."""
        size = _leading_size(batched)
        multiple = self.num_devices
        if pad_to is not None and pad_to > size:
            batched, _ = pad_batch(batched, pad_to)  # B -> pad_to
        padded, _ = pad_batch(batched, multiple)
        dynamic, static = _split_shared(shared)
        if self.mode == "shard_map":
            out = self._compiled(padded, dynamic, static)
        else:
            n = self.num_devices
            stacked = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]),
                                   padded)
            out = self._compiled(stacked, dynamic, static)
            out = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
        return jax.tree.map(lambda x: x[:size], out)


def map_batches(fn: Callable, batch_size: int, *arrays) -> tuple[Any, dict]:
    """``fn(*batch_arrays)`` over the rows of ``arrays`` in batches of ``batch_size``, the last
    one padded by repeating its final row, so every call has one shape: one compiled program.
    Returns the outputs (a pytree of numpy arrays with the leading axis cut back to the
    number of rows; padding dropped) and the timing: ``first_s`` (includes compilation),
    ``steady_s_per_item`` (later batches; None with a single batch), ``batches``,
    ``batch_size``."""
    n = len(arrays[0])
    outputs, times = [], []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)
        chunk = [np.concatenate([a[start:stop]] + [a[stop - 1:stop]] * pad) for a in arrays]
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*chunk))
        times.append(time.perf_counter() - t0)
        outputs.append(jax.tree_util.tree_map(lambda v: np.asarray(v)[:stop - start], out))
    merged = jax.tree_util.tree_map(lambda *vs: np.concatenate(vs), *outputs)
    steady = sum(times[1:]) / ((len(times) - 1) * batch_size) if len(times) > 1 else None
    return merged, {"first_s": times[0], "steady_s_per_item": steady, "batches": len(times),
                    "batch_size": batch_size}


def shard_batch(fn: Callable, mode: str = "shard_map",
                devices: Sequence[jax.Device] | None = None) -> ShardedBatchFn:
    """Wrap a per-shard batched ``fn(batched, *shared)`` to run over every device.

    ``mode``: ``"shard_map"`` (``jax.jit(jax.shard_map(...))`` on the ``data`` mesh; default)
    or ``"pmap"`` (``jax.pmap`` over the same devices). See :class:`ShardedBatchFn`. The
    wrapper is memoised per ``(fn, mode, devices)``, so its compiled programs are reused.
    """
    return _shard_batch_cached(fn, mode, None if devices is None else tuple(devices))


@functools.lru_cache(maxsize=64)
def _shard_batch_cached(fn, mode, devices) -> ShardedBatchFn:
    return ShardedBatchFn(fn, mode, devices)


# ------------------------------------------------------------------------------ hosts
def _env_int(env, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise P2LError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, env=os.environ) -> bool:
    """Start ``jax.distributed`` from flags, else from the environment; return whether it ran.

    Unset arguments fall back to ``P2L_COORDINATOR_ADDRESS``, ``P2L_NUM_PROCESSES`` and
    ``P2L_PROCESS_ID``. With no coordinator at all this is a single-process run and nothing
    happens. ``coordinator="auto"`` lets JAX detect the cluster (Cloud TPU pods, SLURM,
    Open MPI) with no further arguments.
    """
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID)
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise P2LError("--num-processes/--process-id given without --coordinator "
                           f"(or {ENV_COORDINATOR})")
        return False
    try:
        if coordinator == "auto":
            jax.distributed.initialize()
            return True
        if num_processes is None or process_id is None:
            raise P2LError(f"--coordinator {coordinator} needs --num-processes and --process-id "
                           f"(or {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise P2LError(f"--process-id {process_id} is not in [0, --num-processes "
                           f"{num_processes})")
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (RuntimeError, ValueError) as err:
        raise P2LError(f"jax.distributed.initialize({coordinator}) failed: "
                       f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return True


def process_index() -> int:
    """This process's index in ``[0, process_count())``."""
    return jax.process_index()


def process_count() -> int:
    """Number of processes in the run (1 without ``jax.distributed``)."""
    return jax.process_count()


def my_share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """``items[index::count]``: this process's round-robin share.

    Every process must pass the same list in the same order (e.g. sorted paths); the shares
    of all processes then partition ``items`` with each item in exactly one share."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process index {index} not in [0, {count})")
    return list(items)[index::count]


def _marker_paths(directory: str, name: str, count: int) -> list[str]:
    return [os.path.join(directory, f".{name}.process-{i}-of-{count}.json") for i in range(count)]


def clear_marker(directory: str, name: str, *, index: int | None = None,
                 count: int | None = None) -> None:
    """Remove this process's marker of :func:`gather_via_files` left by an earlier (killed)
    run; call it at start-up, after ``init_distributed`` (which waits for every process)."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    path = _marker_paths(directory, name, count)[index]
    if os.path.exists(path):
        os.unlink(path)


def gather_via_files(directory: str, name: str, payload, *, index: int | None = None,
                     count: int | None = None, timeout_s: float = 3600.0,
                     poll_s: float = 0.5) -> list | None:
    """Meet per-process JSON payloads through a shared ``directory``.

    Every process writes ``.{name}.process-{i}-of-{P}.json`` atomically. Process 0 then waits
    until all ``P`` files exist, reads them, removes them and returns the payloads in process
    order; the others return ``None`` at once. A single process gets ``[payload]`` and writes
    nothing. Raises :class:`P2LError` when process 0 waits longer than ``timeout_s``.
    """
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    if count == 1:
        return [payload]
    paths = _marker_paths(directory, name, count)
    write_json(paths[index], payload)
    if index != 0:
        return None
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            missing = [p for p in paths if not os.path.exists(p)]
            raise P2LError(f"{directory}: gave up after {timeout_s:.0f} s waiting for "
                           f"{len(missing)} process summaries ({os.path.basename(missing[0])})")
        time.sleep(poll_s)
    result = []
    for p in paths:
        with open(p) as fh:
            result.append(json.load(fh))
    for p in paths:
        os.unlink(p)
    return result
