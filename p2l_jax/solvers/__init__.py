"""P2L and its baselines as step functions run by one ``lax.scan`` driver.

    result = p2l_jax.solvers.solve(model, operator, y, key, P2LConfig(num_steps=1000))

* :mod:`.configs`     frozen configs: P2LConfig, LDPSConfig, GMLDPSConfig, PSLDConfig,
                      DDIMConfig, OptimizerConfig
* :mod:`.common`      the step interface and the shared pieces (fidelity, prompt update,
                      projection, DDIM transition); Tweedie and DDIM math in p2l_jax.schedule
* :mod:`.gradients`   gradient variants by name (VARIANTS)
* :mod:`.guided`      the guided step shared by P2L / LDPS / GML-DPS / PSLD
* :mod:`.p2l`, :mod:`.ldps`, :mod:`.gml_dps`, :mod:`.psld`, :mod:`.ddim_sampling`  the steps
* :mod:`.registry`    config class -> step; :mod:`.driver` ``solve``
"""

from p2l_jax.solvers.configs import (DDIMConfig, GMLDPSConfig, LDPSConfig, OptimizerConfig,
                                     P2LConfig, PSLDConfig)
from p2l_jax.solvers.driver import (SolveResult, compiled_programs, gradients_at, per_sample_keys,
                                    solve)
from p2l_jax.solvers.gradients import VARIANTS
from p2l_jax.solvers.registry import NAMES, SOLVERS

__all__ = ["DDIMConfig", "GMLDPSConfig", "LDPSConfig", "OptimizerConfig", "P2LConfig",
           "PSLDConfig", "SolveResult", "compiled_programs", "gradients_at", "per_sample_keys", "solve",
           "VARIANTS", "NAMES", "SOLVERS"]
