"""The one NAME=VALUE override parser (p2l_jax.overrides) behind --set, settings grids and the
harness settings, and the one fingerprint helper (p2l_jax.fingerprint)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from p2l_jax.errors import P2LError
from p2l_jax.fingerprint import files_fingerprint, settings_fingerprint, tree_fingerprint
from p2l_jax.overrides import apply_assignment, parse_values, set_field, set_fields
from p2l_jax.solvers import LDPSConfig, OptimizerConfig, P2LConfig


def test_text_is_parsed_as_the_fields_declared_type():
    c = set_fields(P2LConfig(), {"rho": "0.5", "project_every": "4", "tune_prompt": "off",
                                 "optimizer.learning_rate": "1e-3", "gradient": "joint",
                                 "optimizer.momentum": "none"})
    assert (c.rho, c.project_every, c.tune_prompt, c.optimizer.learning_rate, c.gradient,
            c.optimizer.momentum) == (0.5, 4, False, 1e-3, "joint", None)
    assert type(c.rho) is float and type(c.project_every) is int


def test_numbers_are_converted_only_where_exact():
    c = set_fields(P2LConfig(), {"rho": 1, "project_every": 4.0, "lam": 2})
    assert (type(c.rho), type(c.project_every), type(c.lam)) == (float, int, float)
    assert (c.rho, c.project_every, c.lam) == (1.0, 4, 2.0)
    schedule = tuple(np.linspace(0.1, 1.0, 3))
    assert set_field(P2LConfig(num_steps=3), "rho", schedule).rho == schedule  # as given


@pytest.mark.parametrize("name, value, message", [
    ("beta", "1", r"--set: 'beta' is not an option of --solver p2l; options: K, "),
    ("optimizer.beta", "1", r"'optimizer.beta' is not an option of --solver p2l optimizer"),
    ("rho.x", "1", r"'rho.x': rho is a float, which has no options to vary"),
    ("rho", "abc", r"--set rho: expected float, got 'abc'"),
    ("rho", "nan", r"--set rho: expected a finite number, got 'nan'"),
    ("lam", "1e400", r"--set lam: expected a finite number, got '1e400'"),
    ("project_every", "2.5", r"--set project_every: expected int, got '2.5'"),
    ("tune_prompt", "maybe", r"--set tune_prompt: expected true/false, got 'maybe'"),
    ("optimizer.learning_rate", "-1", r"optimizer.learning_rate=-1.0 must be > 0"),
])
def test_errors_name_the_option_and_the_value(name, value, message):
    with pytest.raises(P2LError, match=message):
        apply_assignment(P2LConfig(), f"{name}={value}", option="--set", owner="--solver p2l")


def test_assignment_needs_an_equals_sign():
    with pytest.raises(P2LError, match=r"--set 'lam': expected FIELD=VALUE"):
        apply_assignment(P2LConfig(), "lam")


def test_grid_values_parse_with_the_harness_short_names():
    names = {"learning_rate": "optimizer.learning_rate"}
    assert parse_values(P2LConfig(), "lam=0.01,0.001", option="--p2l-grid") == (
        "lam", (0.01, 0.001))
    assert parse_values(P2LConfig(), "project_every=2,8", option="g") == ("project_every", (2, 8))
    assert parse_values(P2LConfig(), "learning_rate=1e-3,1e-2", option="g", names=names) == (
        "learning_rate", (1e-3, 1e-2))
    assert parse_values(LDPSConfig(), "rho=1", option="g") == ("rho", (1.0,))
    with pytest.raises(P2LError, match=r"--ldps-grid: 'lam' is not an option of LDPSConfig"):
        parse_values(LDPSConfig(), "lam=1", option="--ldps-grid")
    with pytest.raises(P2LError, match=r"--p2l-grid lam: expected float, got 'x'"):
        parse_values(P2LConfig(), "lam=0.1,x", option="--p2l-grid")


def test_command_line_grid_and_harness_agree():
    """--set, a settings grid point and a harness setting give one config."""
    from benchmarks.restoration_quality import resolve
    from p2l_jax.solvers.sweep import with_values

    cli = P2LConfig()
    for text in ("rho=0.3", "project_every=4", "optimizer.learning_rate=0.01"):
        cli = apply_assignment(cli, text)
    grid = with_values(P2LConfig(), {"rho": 0.3, "project_every": 4,
                                     "optimizer.learning_rate": 0.01})
    harness = resolve(P2LConfig(), {"rho": 0.3, "project_every": 4.0, "learning_rate": 0.01})
    assert cli == grid == harness
    assert harness.optimizer == OptimizerConfig(learning_rate=0.01, per_run=True)


def test_fingerprints_keep_their_values(tmp_path):
    """The helpers hash exactly what the code they replaced hashed (outputs of earlier runs
    stay recognised)."""
    settings = {"b": [1, 2.5, None], "a": "x"}
    assert settings_fingerprint(settings) == hashlib.sha256(
        json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\x00\x01")
    (tmp_path / "config.json").write_text("{}")
    h = hashlib.sha256()
    for name, data in (("config.json", b"{}"), ("sub/w.bin", b"\x00\x01")):
        h.update(name.encode() + b"\0" + data)
    assert files_fingerprint(tmp_path) == h.hexdigest()[:16]
    a = tree_fingerprint({"x": np.ones(3, np.float32)}, "k")
    assert a == tree_fingerprint({"x": np.ones(3, np.float32)}, "k")
    assert a != tree_fingerprint({"x": np.ones(3, np.float64)}, "k")
    assert a != tree_fingerprint({"y": np.ones(3, np.float32)}, "k")


def test_tune_defaults_grids_parse_through_the_library():
    from benchmarks.tune_defaults import parse_grid

    assert parse_grid(["lam=0.01,0.001", "learning_rate=1e-3", "project_every=2,4"],
                      P2LConfig(), "--p2l-grid") == (
        ("lam", (0.01, 0.001)), ("learning_rate", (1e-3,)), ("project_every", (2, 4)))
    assert parse_grid(None, P2LConfig(), "--p2l-grid") is None
    with pytest.raises(P2LError, match=r"--p2l-grid 'eta=0.5': eta is not a tuned setting"):
        parse_grid(["eta=0.5"], P2LConfig(), "--p2l-grid")
    with pytest.raises(P2LError, match=r"--ldps-grid: 'lam' is not an option of LDPSConfig"):
        parse_grid(["lam=1"], LDPSConfig(), "--ldps-grid")
