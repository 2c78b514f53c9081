"""Train the pixel-space diffusion prior (unconditional ``UNet2DModel``) and write it in diffusers layout.

The comparison point for latent P2L: a prior that models the images themselves, so DPS runs
with D = E = identity. One command, fixed seed, CPU only, resumable::

    python scripts/train_pixel_model.py --output runs/pixel_model
    python scripts/train_pixel_model.py --preset tiny --output /tmp/px   # seconds, for tests

The result (2.7 M parameters, 5.4 MB in float16) is not shipped in the package: the embedded
model and tokenizer already take 11 of the package's 12 MB budget. It is reproduced by the
command above (``benchmarks.pixel_vs_latent`` reads ``runs/pixel_model`` by default).

Same data as the embedded model (``scripts/train_embedded_model.py``, whose pieces this script
imports): a fixed pool of 64 px images from the ``train`` split of :mod:`p2l_jax.data` (same
indices, same cache format), validation images for the held-out loss. Images x are NHWC in
[-1, 1]. The DDPM epsilon-prediction loss on the embedded model's schedule (SD's
``scaled_linear``, beta 0.00085..0.012, T = 1000), with no text (the prior is unconditional):

    t ~ U{0..T-1},  eps ~ N(0, I),  x_t = sqrt(ab_t) x + sqrt(1 - ab_t) eps,
    L = mean_b w_t || eps_theta(x_t, t) - eps ||^2 / dim,   w_t = min(SNR_t, gamma) / SNR_t

(min-SNR weighting with the embedded model's gamma = 5). AdamW, warm-up + cosine, gradient
clipping and the EMA that ships are the embedded model's (``train_embedded_model.train``).

Budget: the embedded model's UNet + VAE hold 2.49 M parameters (its text encoder, 1.6 M, is
mostly a token table a pixel prior has no use for) and took about 50 minutes on the 2-core VM;
the default here is a UNet2DModel of about the same size whose step count was chosen to fill
about the same time (see ``PixelStage``). Outputs are written atomically: ``model_index.json``
(DDIMPipeline), ``unet/`` (UNet2DModel config, float16 safetensors), ``scheduler/`` (the
embedded model's DDIM config) and ``training_summary.json``. Checkpoints in ``--workdir`` let
a killed run resume where it stopped (rerun the same command).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_embedded_model as emb  # noqa: E402
from p2l_jax.data.splits import split_indices  # noqa: E402
from p2l_jax.models.unet_pixel import UNet2DConfig, UNet2DModel  # noqa: E402
from p2l_jax.schedule import ScheduleConfig  # noqa: E402
from p2l_jax.weights import state_to_torch  # noqa: E402


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class PixelStage:
    """UNet2DModel architecture (diffusers names) and its training.

    Levels 64, 32, 16 and 8 px. Self attention only at 8 px and in the mid block (64 tokens):
    the embedded UNet's authors found 256-token attention 4x slower per step on this CPU.
    The 64 px level is kept narrow (32 channels) because every conv there costs 16x what it
    costs at the embedded UNet's 16x16 latents; channels grow where maps are small.
    """

    channels: tuple[int, ...] = (32, 64, 96, 96)
    down: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    head_dim: int = 24
    groups: int = 16
    batch_size: int = 16
    steps: int = 2500
    lr: float = 1e-3
    warmup: int = 200
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999


@dataclasses.dataclass(frozen=True)
class PixelConfig:
    """Data, the stage, logging. ``image_size``/``pool_size`` match the embedded model's."""

    seed: int = 0
    image_size: int = 64
    pool_size: int = 10000
    eval_size: int = 64
    stage: PixelStage = PixelStage()
    log_every: int = 25
    eval_every: int = 250
    ckpt_every: int = 50


def get_config(preset: str = "full") -> PixelConfig:
    """``full``: the shipped prior; ``tiny``: seconds, for tests."""
    if preset == "full":
        return PixelConfig()
    if preset == "tiny":
        return PixelConfig(
            image_size=32, pool_size=16, eval_size=4, log_every=1, eval_every=100, ckpt_every=3,
            stage=PixelStage(channels=(8,), down=("AttnDownBlock2D",),
                             up=("AttnUpBlock2D",), head_dim=4, groups=4,
                             batch_size=4, steps=6, lr=3e-3, warmup=1, ema_decay=0.5))
    raise ValueError(f"unknown preset {preset!r} (full, tiny)")


