"""p2l-jax: P2L and its baselines for imaging inverse problems with latent diffusion priors.

Submodules are imported on first use so that ``import p2l_jax`` stays cheap and never
imports torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY_ATTRS = {
    "load_model": ("p2l_jax.model", "load_model"),
    "LatentDiffusionModel": ("p2l_jax.model", "LatentDiffusionModel"),
    "P2LError": ("p2l_jax.errors", "P2LError"),
    "P2LPipeline": ("p2l_jax.pipeline", "P2LPipeline"),
}
_LAZY_MODULES = {"models", "operators", "solvers", "schedule", "weights", "parallel", "metrics", "imageio",
                 "pipeline", "cli", "model", "errors", "data"}


def __getattr__(name: str):
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(module), attr)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"p2l_jax.{name}")
    raise AttributeError(f"module 'p2l_jax' has no attribute {name!r}")
