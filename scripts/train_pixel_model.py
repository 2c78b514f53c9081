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
the default here is a UNet2DModel of about the same size trained for the same number of FLOPs
(see ``PixelStage``). Outputs are written atomically: ``model_index.json``
(DDIMPipeline), ``unet/`` (UNet2DModel config, float16 safetensors), ``scheduler/`` (the
embedded model's DDIM config) and ``training_summary.json``. Checkpoints in ``--workdir`` let
a killed run resume where it stopped (rerun the same command).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
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

    Equal budget [ours], by ``python scripts/train_pixel_model.py --budget --output X`` (XLA
    cost analysis of one training step): the embedded model's training is 125.4 TFLOP
    (autoencoder 3500 x 7.9 GFLOP + UNet/text encoder 6000 x 16.3 GFLOP); a step here is
    111.1 GFLOP, so 1130 steps spend the same. Parameters: 2.71 M here against 2.49 M in the
    embedded UNet + VAE. A pixel prior sees far fewer images for the same compute (18 k here,
    192 k latents there): that is the cost the latent space saves, and part of the question.
    """

    channels: tuple[int, ...] = (32, 64, 96, 96)
    down: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    head_dim: int = 24
    groups: int = 16
    batch_size: int = 16
    steps: int = 1130
    lr: float = 1e-3
    warmup: int = 100
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
    x_t, t, eps = emb.ddpm_noised(x0, k_t, k_eps, alphas_cumprod)
    mse = jnp.mean((unet(x_t, t) - eps) ** 2, axis=(1, 2, 3))
    return emb.min_snr_loss(mse, t, alphas_cumprod, stage.min_snr_gamma)


# ----------------------------------------------------------------------------- export
def write_model(output: Path, cfg: PixelConfig, params) -> Path:
    """Write the DDIMPipeline-layout directory into a temporary sibling of ``output``."""
    tmp = emb.staging_dir(output, ("unet", "scheduler"))
    write = emb.write_json
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


def step_flops(fn, *args) -> float:
    """FLOPs of one call of ``jax.jit(fn)(*args)`` by XLA's cost analysis (no compilation)."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def budget(cfg: PixelConfig) -> dict:
    """Training FLOPs of the embedded model (autoencoder stage + text encoder/UNet stage, its
    full preset) and of one step here, and the step count that spends the same FLOPs."""
    from p2l_jax.models.clip import CLIPTextModel
    from p2l_jax.models.unet import UNet2DConditionModel
    from p2l_jax.models.vae import AutoencoderKL

    ab = jnp.asarray(ScheduleConfig.from_dict(emb.SCHEDULER).alphas_cumprod())
    key = jax.random.key(0)
    grad = lambda loss: jax.value_and_grad(loss, has_aux=True)
    ecfg = emb.get_config("full")
    v, d = ecfg.vae, ecfg.diffusion
    vae_cfg, unet_cfg, text_cfg = emb.network_configs(ecfg)
    gv, pv = emb.init_networks({"vae": lambda r: AutoencoderKL(vae_cfg, rngs=r)}, 0)
    vae = step_flops(grad(lambda p, x, k: emb.vae_loss(p, gv["vae"], x, k, v)), pv["vae"],
                     jnp.zeros((v.batch_size, v.crop, v.crop, 3)), key)
    gd, pd = emb.init_networks({"unet": lambda r: UNet2DConditionModel(unet_cfg, rngs=r),
                                "text_encoder": lambda r: CLIPTextModel(text_cfg, rngs=r)}, 0)
    lat = jnp.zeros((d.batch_size, unet_cfg.sample_size, unet_cfg.sample_size,
                     unet_cfg.in_channels))
    batch = {"mean": lat, "std": lat, "scale": jnp.float32(1.0),
             "ids": jnp.zeros((d.batch_size, 77), jnp.int32)}
    diff = step_flops(grad(lambda p, b, k: emb.diffusion_loss(
        p, gd, b, k, ab, d, jnp.zeros((77,), jnp.int32))), pd, batch, key)
    st = cfg.stage
    gp, pp = emb.init_networks({"unet": lambda r: UNet2DModel(unet_config(cfg), rngs=r)}, 0)
    pix = step_flops(grad(lambda p, x, k: pixel_loss(p, gp["unet"], x, k, ab, st)), pp["unet"],
                     jnp.zeros((st.batch_size, cfg.image_size, cfg.image_size, 3)), key)
    embedded = vae * v.steps + diff * d.steps
    count = lambda tree: int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
    return {"embedded_vae_step_gflop": vae / 1e9, "embedded_diffusion_step_gflop": diff / 1e9,
            "embedded_total_tflop": embedded / 1e12, "pixel_step_gflop": pix / 1e9,
            "pixel_total_tflop": pix * st.steps / 1e12,
            "equal_flop_steps": embedded / pix,
            "params": {"embedded_unet_plus_vae": count(pd["unet"]) + count(pv["vae"]),
                       "pixel_unet": count(pp["unet"])}}


def main(argv=None) -> int:
    parser = emb.command_line(__doc__.split("\n")[0], "train_pixel")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="train up to STEP only, then export (0: export the latest "
                             "checkpoint of a run in progress)")
    parser.add_argument("--budget", action="store_true",
                        help="print the training FLOPs of the embedded model and of this "
                             "preset (XLA cost analysis), and exit")
    args = parser.parse_args(argv)
    cfg = get_config(args.preset)
    if args.budget:
        print(json.dumps(budget(cfg), indent=1))
        return 0
    run(cfg, args.output, emb.workdir_of(args, "train_pixel"), emb.timestamped, args.stop_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
