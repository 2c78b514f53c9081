"""Train p2l-jax's embedded text-to-image latent diffusion model and write it in diffusers layout.

One command, fixed seed, CPU only (JAX + optax), resumable::

    python scripts/train_embedded_model.py --output p2l_jax/assets/embedded_model
    python scripts/train_embedded_model.py --preset tiny --output /tmp/m   # seconds, for tests

Data: the procedural captioned images of :mod:`p2l_jax.data.shapes`, a fixed pool drawn from the
``train`` split; held-out numbers use the ``validation`` split. Images x are NHWC in [-1, 1].

Stage 1, the KL autoencoder (SD's ``AutoencoderKL``, encoder E, decoder D), on crops around the
pool's shapes (whole images are mostly background), randomly flipped and turned by 90 degrees.
With posterior q(z|x) = N(mu(x), diag sigma^2(x)) and a reparameterised sample
z = mu + sigma * n, n ~ N(0, I), x_hat = D(z):

    L_vae = mean|x_hat - x| + w_l2 mean (x_hat - x)^2
            + w_grad (mean|dx x_hat - dx x| + mean|dy x_hat - dy x|)    (finite differences:
                                                                         keeps stripes sharp)
            + w_kl mean_j KL(q(z_j|x) || N(0, 1)),
    KL = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)  per latent element.

All terms are means (per pixel / per latent element); SD's 1e-6 on summed terms corresponds to
roughly 1e-7 here, so ``kl_weight`` = 1e-6 is a light regulariser that keeps the latents bounded.
Afterwards the scaling factor is s = 1 / std(z) over the pool's posterior samples (written into
``vae/config.json``), so the diffusion model sees unit-variance latents as SD's 0.18215 does.

Stage 2, the CLIP text encoder and the UNet (trained jointly from scratch; VAE frozen), the
DDPM epsilon-prediction loss on SD's ``scaled_linear`` schedule (beta 0.00085..0.012, T = 1000):

    z0 = s * (mu + sigma n),  t ~ U{0..T-1},  eps ~ N(0, I),
    z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps,   C = text_encoder(tokens(caption)),
    L_ddpm = mean_b w_t || eps_theta(z_t, t, C) - eps ||^2 / dim,

where the caption is replaced by "" with probability ``caption_dropout`` (so classifier-free
guidance works) and w_t = min(SNR_t, gamma) / SNR_t, SNR_t = ab_t / (1 - ab_t) (min-SNR
weighting, Hang et al. 2023; ``min_snr_gamma = 0`` gives the plain DDPM loss w_t = 1). An
exponential moving average of both networks' weights is what ships.

Outputs are written atomically (a temporary directory renamed into place): ``model_index.json``
(StableDiffusionPipeline), ``unet/``, ``vae/``, ``text_encoder/`` (transformers config, keys with
the ``text_model.`` prefix), ``tokenizer/`` (the packaged CLIP BPE files), ``scheduler/``
(DDIMScheduler, SD values), float16 safetensors, and ``training_summary.json``. Progress goes to
stdout (stage, step, loss, elapsed, ETA); checkpoints in ``--workdir`` let a killed run resume
where it stopped (rerun the same command).
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
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2l_jax import metrics  # noqa: E402
from p2l_jax.data.shapes import anchor, parse_caption  # noqa: E402
from p2l_jax.data.shapes import batch as draw_batch, captions as all_captions  # noqa: E402
from p2l_jax.data.splits import split_indices  # noqa: E402
from p2l_jax.models.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from p2l_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from p2l_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from p2l_jax.schedule import ScheduleConfig  # noqa: E402
from p2l_jax.tokenizer import default_tokenizer_dir, load_tokenizer, tokenize  # noqa: E402
from p2l_jax.weights import state_to_torch  # noqa: E402

DIFFUSERS_VERSION = "0.42.1"
SCHEDULER = {  # Stable Diffusion's DDIM settings
    "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "clip_sample": False,
    "clip_sample_range": 1.0, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
}


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class VAEStage:
    """Autoencoder architecture (diffusers names) and its training.

    Three blocks (factor 4, 16x16x4 latents of 64 px images) rather than SD's four: in a
    300-step trial (uniform random crops) the factor-8 variant (16, 32, 64, 64) reached 18.6 dB
    held-out PSNR against 21.0 dB here, and 8x8 latents leave P2L little to work on.
    """

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    latent_channels: int = 4
    crop: int = 32            # training crop side (fully convolutional; eval on full images)
    batch_size: int = 16
    steps: int = 3500
    lr: float = 1e-3
    warmup: int = 100
    l2_weight: float = 1.0
    grad_weight: float = 0.5
    kl_weight: float = 1e-6


@dataclasses.dataclass(frozen=True)
class DiffusionStage:
    """Text encoder + UNet architecture and their joint training."""

    clip_hidden: int = 32     # token embedding is 49408 x hidden: the size budget's main cost
    clip_layers: int = 3
    clip_heads: int = 2
    clip_intermediate: int = 128
    # Levels 16, 8, 4 and 2 (latent side). No attention at 16x16: its 256-token attention made
    # a step 4x slower on CPU; text enters at 8x8 and 4x4 and in the mid block at 2x2 (SD's
    # pattern: the deepest down block and the first up block have no attention). The 2x2 level
    # was added for position words (the networks have no positional encoding; a location is
    # known only from the convolutions' zero padding, which each cell of a 2x2 map sees on a
    # different side). Measured against the three-level model (32, 64, 64; 4500 steps), with
    # 6000 steps: attribute score 0.53 -> 0.68, shape 0.22 -> 0.53, but position words are
    # still ignored (docs/RESULTS.md). 48 channels keep the shipped directory under 10 MB.
    unet_channels: tuple[int, ...] = (32, 64, 64, 48)
    unet_down: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D")
    unet_up: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "UpBlock2D")
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    unet_groups: int = 16
    batch_size: int = 32
    steps: int = 6000
    lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Data, both stages, logging and the final generation check."""

    seed: int = 0
    image_size: int = 64
    pool_size: int = 10000    # training images drawn once (train split indices 0..pool-1)
    eval_size: int = 64       # held-out validation images for PSNR / eval loss
    vae: VAEStage = VAEStage()
    diffusion: DiffusionStage = DiffusionStage()
    log_every: int = 25
    eval_every: int = 250
    ckpt_every: int = 200
    gen_samples: int = 48     # final check: DDIM + CFG samples scored by the attribute checker
    gen_steps: int = 25
    guidance: float = 4.0


