"""Shared pytest fixtures: tiny random SD checkpoints in real diffusers layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    from sd_fixtures import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd1"), layout="sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    from sd_fixtures import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd2"), layout="sd2", seed=1)