def fingerprint(cfg: PixelConfig) -> str:
    """Hash of everything that determines the shipped weights (not logging)."""
    key = (cfg.seed, cfg.image_size, cfg.pool_size, cfg.stage)
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def unet_config(cfg: PixelConfig) -> UNet2DConfig:
    s = cfg.stage
    return UNet2DConfig(in_channels=3, out_channels=3, block_out_channels=s.channels,
                        down_block_types=s.down, up_block_types=s.up,
                        layers_per_block=s.layers_per_block, attention_head_dim=s.head_dim,
                        norm_num_groups=s.groups, sample_size=cfg.image_size)


# ----------------------------------------------------------------------------- loss
def pixel_loss(params, graphdef, x0, key, alphas_cumprod, stage: PixelStage):
    """L of the module docstring on images ``x0`` in [-1, 1]; returns (loss, unweighted MSE)."""
    unet = nnx.merge(graphdef, params)
    k_t, k_eps = jax.random.split(key)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
    eps = jax.random.normal(k_eps, x0.shape)
    ab = alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    mse = jnp.mean((unet(x_t, t) - eps) ** 2, axis=(1, 2, 3))
    if stage.min_snr_gamma > 0:
        snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
        weight = jnp.minimum(snr, stage.min_snr_gamma) / snr
    else:
        weight = jnp.ones_like(mse)
    return jnp.mean(weight * mse), jnp.mean(mse)


# ----------------------------------------------------------------------------- export
def write_model(output: Path, cfg: PixelConfig, params) -> Path:
    """Write the DDIMPipeline-layout directory into a temporary sibling of ``output``."""
    output = Path(output).resolve()
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("unet", "scheduler"):
        (tmp / sub).mkdir(parents=True)
    write = lambda path, obj: path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    write(tmp / "model_index.json", {
        "_class_name": "DDIMPipeline", "_diffusers_version": emb.DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"]})
    write(tmp / "scheduler" / "scheduler_config.json", emb.SCHEDULER)
    unet_json = dataclasses.asdict(unet_config(cfg))
    unet_json.pop("dropout")
    write(tmp / "unet" / "config.json", emb._with_meta(unet_json, "UNet2DModel"))
    emb._save_safetensors(state_to_torch(params),
                          tmp / "unet" / "diffusion_pytorch_model.safetensors")
    return tmp


def verify(directory: Path, params) -> dict:
    """Load the written directory with ``p2l_jax.load_model`` and compare its parameters with
    the trained ones: the float16 rounding must be the only change (relative error ~3e-4)."""
    from p2l_jax.model import load_model

    loaded = jax.tree_util.tree_leaves(load_model(directory).params["unet"])
    trained = jax.tree_util.tree_leaves(params)
    if [a.shape for a in loaded] != [b.shape for b in trained]:
        raise RuntimeError(f"{directory}: loaded parameters differ in shape from the trained")
    diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(loaded, trained))
    norm = sum(float(jnp.sum(b ** 2)) for b in trained)
    return {"fp16_param_rel_err": round((diff / norm) ** 0.5, 6)}


# ----------------------------------------------------------------------------- main
def _cumulative_clock(path: Path, log):
    """``log`` that also records the wall time of all runs so far in ``path`` (JSON), so a
    resumed training still states its whole cost; ``.total()`` reads it."""
    prior = json.loads(path.read_text())["wall_s"] if path.is_file() else 0.0
    t0 = time.time()

    def total() -> float:
        return prior + time.time() - t0

    def clocked(msg: str) -> None:
        log(msg)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"wall_s": round(total(), 1)}))
        os.replace(tmp, path)

    clocked.total = total
    return clocked


