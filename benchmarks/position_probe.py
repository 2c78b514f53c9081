"""Why does the model ignore position words? Three probes of where position information is.

    python -m benchmarks.position_probe [--model DIR] [--output DIR] [--quick]
        [--finetune-steps 600] [--results-md docs/RESULTS.md]

1. **Readout from z_t.** How much of the position can be read from the noisy latent alone?
   Dataset latents z0 = E(x) (train split), ``z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps``;
   features: per channel, the means of z_t and z_t^2 over each cell of a ``grid`` x ``grid``
   partition; a linear discriminant (class means, shared within-class covariance, standardised
   features) fitted on ``n_fit`` latents and scored on ``n_score`` others. Chance is 1/5. A
   linear readout is a lower bound on what a network can read; where it is at chance, the
   caption is the main source of the object's position.
2. **Predicted layout.** For each position word (every colour, the other attributes fixed) and
   ``n_noise`` draws, the clean-latent prediction from a pure-noise input at timestep t,
   ``x0_hat = (z - sqrt(1 - ab_t) eps_theta(z, t, C)) / sqrt(ab_t)``, ``z = sqrt(1 - ab_t) eps``,
   is decoded and averaged; the centroid of its deviation from its border colour is reported
   in pixels from the image centre, next to the dataset's anchor for that word. A network
   that uses the word moves the centroid toward the anchor.
3. **Fine-tuning at high noise** (``--finetune-steps N > 0``). If position is ignored because
   the epsilon loss weighs content errors at high noise by SNR_t (about 0.01 there), training
   on the x0 loss ``||x0_hat - z0||^2`` at t in [``finetune_t_min``, T) should fix it. The UNet
   and text encoder are fine-tuned that way (Adam, batch ``finetune_batch``, train-split
   latents) and probe 2 is repeated; the shipped model is not changed.

Writes ``position_probe.json`` / ``.md`` to ``--output`` (``--results-md`` also updates that
file's ``position_probe`` section).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import quality
from p2l_jax import data
from p2l_jax.data.shapes import anchor

NAME = "position_probe"
POSITIONS = data.ATTRIBUTES["position"]
#: Attributes held fixed in the layout probe (colour varies over every colour).
LAYOUT_BASE = {"size": "large", "texture": "solid", "shape": "square", "background": "dark"}


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Sizes of the three probes (module docstring)."""

    n_fit: int = 2000
    n_score: int = 1000
    grid: int = 4
    readout_timesteps: tuple[int, ...] = (999, 900, 800, 600, 400, 200)
    layout_timesteps: tuple[int, ...] = (999, 900)
    n_noise: int = 8
    finetune_steps: int = 0
    finetune_t_min: int = 900
    finetune_lr: float = 1e-3
    finetune_batch: int = 32
    finetune_pool: int = 4000


def get_config(quick: bool = False) -> ProbeConfig:
    if quick:
        return ProbeConfig(n_fit=200, n_score=100, readout_timesteps=(999, 400), n_noise=2,
                           finetune_pool=64)
    return ProbeConfig()


