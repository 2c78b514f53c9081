"""``P2LPipeline``: model + solver + operator -> restored images and per-image records.

    pipe = P2LPipeline.from_pretrained("path/to/sd15")            # None: the embedded model
    out = pipe(images=x, operator=op, config=P2LConfig(num_steps=50), seed=0,
               identities=["a", "b"], sigma=0.05)                 # simulate: measure, restore, score
    out = pipe(measurements=y, operator=op, config=..., identities=[...])   # real measurements
    out = pipe(images=x, ..., prompts=["a red square", "a blue disc"])      # C0 per image
    out = pipe.run_dataset([Example("7", image=x7), ...], batch_size=4, operator=op,
                           config=..., sigma=0.05)                          # padded batches
    out.images, out.records

Conditioning: the starting embedding C0 is ``config.prompt``'s for the whole batch, or one
per image (``prompts=`` / ``embeddings=``); per-image embeddings are program inputs split
over the devices with the images, so image i's result equals a run of image i alone with its
prompt as ``config.prompt``. A dataset runs in batches of a fixed size, the last one padded
with copies of its last item (dropped from the outputs): one compiled program for all
batches, and no result depends on the batch size.

Randomness depends on ``(seed, identity)`` only, never on an image's position, batch or device:

* measurement noise (``images=`` only): ``y_i = A x_i + sigma n_i`` with ``n_i`` from
  :func:`p2l_jax.operators.noise_key` ``(seed, identity_i)`` -- the same noise
  ``p2l-jax degrade`` draws for a file whose stem is ``identity_i``;
* the sampler's key: :func:`p2l_jax.parallel.image_key` ``(seed, identity_i)``.

The batch is split over all local devices by :func:`p2l_jax.parallel.shard_batch`; inside a
shard every image is solved with its own key (the solver's randomness is per sample), so a
result equals the result of that image restored alone. The shards run the solver's programs
(:mod:`p2l_jax.solvers.program`) under the one runner (:func:`p2l_jax.solvers.resumable.run`),
as ``solve`` does: the config's structure is static, its settings are replicated arrays.

Sizes: the UNet halves the latent ``L - 1`` times (``L`` = number of UNet blocks) and the VAE
maps ``f`` pixels to one latent cell, so an image side must be a multiple of
``f * 2^(L - 1)`` (64 for SD 1.x/2.x). Other sizes are refused (:meth:`check_size`), never
resized or padded behind the user's back; any valid size is accepted, and records say when it
differs from the model's native size.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from p2l_jax import metrics
from p2l_jax.errors import P2LError
from p2l_jax.model import load_model
from p2l_jax.operators import measurement_shape, noise_key
from p2l_jax.parallel import IMAGE_KEY_DERIVATION, image_keys, shard_batch
from p2l_jax.solvers import program
from p2l_jax.solvers.driver import prepare
from p2l_jax.solvers.resumable import Programs, run, run_identity


#: Batch layouts run so far in this process (to flag timings that include compilation).
_SEEN_PROGRAMS: set = set()


def config_record(config) -> dict[str, Any]:
    """A solver config as JSON: its class name and fields (non-JSON values by ``repr``)."""
    def plain(v):
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        if isinstance(v, (tuple, list)):
            return [plain(t) for t in v]
        return repr(v)

    fields = ({f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
              if dataclasses.is_dataclass(config) else {"repr": repr(config)})
    return {"solver": type(config).__name__, **fields}


# Per-device bodies of the solver's programs (p2l_jax.solvers.program): the whole run, and
# start / advance k steps / finish for the chunked runner. ``inputs`` = (C0, C_neg, settings)
# are replicated arrays, ``structure`` is static; every image is solved with its own key, so
# image i is independent of the rest of its shard. Per-image embeddings travel in the batch
# as ``batch["C0"]`` (then ``inputs``' C0 is None). The carry is batch-leading, so it travels
# through the sharded calls like the images (padding rows copy a real image's).
def _start_inputs(batch, inputs):
    C0, C_neg, settings = inputs
    return (batch["C0"] if "C0" in batch else C0), C_neg, settings


def _whole_shard(batch, model, operator, inputs, structure, latent_shape):
    return _outputs(program.run_whole(model, operator, batch["y"], batch["key"],
                                      *_start_inputs(batch, inputs), structure=structure,
                                      latent_shape=latent_shape))


def _start_shard(batch, model, operator, inputs, structure, latent_shape, k):
    return program.start(model, operator, batch["y"], batch["key"], *_start_inputs(batch, inputs),
                         structure=structure, latent_shape=latent_shape, k=k)


def _advance_shard(batch, model, operator, inputs, structure, k, first):
    _, C_neg, settings = inputs
    return program.advance(model, operator, batch["y"], batch["key"], C_neg, settings,
                           batch["carry"], first, structure=structure, k=k)


def _finish_shard(batch, model, operator, inputs, structure):
    return _outputs(program.finish(model, operator, batch["y"], batch["carry"],
                                   structure=structure))


def _outputs(result):
    return {"images": result.images, "residual": result.residual,
            "residual_final": result.residual_final}


@jax.jit
def measure_each(operator, x, keys, sigma):
    """``y_i = A x_i + sigma n_i`` with each image's own noise key ``keys[i]``."""
    return jax.vmap(lambda xi, k: operator.measure(xi[None], k, sigma)[0])(x, keys)


