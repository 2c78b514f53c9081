"""P2L and its baselines as step functions run by one ``lax.scan`` program.

    result = p2l_jax.solvers.solve(model, operator, y, key, P2LConfig(num_steps=1000))
    points = p2l_jax.solvers.sweep(model, operator, y, key, P2LConfig(num_steps=25),
                                   grid={"rho": [0.1, 0.3], "lam": [0.01, 0.1]})

* :mod:`.configs`     frozen configs: P2LConfig, LDPSConfig, GMLDPSConfig, PSLDConfig,
                      DDIMConfig, OptimizerConfig (DPSConfig lives in :mod:`.dps`); ``split``
                      into static structure and settings (arrays: another value compiles
                      nothing)
* :mod:`.common`      the step interface and the shared pieces (fidelity, prompt update,
                      projection, DDIM transition); Tweedie and DDIM math in p2l_jax.schedule
* :mod:`.gradients`   gradient variants by name (VARIANTS)
* :mod:`.prompt_objectives`  P2L's step 1: prompt objectives by name, the tuning window
* :mod:`.guided`      the guided step shared by P2L / LDPS / GML-DPS / PSLD
* :mod:`.p2l`, :mod:`.ldps`, :mod:`.gml_dps`, :mod:`.psld`, :mod:`.dps`, :mod:`.ddim_sampling`
                      the steps
* :mod:`.registry`    one line per solver: CLI name, config class, step, needs a measurement
* :mod:`.program`     a run's traceable pieces (start, advance k steps, finish) and the
                      compiled programs; :mod:`.resumable` the one runner (whole or chunked,
                      progress, in-flight checkpoints); :mod:`.driver` ``solve``;
                      :mod:`.sweep` ``sweep`` (many settings, one program)
"""

from p2l_jax.solvers.configs import (DDIMConfig, GMLDPSConfig, LDPSConfig, OptimizerConfig,
                                     P2LConfig, PSLDConfig, split)
from p2l_jax.solvers.dps import DPSConfig
from p2l_jax.solvers.driver import gradients_at, per_sample_keys, solve
from p2l_jax.solvers.gradients import VARIANTS
from p2l_jax.solvers.program import SolveResult, compiled_programs
from p2l_jax.solvers.registry import BY_NAME, SOLVERS
from p2l_jax.solvers.sweep import SweepResult, sweep

__all__ = ["DDIMConfig", "DPSConfig", "GMLDPSConfig", "LDPSConfig", "OptimizerConfig", "P2LConfig",
           "PSLDConfig", "SolveResult", "SweepResult", "compiled_programs", "gradients_at",
           "per_sample_keys", "solve", "split", "sweep", "VARIANTS", "BY_NAME", "SOLVERS"]
