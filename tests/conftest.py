"""Shared pytest fixtures: tiny random SD checkpoints in real diffusers layout."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many more XLA programs than they run steps of (tiny models), and on the CPU
# most of a compile is LLVM's code generation: at LLVM -O0 a solver program compiles in about
# two thirds of the time. XLA's HLO passes, and so the optimized HLO that test_conv_form
# inspects, do not depend on this level; only the machine code is less optimized (and may
# contract fewer multiply-adds, a float rounding difference). Set before JAX is imported;
# an XLA_FLAGS that already names the level wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    from sd_fixtures import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd1"), layout="sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    from sd_fixtures import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd2"), layout="sd2", seed=1)


@pytest.fixture(scope="module")
def highest_precision():
    """float32 matrix products throughout a module (``pytestmark =
    pytest.mark.usefixtures("highest_precision")``): parity tests against torch on CPU would
    otherwise compare against XLA's default, lower-precision passes where it has them."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """After each test module, drop JAX's caches of compiled programs. One pytest process
    compiles hundreds of XLA:CPU programs; kept alive, each keeps its JIT-compiled code mapped,
    and a full run once crashed inside XLA's compiler late in the suite (2026-12-01), as if
    memory maps ran out. Modules share their programs within themselves, not across."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