def run(cfg: PixelConfig, output: Path, workdir: Path, log=print,
        stop_at: int | None = None) -> dict:
    """Train (resuming from ``workdir``), export to ``output``; return the summary.

    The training is ``train_embedded_model.train`` (AdamW, EMA, checkpoints) on ``pixel_loss``.
    ``stop_at``: train only up to that step (the schedule stays the full run's), then export;
    a checkpoint already past it is exported as it is (``stop_at=0``: export the latest
    checkpoint, to look at a run in progress).
    """
    t_start, fp = time.time(), fingerprint(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    log = _cumulative_clock(workdir / f"wall_{fp}.json", log)
    (workdir / "config.json").write_text(json.dumps(
        {"fingerprint": fp, "config": dataclasses.asdict(cfg)}, indent=2))
    log(f"config {fp}: {cfg}")
    data_fp = hashlib.sha256(repr((cfg.image_size, cfg.pool_size)).encode()).hexdigest()[:16]
    pool, _ = emb.image_pool(split_indices("train", cfg.pool_size), cfg.image_size,
                             workdir / f"pool_{data_fp}.npz", log)
    val_images, _ = emb.image_pool(split_indices("validation", cfg.eval_size), cfg.image_size,
                                   None, log)
    timings = {"data_s": round(time.time() - t_start, 1)}

    st = cfg.stage
    ucfg = unet_config(cfg)
    graphdefs, params = emb.init_networks({"unet": lambda r: UNet2DModel(ucfg, rngs=r)},
                                          cfg.seed + 2)
    graphdef, params = graphdefs["unet"], params["unet"]
    ab = jnp.asarray(ScheduleConfig.from_dict(emb.SCHEDULER).alphas_cumprod())
    x_val = emb.to_float(val_images)
    key_eval = jax.random.key(cfg.seed + 3)

    def loss_fn(p, x, k):
        return pixel_loss(p, graphdef, emb.to_float(x), k, ab, st)

    def batch_fn(i):
        idx = np.random.default_rng([cfg.seed, 2, i]).integers(len(pool), size=st.batch_size)
        return pool[idx]

    @jax.jit
    def eval_fn(p):  # unweighted eps MSE at fixed t and noise: comparable over time
        return pixel_loss(p, graphdef, x_val, key_eval, ab,
                          dataclasses.replace(st, min_snr_gamma=0.0))[1]

    t0 = time.time()
    params, history = emb.train(
        "pixel", loss_fn, params, st.steps if stop_at is None else min(stop_at, st.steps),
        emb.optimizer(st.lr, st.warmup, st.steps), batch_fn,
        jax.random.key(cfg.seed + 4), workdir / "pixel_ckpt.npz", fp, cfg, log,
        ema_decay=st.ema_decay, eval_fn=lambda p: {"eps_mse": round(float(eval_fn(p)), 5)},
        metric_name="eps_mse")
    timings["train_s_this_run"] = round(time.time() - t0, 1)

    timings["wall_s_all_runs"] = round(log.total(), 1)
    summary = {
        "seed": cfg.seed, "fingerprint": fp, "config": dataclasses.asdict(cfg),
        "timings": timings, "history": history,
        "trained_steps": max([h["step"] for h in history] or [0]), "planned_steps": st.steps,
        "params": {"unet": int(sum(x.size for x in jax.tree_util.tree_leaves(params)))},
    }
    tmp = write_model(output, cfg, params)
    summary["shipped"] = verify(tmp, params)
    timings["total_s_this_run"] = round(time.time() - t_start, 1)
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["size_bytes"] = emb.directory_size(tmp)
    emb.publish(tmp, output)
    log(f"shipped model: {summary['shipped']}")
    log(f"wrote {output} ({summary['size_bytes'] / 1e6:.2f} MB) in "
        f"{timings['total_s_this_run']:.0f}s (this run)")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="model directory to write")
    parser.add_argument("--preset", default="full", choices=("full", "tiny"))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="checkpoints and data cache (default runs/train_pixel_<preset>)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="train up to STEP only, then export (0: export the latest "
                             "checkpoint of a run in progress)")
    args = parser.parse_args(argv)
    cfg = get_config(args.preset)
    workdir = args.workdir or Path(__file__).resolve().parents[1] / "runs" / \
        f"train_pixel_{args.preset}"
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    run(cfg, args.output, workdir, log, args.stop_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
