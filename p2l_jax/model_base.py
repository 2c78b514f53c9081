"""What the model classes share: the pytree protocol and the static facts every solver reads.

A model is a JAX pytree whose children are the arrays (parameter states and alpha_bar) and
whose auxiliary data is one frozen, hashable "static" record (network graph definitions,
configs, schedule, dtype, attention implementation, path). So a model can be an argument of
any jitted function: another model of the same architecture reuses the compiled program.
Subclasses register themselves with ``jax.tree_util.register_pytree_node_class``.
"""

from __future__ import annotations

import jax


class DiffusionModelBase:
    """Parameters ``params`` (a dict of NNX states), ``alphas_cumprod`` (alpha_bar_t for
    t = 0..T-1, float32) and the static record ``_static``."""

    def __init__(self, params: dict, alphas_cumprod: jax.Array, static):
        self.params = params
        self.alphas_cumprod = alphas_cumprod
        self._static = static

    def tree_flatten(self):
        return (self.params, self.alphas_cumprod), self._static

    @classmethod
    def tree_unflatten(cls, static, children):
        params, alphas_cumprod = children
        return cls(params, alphas_cumprod, static)

    unet_config = property(lambda self: self._static.unet_config)
    schedule = property(lambda self: self._static.schedule, doc="The checkpoint's ScheduleConfig.")
    scheduler_config = property(lambda self: self._static.scheduler_config)
    dtype = property(lambda self: self._static.dtype, doc="Parameter and activation dtype.")
    attention = property(lambda self: self._static.attention, doc="Attention implementation name.")
    path = property(lambda self: self._static.path)