def measure(operator, images, identities: Sequence[str], seed: int, sigma: float) -> jax.Array:
    """``y_i = A x_i + sigma n_i`` with ``n_i`` drawn from ``noise_key(seed, identities[i])``:
    the noise of an image depends on its identity only (module docstring)."""
    keys = jnp.stack([noise_key(seed, s) for s in identities])
    return measure_each(operator, jnp.asarray(images, jnp.float32), keys, jnp.float32(sigma))


@dataclasses.dataclass(frozen=True)
class Example:
    """One item of a dataset for :meth:`P2LPipeline.run_dataset`: its ``identity`` (the key
    rule's input: a file stem, or ``str(index)``), its ground-truth ``image`` (H, W, 3) or its
    ``measurement`` y, and optionally its own ``prompt`` or text ``embedding`` (L, d).
    Mappings with these keys are accepted too."""

    identity: str
    image: Any = None
    measurement: Any = None
    prompt: str | None = None
    embedding: Any = None


def _example(item) -> Example:
    if isinstance(item, Example):
        return item
    if isinstance(item, Mapping):
        return Example(**item)
    raise P2LError(f"dataset item {item!r}: expected an Example or a mapping with 'identity' "
                   "and 'image' or 'measurement'")


#: What an Example may carry besides its identity: all items of a dataset, or none, have each.
_FIELDS = ("image", "measurement", "prompt", "embedding")


def _present(items: list[Example]) -> set[str]:
    """The fields every item has (P2LError naming an item without a field others have)."""
    present = set()
    for field in _FIELDS:
        missing = [e.identity for e in items if getattr(e, field) is None]
        if len(missing) < len(items):
            if missing:
                raise P2LError(f"dataset item {missing[0]}: has no {field}, other items have one")
            present.add(field)
    return present


@dataclasses.dataclass
class PipelineOutput:
    """``images`` (B, H, W, 3) in [-1, 1], ``measurements`` y, ``records`` one dict per image."""

    images: np.ndarray
    measurements: np.ndarray
    records: list[dict[str, Any]]


