"""Settings sweeps in ONE compiled program: the solver vmapped over its settings.

    out = sweep(model, op, y, key, P2LConfig(num_steps=25),
                grid={"rho": [0.1, 0.3, 1.0], "lam": [0.01, 0.1]})   # 6 points
    out.points[p]            # {"rho": 0.1, "lam": 0.01}, ...
    out.results.images[p]    # (B, H, W, 3) restored with point p's settings

``grid`` is either a mapping name -> values, meaning the cartesian product (the last name
varies fastest), or a sequence of mappings, the points themselves (a coordinate sweep, a
list of chosen pairs). Names are the config's fields (``rho``, ``lam``, ``project_every``,
``eta``, ``omega``, ...) and ``optimizer.NAME`` for the prompt optimizer's (``--set``'s
syntax). Each point is the base config with its values replaced, validated by the config
class; every point must have the base's structure (num_steps, gradient, K, ...), since one
structure is one program (P2LError naming the field otherwise).

The settings that differ between points get a leading axis P (settings shared by all points
stay unbatched) and the run maps over them (:func:`p2l_jax.solvers.program.sweep_whole`).
Each point sees the same y, keys (so the same z_T and noise) and C0 as a separate ``solve``
with its config. Two ways, one compiled program each:

* ``batched=True`` (default): ``vmap`` over the points, which run as one P-times bigger batch
  (P times a solve's memory; the parallel hardware sees P B samples at once). Numbers equal
  separate solves up to float32's batch-size rounding: XLA blocks the convolutions of a
  bigger batch differently (on the tiny test model about 1e-5 relative in the images, as a
  solve of a P-times tiled batch differs from a solve of the batch). Sweeping
  ``project_every`` turns the projection's ``lax.cond`` into a select (both branches run).
* ``batched=False``: ``lax.map``, one point after the other with a solve's shapes and memory:
  the same numbers as separate solves (tests: identical), without P - 1 compilations.

Inside a sharded program (e.g. a ``shard_map`` body over the batch), call
:func:`p2l_jax.solvers.program.sweep_whole` with :func:`stack` 's outputs: each shard then
runs all P points on its images.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from p2l_jax.errors import P2LError
from p2l_jax.solvers import program
from p2l_jax.solvers.configs import INPUTS, Structure, split
from p2l_jax.solvers.driver import prepare
from p2l_jax.solvers.program import SolveResult


class SweepResult(NamedTuple):
    """``points`` as given (one dict per point), their validated ``configs``, and
    ``results``: a :class:`SolveResult` whose arrays have the point axis P in front."""

    points: list[dict[str, Any]]
    configs: list
    results: SolveResult

    def point(self, p: int) -> SolveResult:
        """Point p's result, as ``solve`` with ``configs[p]`` returns it."""
        return SolveResult(*(a[p] for a in self.results))


def grid_points(grid) -> list[dict[str, Any]]:
    """The points of a grid: a mapping's cartesian product, or a sequence of mappings as is."""
    if isinstance(grid, Mapping):
        names = list(grid)
        return [dict(zip(names, values)) for values in itertools.product(*grid.values())]
    points = [dict(p) for p in grid]
    if not points or not all(isinstance(p, dict) for p in points):
        raise P2LError("option grid: expected a mapping name -> values or a non-empty "
                       "sequence of mappings")
    return points


def with_values(config, point: Mapping[str, Any]):
    """``config`` with each ``name`` (or ``optimizer.name``) of ``point`` replaced."""
    for name, value in point.items():
        head, _, rest = name.partition(".")
        fields = {f.name for f in dataclasses.fields(config)}
        if head not in fields:
            raise P2LError(f"option grid: {name!r} is not an option of "
                           f"{type(config).__name__}; options: {', '.join(sorted(fields))}")
        if rest:
            inner = getattr(config, head)
            if not dataclasses.is_dataclass(inner):  # e.g. a user's optax transform
                raise P2LError(f"option grid: {name!r}: {head} is a {type(inner).__name__}, "
                               "which has no options to vary")
            value = with_values(inner, {rest: value})
        config = dataclasses.replace(config, **{head: value})
    return config


def stack(configs: Sequence) -> tuple[Structure, Any, tuple[bool, ...]]:
    """(structure, settings, varying) of configs that share one structure: the settings
    leaves that differ between configs stacked on a leading axis P (``varying`` flags them,
    in flattened order), the others taken once."""
    splits = [split(c) for c in configs]
    structure = splits[0][0]
    for config, (s, _) in zip(configs, splits):
        if s != structure:
            changed = [k for (k, a), (_, b) in zip(s.options, structure.options) if a != b]
            field = (changed or ["num_steps"])[0]
            raise P2LError(f"option grid: {field} changes the program ({config!r}); a sweep "
                           "varies settings only, run one sweep per structure")
    treedef = jax.tree_util.tree_structure(splits[0][1])
    columns = zip(*(jax.tree_util.tree_leaves(s) for _, s in splits))
    leaves, varying = [], []
    for column in columns:
        values = np.stack([np.asarray(a) for a in column])
        same = bool((values == values[0]).all())
        leaves.append(jnp.asarray(values[0] if same else values))
        varying.append(not same)
    return structure, jax.tree_util.tree_unflatten(treedef, leaves), tuple(varying)


def sweep(model, operator, y, key, config, grid, *, batched: bool = True, latent_size=None,
          embedding=None, negative_embedding=None) -> SweepResult:
    """Run ``config`` at every point of ``grid`` in one compiled program, vmapped over the
    points (``batched``) or mapped one after the other (module docstring). The other
    arguments are :func:`p2l_jax.solvers.solve`'s."""
    points = grid_points(grid)
    configs = [with_values(config, p) for p in points]
    results = sweep_configs(model, operator, y, key, configs, batched=batched,
                            latent_size=latent_size, embedding=embedding,
                            negative_embedding=negative_embedding)
    return SweepResult(points, configs, results)


def sweep_configs(model, operator, y, key, configs: Sequence, *, batched: bool = True,
                  latent_size=None, embedding=None, negative_embedding=None) -> SolveResult:
    """:func:`sweep` over configs already built (one structure, e.g. from a harness's own
    settings names): their results with the point axis P in front."""
    structure, settings, varying = stack(configs)
    for name in INPUTS:  # text is embedded once, before the program
        if len({getattr(c, name, None) for c in configs}) > 1:
            raise P2LError(f"option grid: {name} differs between points; a sweep varies "
                           "settings only (pass per-image embeddings instead)")
    p = prepare(model, operator, y, key, configs[0], latent_size=latent_size,
                embedding=embedding, negative_embedding=negative_embedding)
    args = (model, operator, p.y, p.keys, p.C0, p.C_neg, settings)
    if not any(varying):  # every point has the same settings (vmap needs one batched input)
        one = program.solve_prepared(*args, structure=structure, latent_shape=p.latent_shape)
        return SolveResult(*(jnp.broadcast_to(a, (len(configs),) + a.shape) for a in one))
    return program.sweep_prepared(*args, structure=structure, latent_shape=p.latent_shape,
                                  varying=varying, batched=batched)
