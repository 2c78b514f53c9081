"""Solver options of ``p2l-jax restore``: ``--solver`` names, and ``--set FIELD=VALUE``
overrides of any field of the frozen solver config (nested ``FIELD.SUBFIELD=VALUE`` for the
optimizer), parsed as the field's declared type by the library's one override parser
(:mod:`p2l_jax.overrides`, shared with settings grids and the benchmark harnesses)."""

from __future__ import annotations

import dataclasses

from p2l_jax.errors import P2LError
from p2l_jax.overrides import apply_assignment
from p2l_jax.solvers.registry import BY_NAME

#: --solver NAME -> registry entry: the solvers that restore a measurement.
SOLVERS = {name: solver for name, solver in BY_NAME.items() if solver.measured}


def default_steps_help() -> str:
    """``--steps`` help: the default is the solver config's ``num_steps``."""
    defaults = sorted({f.default for solver in SOLVERS.values()
                       for f in dataclasses.fields(solver.config) if f.name == "num_steps"})
    value = str(defaults[0]) if len(defaults) == 1 else "/".join(map(str, defaults))
    return f"number of sampler steps (default: the solver config's num_steps, {value} [paper])"


#: --preset NAME: "default" is the config class's own defaults (this project's, tuned on the
#: embedded model); "paper" the paper's settings as re-implementations read them, for solvers
#: whose config has a ``paper()`` preset (P2LConfig.paper).
PRESETS = ("default", "paper")


def solver_config(args):
    """The frozen solver config of ``--solver`` and ``--preset`` with ``--steps`` (and
    ``--prompt``), then every ``--set``."""
    cls = SOLVERS[args.solver].config
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {} if args.steps is None else {"num_steps": args.steps}
    if args.prompt is not None:
        if "prompt" not in fields:
            raise P2LError(f"--prompt is not an option of --solver {args.solver}")
        kwargs["prompt"] = args.prompt
    preset = getattr(args, "preset", "default")
    if preset == "paper" and not hasattr(cls, "paper"):
        raise P2LError(f"--preset paper: --solver {args.solver} has no paper preset (only "
                       f"{', '.join(n for n, s in SOLVERS.items() if hasattr(s.config, 'paper'))})")
    config = cls.paper(**kwargs) if preset == "paper" else cls(**kwargs)
    for item in args.overrides:
        config = apply_assignment(config, item, option="--set", owner=f"--solver {args.solver}")
    return config
