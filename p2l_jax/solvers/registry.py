"""Solver config class -> step function. A new solver is a config, a step, and one line here."""

from p2l_jax.solvers import ddim_sampling, dps, gml_dps, ldps, p2l, psld
from p2l_jax.solvers.configs import DDIMConfig, GMLDPSConfig, LDPSConfig, P2LConfig, PSLDConfig

SOLVERS = {
    P2LConfig: p2l.step,
    LDPSConfig: ldps.step,
    GMLDPSConfig: gml_dps.step,
    PSLDConfig: psld.step,
    DDIMConfig: ddim_sampling.step,
    dps.DPSConfig: dps.step,
}

#: Solvers that need an operator and a measurement y.
MEASURED = (P2LConfig, LDPSConfig, GMLDPSConfig, PSLDConfig, dps.DPSConfig)

#: Short names (the CLI's --solver) -> config class.
NAMES = {"p2l": P2LConfig, "ldps": LDPSConfig, "gml-dps": GMLDPSConfig, "psld": PSLDConfig,
         "ddim": DDIMConfig, "dps": dps.DPSConfig}