def get_config(preset: str = "full") -> TrainConfig:
    """``full``: the shipped model (about an hour on 2 CPU cores); ``tiny``: seconds, for tests."""
    if preset == "full":
        return TrainConfig()
    if preset == "tiny":
        return TrainConfig(
            image_size=32, pool_size=16, eval_size=4, log_every=1, eval_every=100, ckpt_every=3,
            gen_samples=2, gen_steps=2,
            vae=VAEStage(block_out_channels=(8, 8), norm_num_groups=4, crop=16, batch_size=4,
                         steps=6, lr=3e-3, warmup=1),
            diffusion=DiffusionStage(clip_hidden=8, clip_layers=1, clip_intermediate=16,
                                     unet_channels=(8,), unet_groups=4, unet_heads=2,
                                     unet_down=("CrossAttnDownBlock2D",),
                                     unet_up=("CrossAttnUpBlock2D",),
                                     batch_size=4, steps=6, lr=3e-3, warmup=1, ema_decay=0.5))
    raise ValueError(f"unknown preset {preset!r} (full, tiny)")


def fingerprint(cfg: TrainConfig, stage: str = "all") -> str:
    """Hash of the fields that determine a stage's result (not logging or the final check).

    ``data``: the training pool; ``vae``: the autoencoder (so a new diffusion config reuses a
    finished autoencoder checkpoint); ``all``: everything that ships.
    """
    key = {"data": (cfg.image_size, cfg.pool_size),
           "vae": (cfg.seed, cfg.image_size, cfg.pool_size, cfg.vae),
           "all": (cfg.seed, cfg.image_size, cfg.pool_size, cfg.vae, cfg.diffusion)}[stage]
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def network_configs(cfg: TrainConfig, scaling_factor: float = 1.0):
    """The frozen network configs (p2l_jax dataclasses) the training builds and ships."""
    v, d = cfg.vae, cfg.diffusion
    n = len(v.block_out_channels)
    vae = VAEConfig(block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
                    down_block_types=("DownEncoderBlock2D",) * n,
                    up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=v.norm_num_groups,
                    latent_channels=v.latent_channels, scaling_factor=float(scaling_factor),
                    sample_size=cfg.image_size)
    unet = UNetConfig(in_channels=v.latent_channels, out_channels=v.latent_channels,
                      block_out_channels=d.unet_channels, down_block_types=d.unet_down,
                      up_block_types=d.unet_up, layers_per_block=d.unet_layers_per_block,
                      attention_head_dim=d.unet_heads, cross_attention_dim=d.clip_hidden,
                      norm_num_groups=d.unet_groups,
                      sample_size=cfg.image_size // vae.downscale_factor)
    text = CLIPTextConfig(hidden_size=d.clip_hidden, intermediate_size=d.clip_intermediate,
                          num_hidden_layers=d.clip_layers, num_attention_heads=d.clip_heads)
    return vae, unet, text


# ----------------------------------------------------------------------------- data
def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round((images + 1.0) * 127.5).astype(np.uint8)


def to_float(images) -> jax.Array:
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def image_pool(indices: np.ndarray, size: int, cache: Path | None, log) -> tuple[np.ndarray, list]:
    """uint8 images (N, S, S, 3) and captions of dataset ``indices`` (cached in ``cache``)."""
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            return f["images"], [str(c) for c in f["captions"]]
    t0, images, caps = time.time(), [], []
    for start in range(0, len(indices), 1000):
        x, c, _ = draw_batch(indices[start:start + 1000], size)
        images.append(to_uint8(x))
        caps += c
        log(f"data: drew {start + len(c)}/{len(indices)} images ({time.time() - t0:.0f}s)")
    images = np.concatenate(images)
    if cache is not None:
        atomic_savez(cache, images=images, captions=np.array(caps))
    return images, caps


def caption_table(tokenizer, max_length: int = 77) -> tuple[np.ndarray, dict]:
    """Token ids of every caption plus "" as the last row, and caption -> row."""
    caps = all_captions()
    ids = tokenize(tokenizer, caps + [""], max_length=max_length)
    return ids, {c: i for i, c in enumerate(caps)}


def vae_batch(images: np.ndarray, centres: np.ndarray, rng: np.random.Generator, batch: int,
              crop: int) -> np.ndarray:
    """Crops around the shapes (centre + U(-crop/4, crop/4), clipped to the image), with random
    flips / 90-degree turns (uint8, host side): most pixels of a whole image are background."""
    idx = rng.integers(len(images), size=batch)
    s = images.shape[1]
    jitter = rng.integers(-(crop // 4), crop // 4 + 1, size=(batch, 2))
    corner = np.clip(np.round(centres[idx] * s).astype(int) - crop // 2 + jitter, 0, s - crop)
    out = np.stack([images[i, y:y + crop, x:x + crop] for i, (x, y) in zip(idx, corner)])
    out = np.rot90(out, k=int(rng.integers(4)), axes=(1, 2))
    return out[:, :, ::-1] if rng.integers(2) else out


def shape_centres(caps: list) -> np.ndarray:
    """Relative (x, y) anchor of each caption's shape."""
    return np.array([anchor(parse_caption(c)["position"]) for c in caps])


# ----------------------------------------------------------------------------- checkpoints
def atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def save_tree(path: Path, tree, meta: dict) -> None:
    leaves = jax.tree_util.tree_leaves(tree)
    atomic_savez(path, __meta__=np.array(json.dumps(meta)),
                 **{f"a{i}": np.asarray(x) for i, x in enumerate(leaves)})


def load_tree(path: Path, template, fp: str):
    """(tree, meta) from ``path`` if it exists and was written by the same config, else None."""
    if not path.is_file():
        return None
    with np.load(path) as f:
        meta = json.loads(str(f["__meta__"]))
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if meta.get("fingerprint") != fp or len(f.files) != len(leaves) + 1:
            return None
        new = [jnp.asarray(f[f"a{i}"], dtype=x.dtype) for i, x in enumerate(leaves)]
    if any(a.shape != b.shape for a, b in zip(new, leaves)):
        return None
    return jax.tree_util.tree_unflatten(treedef, new), meta


# ----------------------------------------------------------------------------- losses
def vae_loss(params, graphdef, x, key, stage: VAEStage):
    """L_vae of the module docstring; returns (loss, PSNR of the batch's reconstructions)."""
    vae = nnx.merge(graphdef, params)
    mean, logvar = vae.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    x_hat = vae.decode(z)
    err = x_hat - x
    l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(err ** 2)
    grad = (jnp.mean(jnp.abs(jnp.diff(err, axis=1))) + jnp.mean(jnp.abs(jnp.diff(err, axis=2))))
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    loss = l1 + stage.l2_weight * l2 + stage.grad_weight * grad + stage.kl_weight * kl
    return loss, psnr(x_hat, x)


def psnr(x_hat, x):
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2), x_hat clipped to the range."""
    return jnp.mean(metrics.psnr(jnp.clip(x_hat, -1, 1), x))


def diffusion_loss(params, graphdefs, batch, key, alphas_cumprod, stage: DiffusionStage,
                   null_ids):
    """L_ddpm of the module docstring; returns (loss, unweighted eps MSE)."""
    unet = nnx.merge(graphdefs["unet"], params["unet"])
    text = nnx.merge(graphdefs["text_encoder"], params["text_encoder"])
    mean, std, ids, scale = batch["mean"], batch["std"], batch["ids"], batch["scale"]
    k_z, k_t, k_eps, k_drop = jax.random.split(key, 4)
    b = mean.shape[0]
    z0 = scale * (mean + std * jax.random.normal(k_z, mean.shape))
    z_t, t, eps = ddpm_noised(z0, k_t, k_eps, alphas_cumprod)
    drop = jax.random.bernoulli(k_drop, stage.caption_dropout, (b, 1))
    C = text(jnp.where(drop, null_ids[None], ids))
    mse = jnp.mean((unet(z_t, t, C) - eps) ** 2, axis=(1, 2, 3))
    return min_snr_loss(mse, t, alphas_cumprod, stage.min_snr_gamma)


def ddpm_noised(x0, k_t, k_eps, alphas_cumprod):
    """(x_t, t, eps): t ~ U{0..T-1} (key k_t), eps ~ N(0, I) (key k_eps), x_t = sqrt(ab_t) x0 +
    sqrt(1 - ab_t) eps. Shared by both scripts' diffusion losses (latents here, images in
    train_pixel_model.py)."""
    t = jax.random.randint(k_t, (x0.shape[0],), 0, alphas_cumprod.shape[0])
    eps = jax.random.normal(k_eps, x0.shape)
    ab = alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps, t, eps


def min_snr_loss(mse, t, alphas_cumprod, gamma: float):
    """(mean_b w_t mse_b, mean_b mse_b) of per-sample eps MSEs: min-SNR weights
    w_t = min(SNR_t, gamma) / SNR_t, SNR_t = ab_t / (1 - ab_t); gamma 0 gives w_t = 1."""
    if gamma > 0:
        snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
        weight = jnp.minimum(snr, gamma) / snr
    else:
        weight = jnp.ones_like(mse)
    return jnp.mean(weight * mse), jnp.mean(mse)


# ----------------------------------------------------------------------------- training loop
def optimizer(lr: float, warmup: int, steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to 5% of ``lr``, gradients clipped at norm 1."""
    warmup = max(1, min(warmup, steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                  end_value=lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def train(name, loss_fn, params, steps, opt, batch_fn, key, ckpt: Path, fp, cfg: TrainConfig,
          log, ema_decay=None, eval_fn=None, metric_name="metric"):
    """Run ``steps`` optimizer steps of ``loss_fn(params, batch, key) -> (loss, metric)``.

    Resumes from ``ckpt`` (same config fingerprint) and saves it every ``cfg.ckpt_every`` steps.
    Returns the final (EMA if ``ema_decay``) parameters and a history of logged losses.
    """
    carry = {"params": params, "opt": opt.init(params),
             "ema": params if ema_decay else None, "step": jnp.zeros((), jnp.int32)}
    history: list = []
    restored = load_tree(ckpt, carry, fp)
    if restored is not None:
        carry, meta = restored
        history = meta.get("history", [])
        log(f"{name}: resumed from {ckpt} at step {int(carry['step'])}")

    @jax.jit
    def step(carry, batch, key):
        (loss, metric), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            carry["params"], batch, key)
        updates, opt_state = opt.update(grads, carry["opt"], carry["params"])
        params = optax.apply_updates(carry["params"], updates)
        ema = carry["ema"]
        if ema_decay:  # warm-up of the decay as in diffusers' EMAModel
            n = carry["step"].astype(jnp.float32) + 1.0
            d = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
            ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return {"params": params, "opt": opt_state, "ema": ema, "step": carry["step"] + 1}, \
            loss, metric

    start, t0 = int(carry["step"]), time.time()
    losses, metrics = [], []
    if eval_fn is not None and start == 0:
        history.append({"step": 0, "eval": eval_fn(carry["params"])})
        log(f"{name}: step 0 eval {history[-1]['eval']}")
    for i in range(start, steps):
        carry, loss, metric = step(carry, batch_fn(i), jax.random.fold_in(key, i))
        losses.append(float(loss))
        metrics.append(float(metric))
        done = i + 1
        if done % cfg.log_every == 0 or done == steps:
            elapsed = time.time() - t0
            eta = elapsed / (done - start) * (steps - done)
            entry = {"step": done, "loss": float(np.mean(losses)),
                     metric_name: float(np.mean(metrics))}
            history.append(entry)
            log(f"{name}: step {done}/{steps} loss {entry['loss']:.5f} {metric_name} "
                f"{entry[metric_name]:.4f} elapsed {elapsed:.0f}s eta {eta:.0f}s")
            losses, metrics = [], []
        if eval_fn is not None and (done % cfg.eval_every == 0 or done == steps):
            shipped = carry["ema"] if ema_decay else carry["params"]
            history.append({"step": done, "eval": eval_fn(shipped)})
            log(f"{name}: step {done} eval {history[-1]['eval']}")
        if done % cfg.ckpt_every == 0 or done == steps:
            save_tree(ckpt, carry, {"fingerprint": fp, "history": history})
    return (carry["ema"] if ema_decay else carry["params"]), history


# ----------------------------------------------------------------------------- stages
def init_networks(builders: dict, seed: int) -> tuple[dict, dict]:
    """Randomly initialised networks ``{name: graphdef}, {name: params}``, drawn with numpy.

    Shapes come from ``nnx.eval_shape``; the values follow flax's defaults up to truncation:
    kernels N(0, 1 / fan_in) (fan_in = all axes but the last), embeddings N(0, 1 / features),
    norm scales 1, biases 0. (Eager flax initialisation compiles every initializer for every
    shape: seconds per network on a CPU, most of the tiny preset's time.)
    """
    rng = np.random.default_rng(seed)
    graphdefs, params = {}, {}
    for name, build in builders.items():
        graphdefs[name], abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
        leaves = []
        for path, var in nnx.to_flat_state(abstract):
            shape, leaf = tuple(var.shape), str(path[-1])
            if leaf in ("kernel", "embedding"):
                fan_in = shape[-1] if leaf == "embedding" else int(np.prod(shape[:-1]))
                value = rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)
            else:
                value = np.full(shape, 1.0 if leaf == "scale" else 0.0, np.float32)
            leaves.append((path, var.replace(jnp.asarray(value))))
        params[name] = nnx.from_flat_state(leaves)
    return graphdefs, params


def train_vae(cfg, fp, pool, pool_caps, val_images, workdir, log):
    vae_cfg, _, _ = network_configs(cfg)
    graphdefs, params = init_networks({"vae": lambda r: AutoencoderKL(vae_cfg, rngs=r)},
                                      cfg.seed)
    graphdef, params = graphdefs["vae"], params["vae"]
    st = cfg.vae
    loss_fn = lambda p, x, k: vae_loss(p, graphdef, to_float(x), k, st)
    centres = shape_centres(pool_caps)
    batch_fn = lambda i: vae_batch(pool, centres, np.random.default_rng([cfg.seed, 1, i]),
                                   st.batch_size, st.crop)
    x_val = to_float(val_images)

    @jax.jit
    def eval_fn(p):
        vae = nnx.merge(graphdef, p)
        return psnr(vae.decode(vae.encode(x_val)[0]), x_val)

    params, history = train(
        "vae", loss_fn, params, st.steps, optimizer(st.lr, st.warmup, st.steps), batch_fn,
        jax.random.key(cfg.seed + 1), workdir / "vae_ckpt.npz", fp, cfg, log,
        eval_fn=lambda p: {"psnr_db": round(float(eval_fn(p)), 3)}, metric_name="train_psnr_db")
    return graphdef, params, history


def encode_pool(graphdef, params, images, batch=256):
    """Posterior (mean, std) of every pool image, float32 numpy."""
    enc = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(to_float(x)))
    means, stds = [], []
    for start in range(0, len(images), batch):
        m, lv = enc(params, images[start:start + batch])
        means.append(np.asarray(m))
        stds.append(np.asarray(jnp.exp(0.5 * lv)))
    return np.concatenate(means), np.concatenate(stds)


def scaling_factor_of(mean, std, seed) -> float:
    """s = 1 / std of the posterior samples z = mean + std n over the pool."""
    z = mean + std * np.random.default_rng(seed).standard_normal(mean.shape, np.float32)
    return float(1.0 / z.std())


def train_diffusion(cfg, fp, latents, ids, val, workdir, log):
    _, unet_cfg, text_cfg = network_configs(cfg)
    st = cfg.diffusion
    graphdefs, params = init_networks({
        "unet": lambda r: UNet2DConditionModel(unet_cfg, rngs=r),
        "text_encoder": lambda r: CLIPTextModel(text_cfg, rngs=r)}, cfg.seed + 2)
    ab = jnp.asarray(ScheduleConfig.from_dict(SCHEDULER).alphas_cumprod())
    null = jnp.asarray(ids["null"])
    mean, std, cap_ids, scale = latents

    def loss_fn(p, b, k):
        return diffusion_loss(p, graphdefs, b, k, ab, st, null)

    def batch_fn(i):
        idx = np.random.default_rng([cfg.seed, 2, i]).integers(len(mean), size=st.batch_size)
        return {"mean": mean[idx], "std": std[idx], "ids": cap_ids[idx], "scale": scale}

    key_eval = jax.random.key(cfg.seed + 3)

    @jax.jit
    def eval_fn(p):  # unweighted eps MSE at fixed t, noise, no dropout: comparable over time
        b = {"mean": val[0], "std": jnp.zeros_like(val[0]), "ids": val[1], "scale": scale}
        flat = dataclasses.replace(st, caption_dropout=0.0, min_snr_gamma=0.0)
        return diffusion_loss(p, graphdefs, b, key_eval, ab, flat, null)[1]

    params, history = train(
        "diffusion", loss_fn, params, st.steps, optimizer(st.lr, st.warmup, st.steps),
        batch_fn, jax.random.key(cfg.seed + 4), workdir / "diffusion_ckpt.npz", fp, cfg, log,
        ema_decay=st.ema_decay, eval_fn=lambda p: {"eps_mse": round(float(eval_fn(p)), 5)},
        metric_name="eps_mse")
    return graphdefs, params, history


def generation_check(directory: Path, captions: list, cfg: TrainConfig, key) -> dict:
    """Load the written directory and sample one image per caption with the library's own DDIM
    solver (eta 0, classifier-free guidance ``cfg.guidance``), scored by the attribute checker:
    the check sees exactly what ships, through the same code path users run."""
    from p2l_jax.data.checker import attribute_accuracy
    from p2l_jax.model import load_model
    from p2l_jax.solvers import DDIMConfig, solve

    model = load_model(directory)
    ddim = DDIMConfig(num_steps=cfg.gen_steps, guidance_scale=cfg.guidance)
    result = solve(model, None, None, jax.random.split(key, len(captions)), ddim,
                   embedding=model.text_embeddings(captions))
    return {"samples": len(captions), "ddim_steps": cfg.gen_steps, "guidance": cfg.guidance,
            "attribute_accuracy": attribute_accuracy(np.asarray(result.images), captions)}


# ----------------------------------------------------------------------------- export
def _with_meta(config: dict, class_name: str) -> dict:
    out = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}
    out.update({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})
    return out