# ---- probe 1: linear readout of position from z_t ------------------------------------
def pooled_features(z: np.ndarray, grid: int) -> np.ndarray:
    """Per channel, the mean of z and of z^2 over each cell of a grid x grid partition of
    (B, H, W, C) latents (H, W divisible by grid): (B, 2 * grid^2 * C)."""
    b, h, w, c = z.shape
    if h % grid or w % grid:
        raise ValueError(f"latent side {h}x{w} is not divisible by grid {grid}")
    cells = z.reshape(b, grid, h // grid, grid, w // grid, c)
    return np.concatenate([cells.mean((2, 4)).reshape(b, -1),
                           (cells ** 2).mean((2, 4)).reshape(b, -1)], axis=1)


def lda_accuracy(f_fit: np.ndarray, y_fit: np.ndarray, f_score: np.ndarray,
                 y_score: np.ndarray, ridge: float = 1e-3) -> float:
    """Accuracy of a linear discriminant (class means, shared covariance + ridge * I) fitted
    on standardised ``f_fit`` and applied to ``f_score``."""
    mu, sd = f_fit.mean(0), f_fit.std(0) + 1e-8
    f_fit, f_score = (f_fit - mu) / sd, (f_score - mu) / sd
    classes = np.unique(y_fit)
    means = np.stack([f_fit[y_fit == k].mean(0) for k in classes])
    centred = f_fit - means[np.searchsorted(classes, y_fit)]
    cov = centred.T @ centred / max(len(f_fit) - len(classes), 1) + ridge * np.eye(f_fit.shape[1])
    w = np.linalg.solve(cov, means.T)                         # (F, K)
    scores = f_score @ w - 0.5 * np.sum(means * w.T, axis=1)
    return float(np.mean(classes[scores.argmax(1)] == y_score))


def readout(z0: np.ndarray, labels: np.ndarray, alphas_cumprod, cfg: ProbeConfig,
            seed: int) -> dict[int, float]:
    """{t: held-out accuracy of the position readout from z_t} (probe 1)."""
    rng = np.random.default_rng(seed)
    ab_all = np.asarray(alphas_cumprod, np.float64)
    fit, score = slice(0, cfg.n_fit), slice(cfg.n_fit, cfg.n_fit + cfg.n_score)
    out = {}
    for t in cfg.readout_timesteps:
        ab = ab_all[t]
        z_t = np.sqrt(ab) * z0 + np.sqrt(1 - ab) * rng.standard_normal(z0.shape)
        f = pooled_features(z_t, cfg.grid)
        out[t] = lda_accuracy(f[fit], labels[fit], f[score], labels[score])
    return out


# ---- probe 2: where the predicted x0 puts the shape -----------------------------------
def centroid(image: np.ndarray) -> tuple[float, float]:
    """(x, y) in pixels from the image centre of |image - border colour| summed over channels
    (border colour: the median of the outermost rows and columns)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    weight = np.abs(image - np.median(border, axis=0)).sum(-1)
    h, w = weight.shape
    ys, xs = np.mgrid[:h, :w]
    total = weight.sum()
    if total == 0:
        return 0.0, 0.0
    return (float((weight * xs).sum() / total - (w - 1) / 2),
            float((weight * ys).sum() / total - (h - 1) / 2))


@jax.jit
def _x0_from_noise(model, eps, t, C):
    ab = model.alphas_cumprod[t]
    z = jnp.sqrt(1 - ab) * eps
    x0 = (z - jnp.sqrt(1 - ab) * model.eps(z, t, C)) / jnp.sqrt(ab)
    return model.decode(x0).mean(0)


def layout(model, cfg: ProbeConfig, seed: int) -> dict[int, dict[str, list[float]]]:
    """{t: {position word: centroid (x, y) px}} of the mean decoded x0 prediction (probe 2)."""
    colors = data.ATTRIBUTES["color"]
    s = model.sample_size
    shape = (cfg.n_noise * len(colors), s, s, model.latent_channels)
    out = {}
    for t in cfg.layout_timesteps:
        eps = jax.random.normal(jax.random.fold_in(jax.random.key(seed), t), shape)
        out[t] = {}
        for word in POSITIONS:
            caps = [data.caption_of({**LAYOUT_BASE, "color": c, "position": word})
                    for c in colors for _ in range(cfg.n_noise)]
            image = _x0_from_noise(model, eps, jnp.asarray(t, jnp.int32),
                                   model.text_embeddings(caps))
            out[t][word] = list(centroid(np.asarray(image)))
    return out


def anchors_px(image_size: int) -> dict[str, list[float]]:
    """The dataset's anchor of each position word, pixels from the image centre."""
    return {w: [(a - 0.5) * image_size for a in anchor(w)] for w in POSITIONS}


# ---- probe 3: fine-tune on the x0 loss at high noise ----------------------------------
def finetune(model, z0: np.ndarray, ids: np.ndarray, cfg: ProbeConfig, seed: int, log=print):
    """The model with its UNet and text encoder trained ``finetune_steps`` Adam steps on
    ``mean ||x0_hat(z_t, t, C) - z0||^2``, t ~ U{t_min..T-1}; returns (model, losses)."""
    names = ("unet", "text_encoder")
    trainable = {k: model.params[k] for k in names}
    T = model.alphas_cumprod.shape[0]

    _, static = model.tree_flatten()

    def with_params(p):
        return type(model).tree_unflatten(static, ({**model.params, **p}, model.alphas_cumprod))

    def loss_fn(p, z0b, idb, key):
        m = with_params(p)
        k_t, k_eps = jax.random.split(key)
        t = jax.random.randint(k_t, (z0b.shape[0],), cfg.finetune_t_min, T)
        eps = jax.random.normal(k_eps, z0b.shape)
        ab = m.alphas_cumprod[t][:, None, None, None]
        z_t = jnp.sqrt(ab) * z0b + jnp.sqrt(1 - ab) * eps
        x0 = (z_t - jnp.sqrt(1 - ab) * m.eps(z_t, t, m.encode_text(idb))) / jnp.sqrt(ab)
        return jnp.mean((x0 - z0b) ** 2)

    opt = optax.adam(cfg.finetune_lr)

    @jax.jit
    def step(p, state, z0b, idb, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, z0b, idb, key)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state, rng, losses = opt.init(trainable), np.random.default_rng(seed), []
    for i in range(cfg.finetune_steps):
        b = rng.integers(len(z0), size=cfg.finetune_batch)
        trainable, state, loss = step(trainable, state, jnp.asarray(z0[b]), jnp.asarray(ids[b]),
                                      jax.random.fold_in(jax.random.key(seed), i))
        losses.append(float(loss))
        if (i + 1) % 100 == 0 or i + 1 == cfg.finetune_steps:
            log(f"finetune step {i + 1}/{cfg.finetune_steps}: x0 loss "
                f"{np.mean(losses[-100:]):.4f}")
    return with_params(trainable), losses


# ---- driver ---------------------------------------------------------------------------
def latents(model, n: int, batch: int = 500) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """E(x) of the first n train-split images, their position labels and captions."""
    images, captions, attrs = data.batch(data.split_indices("train", n), model.image_size)
    z0 = np.concatenate([np.asarray(model.encode(jnp.asarray(images[i:i + batch])))
                         for i in range(0, n, batch)])
    labels = np.array([POSITIONS.index(a["position"]) for a in attrs])
    return z0, labels, captions


def run(model, cfg: ProbeConfig, seed: int, log=print) -> dict:
    n = max(cfg.n_fit + cfg.n_score, cfg.finetune_pool if cfg.finetune_steps else 0)
    z0, labels, captions = latents(model, n)
    result = {"readout": readout(z0, labels, model.alphas_cumprod, cfg, seed),
              "anchors": anchors_px(model.image_size), "layout": layout(model, cfg, seed)}
    log(f"readout {result['readout']}")
    if cfg.finetune_steps:
        pool = slice(0, cfg.finetune_pool)
        tuned, losses = finetune(model, z0[pool], model.tokenize(captions[pool]), cfg, seed, log)
        result["finetune"] = {"layout": layout(tuned, cfg, seed),
                              "loss_first_100": float(np.mean(losses[:100])),
                              "loss_last_100": float(np.mean(losses[-100:]))}
    return result


def _layout_lines(title: str, table: dict, anchors: dict) -> list[str]:
    ts = list(table)
    lines = [title, "", "| position word | dataset anchor | " +
             " | ".join(f"x0_hat centroid, t={t}" for t in ts) + " |", "|---" * (len(ts) + 2) + "|"]
    for word in POSITIONS:
        cells = [f"({table[t][word][0]:+.1f}, {table[t][word][1]:+.1f})" for t in ts]
        a = anchors[word]
        lines.append(f"| {word} | ({a[0]:+.1f}, {a[1]:+.1f}) | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(record: dict) -> str:
    cfg = record["config"]
    extra = [f"model `{quality.model_label(record)}`, seed {record['seed']}, "
             f"wall time {record['timing']['total_s'] / 60:.1f} min"]
    lines = quality.header("Position probe: where the model gets an object's position",
                           record["command"], record["machine"], extra)
    r = record["readout"]
    lines += [f"Linear readout of position (5 words, chance 0.20) from pooled z_t features "
              f"({cfg['grid']}x{cfg['grid']} cells; fitted on {cfg['n_fit']} train latents, "
              f"scored on {cfg['n_score']}):", "",
              "| t | " + " | ".join(str(t) for t in r) + " |", "|---" * (len(r) + 1) + "|",
              "| accuracy | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |", ""]
    lines += _layout_lines(f"Centroid (pixels from the centre, x right, y down) of the mean "
                           f"decoded x0 prediction from pure noise, {cfg['n_noise']} draws x 6 "
                           "colours per word:", record["layout"], record["anchors"])
    if "finetune" in record:
        f = record["finetune"]
        lines += _layout_lines(
            f"After fine-tuning the UNet and text encoder for {cfg['finetune_steps']} Adam steps "
            f"(lr {cfg['finetune_lr']:g}, batch {cfg['finetune_batch']}) on the x0 loss at "
            f"t >= {cfg['finetune_t_min']} (loss {f['loss_first_100']:.4f} over the first 100 "
            f"steps, {f['loss_last_100']:.4f} over the last 100):", f["layout"],
            record["anchors"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.add_common_arguments(p, "results/position", NAME)
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="run probe 3 with this many steps (default: 0, skipped)")
    args = p.parse_args(argv)
    cfg = get_config(args.quick)
    if args.finetune_steps is not None:
        if args.finetune_steps < 0:
            p.error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
        cfg = dataclasses.replace(cfg, finetune_steps=args.finetune_steps)
    start = time.perf_counter()
    model = quality.setup(args)
    result = run(model, cfg, args.seed)
    record = {"command": quality.command_line(argv, "benchmarks.position_probe"),
              "machine": quality.machine(), "model": args.model,
              "model_digest": quality.model_digest(str(args.model)), "seed": args.seed,
              "config": cfg, **result, "timing": {"total_s": time.perf_counter() - start}}
    quality.write_outputs(args.output, NAME, record, markdown(quality.plain(record)),
                          args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
