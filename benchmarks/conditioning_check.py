"""Which caption words does the UNet use? Noise-prediction loss with one attribute swapped.

    python -m benchmarks.conditioning_check [--model DIR] [--n 64] [--timesteps 100 300 ...]

For ``n`` validation-split images of :mod:`p2l_jax.data` (latents z0 = E(x)) and each
timestep t, one noise draw eps gives z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps, and the table
reports the mean ``||eps_theta(z_t, t, C) - eps||^2`` per element for C the embedding of

* the true caption,
* the caption with one attribute replaced by the next word of its list (per attribute),
* the null prompt "".

A word the network uses raises the loss when swapped; a column equal to "true" means the
network ignores that word at that noise level (the caption embedding itself does change).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from p2l_jax import data


def swapped(attributes: dict, name: str | None) -> dict:
    """``attributes`` with ``name`` replaced by the next word of its list (None: unchanged)."""
    if name is None:
        return attributes
    words = data.ATTRIBUTES[name]
    return {**attributes, name: words[(words.index(attributes[name]) + 1) % len(words)]}


def losses(model, images, attributes, timesteps, seed: int = 0) -> dict:
    """{column: [loss at each t]} with columns true, each attribute, null."""
    z0 = model.encode(jnp.asarray(images))
    eps_fn = jax.jit(lambda m, z, t, C: m.eps(z, t, C))
    columns = {"true": None, **{a: a for a in data.ATTRIBUTES}, "null": "null"}
    embeddings = {}
    for column, name in columns.items():
        prompts = ([""] * len(images) if name == "null" else
                   [data.caption_of(swapped(a, name)) for a in attributes])
        embeddings[column] = model.text_embeddings(prompts)
    out = {c: [] for c in columns}
    for t in timesteps:
        eps = jax.random.normal(jax.random.fold_in(jax.random.key(seed), t), z0.shape)
        ab = model.alphas_cumprod[t]
        z_t = jnp.sqrt(ab) * z0 + jnp.sqrt(1 - ab) * eps
        tt = jnp.full((z0.shape[0],), t)
        for column, C in embeddings.items():
            out[column].append(float(jnp.mean((eps_fn(model, z_t, tt, C) - eps) ** 2)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from p2l_jax.model import load_model

    model = load_model(args.model)
    indices = data.split_indices("validation", args.n)
    images, _, attributes = data.batch(indices, model.image_size)
    table = losses(model, images, attributes, args.timesteps, args.seed)
    print(f"eps-prediction MSE, {args.n} validation images, one noise draw per t "
          f"(model {args.model or 'embedded'})\n")
    print("| t | " + " | ".join(table) + " |")
    print("|---" * (len(table) + 1) + "|")
    for i, t in enumerate(args.timesteps):
        print(f"| {t} | " + " | ".join(f"{table[c][i]:.4f}" for c in table) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