def _save_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def write_model(output: Path, cfg: TrainConfig, scaling_factor: float, params: dict) -> Path:
    """Write the diffusers-layout directory into a temporary sibling of ``output``; return it."""
    vae_cfg, unet_cfg, text_cfg = network_configs(cfg, scaling_factor)
    tmp = staging_dir(output, ("unet", "vae", "text_encoder", "scheduler"))
    write = write_json
    write(tmp / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    write(tmp / "scheduler" / "scheduler_config.json", SCHEDULER)
    write(tmp / "unet" / "config.json", _with_meta(dataclasses.asdict(unet_cfg),
                                                    "UNet2DConditionModel"))
    vae_json = _with_meta(dataclasses.asdict(vae_cfg), "AutoencoderKL")
    vae_json.update(act_fn="silu", force_upcast=True)  # fp16 pipelines decode in fp32
    write(tmp / "vae" / "config.json", vae_json)
    tok = load_tokenizer(default_tokenizer_dir())
    write(tmp / "text_encoder" / "config.json", {
        **dataclasses.asdict(text_cfg), "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model", "attention_dropout": 0.0, "initializer_factor": 1.0,
        "initializer_range": 0.02, "projection_dim": text_cfg.hidden_size,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "dtype": "float32",
        "transformers_version": _version("transformers")})
    _save_safetensors(state_to_torch(params["unet"]),
                      tmp / "unet" / "diffusion_pytorch_model.safetensors")
    _save_safetensors(state_to_torch(params["vae"]),
                      tmp / "vae" / "diffusion_pytorch_model.safetensors")
    _save_safetensors({f"text_model.{k}": v for k, v in
                       state_to_torch(params["text_encoder"]).items()},
                      tmp / "text_encoder" / "model.safetensors")
    shutil.copytree(default_tokenizer_dir(), tmp / "tokenizer")
    return tmp


def staging_dir(output: Path, components) -> Path:
    """A fresh temporary sibling of ``output`` with the ``components`` folders, where a model
    directory is written before :func:`publish` renames it into place."""
    output = Path(output).resolve()
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in components:
        (tmp / sub).mkdir(parents=True)
    return tmp


def write_json(path: Path, obj) -> None:
    """A config file as diffusers writes them: indented, sorted keys, final newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def publish(tmp: Path, output: Path) -> None:
    """Rename the finished ``tmp`` directory to ``output`` (replacing an older one)."""
    output = Path(output).resolve()
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- main
def run(cfg: TrainConfig, output: Path, workdir: Path, log=print) -> dict:
    """Train both stages (resuming from ``workdir``), export to ``output``; return the summary."""
    t_start, fp = time.time(), fingerprint(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(
        {"fingerprint": fp, "config": dataclasses.asdict(cfg)}, indent=2))
    log(f"config {fp}: {cfg}")
    pool_idx = split_indices("train", cfg.pool_size)
    pool_cache = workdir / f"pool_{fingerprint(cfg, 'data')}.npz"
    pool, pool_caps = image_pool(pool_idx, cfg.image_size, pool_cache, log)
    val_images, val_caps = image_pool(split_indices("validation", cfg.eval_size),
                                      cfg.image_size, None, log)
    timings = {"data_s": round(time.time() - t_start, 1)}

    t0 = time.time()
    vae_graphdef, vae_params, vae_hist = train_vae(cfg, fingerprint(cfg, "vae"), pool, pool_caps,
                                                   val_images, workdir, log)
    timings["vae_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    mean, std = encode_pool(vae_graphdef, vae_params, pool)
    scale = scaling_factor_of(mean, std, cfg.seed)
    log(f"latents {mean.shape}: scaling_factor = 1/std = {scale:.5f}")
    tokenizer = load_tokenizer(default_tokenizer_dir())
    table, row = caption_table(tokenizer)
    cap_ids = table[[row[c] for c in pool_caps]]
    val_mean = encode_pool(vae_graphdef, vae_params, val_images)[0]
    val_ids = jnp.asarray(table[[row[c] for c in val_caps]])
    diff_graphdefs, diff_params, diff_hist = train_diffusion(
        cfg, fp, (mean, std, cap_ids, np.float32(scale)), {"null": table[-1]},
        (jnp.asarray(val_mean), val_ids), workdir, log)
    timings["diffusion_s"] = round(time.time() - t0, 1)

    summary = {
        "seed": cfg.seed, "fingerprint": fp, "config": dataclasses.asdict(cfg),
        "scaling_factor": scale, "timings": timings,
        "vae": {"history": vae_hist}, "diffusion": {"history": diff_hist},
        "params": {k: int(sum(x.size for x in jax.tree_util.tree_leaves(p))) for k, p in
                   {"vae": vae_params, **diff_params}.items()},
    }
    tmp = write_model(output, cfg, scale, {"vae": vae_params, **diff_params})
    if cfg.gen_samples:
        t0 = time.time()
        summary["generation"] = generation_check(tmp, val_caps[:cfg.gen_samples], cfg,
                                                 jax.random.key(cfg.seed + 5))
        timings["generation_s"] = round(time.time() - t0, 1)
        log(f"generation check: {summary['generation']}")
    summary["shipped"] = verify(tmp, val_images)
    timings["total_s"] = round(time.time() - t_start, 1)
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["size_bytes"] = directory_size(tmp)
    publish(tmp, output)
    log(f"shipped model: {summary['shipped']}")
    log(f"wrote {output} ({summary['size_bytes'] / 1e6:.2f} MB) in {timings['total_s']:.0f}s")
    return summary


def verify(directory: Path, images: np.ndarray) -> dict:
    """Load the written directory with ``p2l_jax.load_model`` (float16 weights cast to float32)
    and measure the held-out reconstruction PSNR of x -> D(E(x))."""
    from p2l_jax.model import load_model

    model = load_model(directory)
    x = to_float(images)
    recon = jax.jit(lambda m, x: m.decode(m.encode(x)))(model, x)
    return {"vae_psnr_db": round(float(psnr(recon, x)), 3), "eval_images": int(len(images))}


def command_line(description: str, name: str) -> argparse.ArgumentParser:
    """The options both training scripts take: --output, --preset, --workdir (default
    ``runs/<name>_<preset>``; :func:`workdir_of`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", type=Path, required=True, help="model directory to write")
    parser.add_argument("--preset", default="full", choices=("full", "tiny"))
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"checkpoints and data cache (default runs/{name}_<preset>)")
    return parser


def workdir_of(args, name: str) -> Path:
    return args.workdir or Path(__file__).resolve().parents[1] / "runs" / f"{name}_{args.preset}"


def timestamped(msg: str) -> None:
    """The scripts' log: one line with the wall-clock time, flushed (runs last hours)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    args = command_line(__doc__.split("\n")[0], "train_embedded").parse_args(argv)
    run(get_config(args.preset), args.output, workdir_of(args, "train_embedded"), timestamped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