class P2LPipeline:
    """A loaded model and a device layout; call it to restore a batch (module docstring)."""

    def __init__(self, model, parallel: str = "shard_map", devices=None, lpips_net="alexnet"):
        self.model = model
        self.parallel = parallel
        self.lpips_net = lpips_net
        self._whole, self._start, self._advance, self._finish = (
            shard_batch(f, mode=parallel, devices=devices)
            for f in (_whole_shard, _start_shard, _advance_shard, _finish_shard))

    @classmethod
    def from_pretrained(cls, path=None, dtype: str = "float32", *, parallel: str = "shard_map",
                        devices=None, allow_pickle: bool = False) -> P2LPipeline:
        """Load ``path`` (diffusers layout; ``None`` = the embedded default model)."""
        return cls(load_model(path, dtype, allow_pickle=allow_pickle), parallel, devices)

    @property
    def num_devices(self) -> int:
        return self._whole.num_devices

    def compiled_programs(self) -> int:
        """How many sharded solver programs (whole, start, advance, finish) this pipeline's
        layout has compiled in this process (one per batch shape and solver structure)."""
        return sum(f.compiled_programs() for f in (self._whole, self._start, self._advance,
                                                   self._finish))

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: ``f * 2^(L - 1)`` (module docstring)."""
        levels = len(self.model.unet_config.block_out_channels)
        return self.model.vae_scale_factor * 2 ** (levels - 1)

    def check_size(self, hw: Sequence[int], name: str) -> None:
        """Raise :class:`P2LError` naming ``name`` unless ``hw`` fits the model (no resizing)."""
        m = self.size_multiple
        h, w = (int(v) for v in hw)
        if h % m or w % m or h <= 0 or w <= 0:
            fit = f"{max(m, h // m * m)}x{max(m, w // m * m)}"
            raise P2LError(f"{name}: image size {h}x{w} is not a multiple of {m} (this model "
                           f"needs sides divisible by {m}); crop or pad it, e.g. to {fit}")

    def __call__(self, images=None, measurements=None, *, operator, config, seed: int = 0,
                 identities: Sequence[str], sigma: float = 0.0,
                 image_size: tuple[int, int] | None = None,
                 prompts: Sequence[str] | None = None, embeddings=None,
                 pad_to: int | None = None, chunk_steps: int | None = None, on_chunk=None,
                 checkpoint=None, checkpoint_every: int | None = None) -> PipelineOutput:
        """Restore one batch. Give ``images`` (ground truth: measured with noise ``sigma``,
        restored and scored) or ``measurements`` (restored; no quality metrics).

        The starting text embedding C0: ``config.prompt``'s for the whole batch (default),
        or per image, ``prompts`` (one text per image) or ``embeddings`` (B, L, d) (or
        (1, L, d): one for all). Per-image embeddings are inputs of the same program (split
        over the devices with the images): image i's result equals a run of image i alone
        with its prompt as ``config.prompt``.

        ``image_size`` (H, W) of the restored images; default: the images' size, else the
        measurement's size when ``operator`` preserves it, else the model's native size.
        ``pad_to``: pad a short batch to this size (padding dropped) to reuse its program.
        ``chunk_steps``, ``on_chunk``, ``checkpoint``, ``checkpoint_every``: run the sampler
        in chunks with progress and an in-flight checkpoint, as
        :func:`p2l_jax.solvers.solve` does (the one runner, :mod:`p2l_jax.solvers.resumable`);
        the checkpoint folder is left in place for the caller to delete once the outputs are
        safe. The config's settings are arrays of the program: another rho, lam, ... reuses
        the compiled program of its structure."""
        if (images is None) == (measurements is None):
            raise P2LError("give exactly one of images= or measurements=")
        identities = list(identities)
        if len(set(identities)) != len(identities):
            raise P2LError("identities must be unique (they derive each image's key)")
        truth = None if images is None else jnp.asarray(images, jnp.float32)
        if truth is not None:
            if truth.ndim != 4 or truth.shape[0] != len(identities):
                raise P2LError(f"images must be (B, H, W, 3) with B = {len(identities)} "
                               f"identities, got {truth.shape}")
            operator.validate_shape(truth.shape)
            y = measure(operator, truth, identities, seed, sigma)
        else:
            y = jnp.asarray(measurements, jnp.float32)
            if y.ndim != 4 or y.shape[0] != len(identities):
                raise P2LError(f"measurements must be (B, h, w, C) with B = "
                               f"{len(identities)} identities, got {y.shape}")
        hw = tuple(truth.shape[1:3]) if truth is not None else image_size
        if hw is None:
            same = measurement_shape(operator, (1, *y.shape[1:3], 3))[1:] == y.shape[1:]
            hw = tuple(y.shape[1:3]) if same else (self.model.image_size,) * 2
        self.check_size(hw, "images")
        latent_size = tuple(int(v) // self.model.vae_scale_factor for v in hw)
        finite = np.asarray(jnp.all(jnp.isfinite(y), axis=(1, 2, 3)))
        if not finite.all():
            bad = [s for s, ok in zip(identities, finite) if not ok]
            raise P2LError(f"measurement of {bad[0]} contains NaN or inf")
        keys = image_keys(seed, identities)
        embedding = self._embeddings(prompts, embeddings, len(identities))
        p = prepare(self.model, operator, y, keys, config, latent_size=latent_size,
                    embedding=embedding)
        # one embedding per image: batch-leading, sharded and padded like the images
        per_image = embedding is not None and embedding.shape[0] == len(identities)
        shape_key = (max(y.shape[0], pad_to or 0), y.shape[1:], p.structure, self.parallel,
                     jax.tree.structure(operator), id(self.model), chunk_steps, per_image,
                     tuple(p.C0.shape[1:]))
        compiled_now = shape_key not in _SEEN_PROGRAMS
        start = time.perf_counter()
        batch = {"y": p.y, "key": p.keys, **({"C0": p.C0} if per_image else {})}
        shared = (self.model, operator, (None if per_image else p.C0, p.C_neg, p.settings),
                  p.structure)
        # pmap refuses a carry left sharded over the mesh by its previous call: via the host
        host = jax.device_get if self.parallel == "pmap" else (lambda carry: carry)
        with_carry = lambda carry: {**batch, "carry": host(carry)}
        programs = Programs(
            whole=lambda: self._whole(batch, *shared, p.latent_shape, pad_to=pad_to),
            start=lambda k: self._start(batch, *shared, p.latent_shape, k, pad_to=pad_to),
            advance=lambda carry, first, k: self._advance(with_carry(carry), *shared, k, first,
                                                          pad_to=pad_to),
            finish=lambda carry: self._finish(with_carry(carry), *shared, pad_to=pad_to))
        out = run(programs, config.num_steps, chunk_steps=chunk_steps, on_chunk=on_chunk,
                  checkpoint=checkpoint, checkpoint_every=checkpoint_every, keep_checkpoint=True,
                  identity=run_identity(self.model, operator, config, p.latent_shape, p.y,
                                        p.keys, *(() if embedding is None else (p.C0,))))
        out = jax.block_until_ready(out)
        seconds = time.perf_counter() - start
        _SEEN_PROGRAMS.add(shape_key)
        restored = np.asarray(out["images"])
        quality = (metrics.image_metrics(restored, np.asarray(truth), self.lpips_net)
                   if truth is not None else None)
        records = []
        for i, ident in enumerate(identities):
            ok = bool(np.all(np.isfinite(restored[i])))
            residual = np.asarray(out["residual"][i])
            records.append({
                "identity": ident, "seed": int(seed), "status": "ok" if ok else "non-finite",
                "key": {"derivation": IMAGE_KEY_DERIVATION,
                        "value": np.asarray(keys[i]).tolist()},
                "model": {"path": self.model.path, "dtype": jnp.dtype(self.model.dtype).name},
                "config": config_record(config), "operator": operator.to_dict(),
                "prompt": (config.prompt if embedding is None else
                           None if prompts is None else prompts[i]),
                "sigma": float(sigma) if truth is not None else None,
                "image_size": list(restored.shape[1:3]),
                "native_size": restored.shape[1] == restored.shape[2] == self.model.image_size,
                "devices": self.num_devices, "parallel": self.parallel,
                "timing": {"batch_seconds": seconds, "batch_size": len(identities),
                           "seconds_per_image": seconds / len(identities),
                           "includes_compilation": compiled_now},
                "residual_final": _finite(np.asarray(out["residual_final"][i])),
                "residual_last_step": _finite(residual[-1]) if residual.size else None,
                "metrics": ({k: v[i] for k, v in quality.items()} if quality and ok else
                            {"psnr": None, "ssim": None, "lpips": None}),
            })
        return PipelineOutput(restored, np.asarray(y), records)

    def _embeddings(self, prompts, embeddings, batch: int):
        """C0 of ``prompts`` / ``embeddings`` (:meth:`__call__`), or None for the config's."""
        if prompts is not None and embeddings is not None:
            raise P2LError("give prompts= or embeddings=, not both")
        if prompts is not None:
            if isinstance(prompts, str) or len(prompts) != batch:
                raise P2LError(f"prompts: expected one text per image ({batch}), got "
                               f"{prompts!r:.80}")
            return self.model.text_embeddings(list(prompts))
        if embeddings is None:
            return None
        C = jnp.asarray(embeddings, jnp.float32)
        if C.ndim != 3 or C.shape[0] not in (1, batch):
            raise P2LError(f"embeddings: expected shape (1 or {batch}, L, d), got "
                           f"{tuple(C.shape)}")
        return C

    def run_dataset(self, dataset: Iterable, *, batch_size: int, operator, config,
                    seed: int = 0, sigma: float = 0.0, **options) -> PipelineOutput:
        """Restore every item of ``dataset`` (:class:`Example` s or mappings, each with an
        ``identity``; all with ``image`` or all with ``measurement``; all, or none, with a
        ``prompt`` or an ``embedding``) in batches of ``batch_size``.

        The last, short batch is padded to ``batch_size`` (copies of its last item, dropped
        from the outputs), so every batch runs the same compiled program. Each item's keys
        come from ``(seed, identity)`` (module docstring): its result does not depend on
        ``batch_size`` or on its position. ``options`` are :meth:`__call__`'s (e.g.
        ``image_size``, ``chunk_steps``). Returns the outputs of all items, in order."""
        if batch_size <= 0:
            raise P2LError(f"batch_size must be a positive integer, got {batch_size}")
        items = [_example(item) for item in dataset]
        if not items:
            raise P2LError("dataset: no items")
        ids = [e.identity for e in items]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise P2LError(f"dataset: identity {twice!r} appears twice (identities derive "
                           "each item's keys)")
        present = _present(items)
        column = lambda part, field: (None if field not in present else
                                      [getattr(e, field) for e in part])
        stacked = lambda part, field: (None if field not in present else
                                       np.stack([np.asarray(v) for v in column(part, field)]))
        outputs = []
        for start in range(0, len(items), batch_size):
            part = items[start:start + batch_size]
            outputs.append(self(
                stacked(part, "image"), stacked(part, "measurement"), operator=operator,
                config=config, seed=seed, identities=[e.identity for e in part], sigma=sigma,
                prompts=column(part, "prompt"), embeddings=stacked(part, "embedding"),
                pad_to=batch_size, **options))
        return PipelineOutput(np.concatenate([o.images for o in outputs]),
                              np.concatenate([o.measurements for o in outputs]),
                              [r for o in outputs for r in o.records])


def _finite(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None
