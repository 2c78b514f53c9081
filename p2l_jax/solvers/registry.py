"""Every solver, one line each: its CLI name, config class, step function, and whether it
needs an operator and a measurement y. A new solver is a config, a step module and a line here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from p2l_jax.errors import P2LError
from p2l_jax.solvers import ddim_sampling, dps, gml_dps, ldps, p2l, psld
from p2l_jax.solvers.configs import DDIMConfig, GMLDPSConfig, LDPSConfig, P2LConfig, PSLDConfig


class Solver(NamedTuple):
    name: str          # --solver NAME
    config: type       # its frozen config class
    step: Callable     # step(problem, state, inp) -> (state, record)
    measured: bool     # needs an operator and a measurement y


SOLVERS = (
    Solver("p2l", P2LConfig, p2l.step, measured=True),
    Solver("ldps", LDPSConfig, ldps.step, measured=True),
    Solver("gml-dps", GMLDPSConfig, gml_dps.step, measured=True),
    Solver("psld", PSLDConfig, psld.step, measured=True),
    Solver("ddim", DDIMConfig, ddim_sampling.step, measured=False),
    Solver("dps", dps.DPSConfig, dps.step, measured=True),
)

BY_NAME = {s.name: s for s in SOLVERS}
_BY_CONFIG = {s.config: s for s in SOLVERS}


def solver_of(config_class: type) -> Solver:
    """The registry entry of a config class (P2LError for anything else)."""
    if config_class not in _BY_CONFIG:
        raise P2LError(f"option config: {config_class.__name__} is not a solver config; "
                       f"known: {', '.join(s.config.__name__ for s in SOLVERS)}")
    return _BY_CONFIG[config_class]
