"""The one runner, chunked and resumable (p2l_jax.solvers.resumable) on the tiny SD 1.x checkpoint:
chunked == one scan, progress, one compiled advance program, kill-and-resume from an orbax
checkpoint, mismatching checkpoints ignored, option errors.

The sampler runs are guided DDIM with eta > 0 (per-step noise, a negative embedding in the
problem): two programs of a few seconds each. The carry of P2L (optax state inside) is
checked by a store round trip without compiling a sampler; tests/test_restore_inflight.py
runs a measured solver (LDPS) chunked through the pipeline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import p2l_jax
from p2l_jax.errors import P2LError
from p2l_jax.solvers import DDIMConfig, program, resumable, solve
from p2l_jax.solvers.common import State

DDIM = DDIMConfig(num_steps=5, eta=0.5)
K = 2  # chunks of steps 0-1, 2-3 and a padded last chunk 4 (the skip path)


@pytest.fixture(scope="module")
def run(tiny_sd1_dir):
    model = p2l_jax.load_model(tiny_sd1_dir)
    args = (model, None, None, jax.random.split(jax.random.key(7), 2), DDIM)
    return args, solve(*args)


def _other_keys(args):
    return (*args[:3], jax.random.split(jax.random.key(8), 2), *args[4:])


def _assert_same(result, reference):
    for name in ("images", "latents", "embedding"):
        a, b = (np.asarray(getattr(r, name), np.float64) for r in (result, reference))
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name
    assert result.residual.shape == reference.residual.shape == (2, DDIM.num_steps)


class Killed(Exception):
    pass


def test_chunked_equals_one_scan_with_progress_and_one_program(run):
    args, one_scan = run
    before = program.compiled_programs()
    calls = []
    chunked = solve(*args, chunk_steps=K, on_chunk=lambda done, n: calls.append((done, n)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    _assert_same(chunked, one_scan)
    # start, advance (all three chunks, padded one included) and finish: one program each
    compiled = program.compiled_programs()
    assert compiled - before <= 3
    other = solve(*_other_keys(args), chunk_steps=K)
    assert program.compiled_programs() == compiled
    assert np.abs(np.asarray(other.images) - np.asarray(one_scan.images)).max() > 1e-3


def _kill_after_first_chunk(args, directory):
    def kill(done, n):
        raise Killed

    with pytest.raises(Killed):
        solve(*args, chunk_steps=K, on_chunk=kill, checkpoint=directory)
    assert (directory / "2").is_dir()  # orbax step folder of the chunk's checkpoint


def test_kill_and_resume_runs_only_the_remaining_chunks(run, tmp_path, capsys, monkeypatch):
    args, one_scan = run
    ck = tmp_path / "inflight"
    _kill_after_first_chunk(args, ck)
    advanced, calls = [], []
    real = program.jit_advance
    monkeypatch.setattr(program, "jit_advance",
                        lambda *a, **kw: advanced.append(1) or real(*a, **kw))
    compiled = program.compiled_programs()
    resumed = solve(*args, chunk_steps=K, on_chunk=lambda d, n: calls.append(d), checkpoint=ck)
    assert "resuming in-flight sampler state at step 2" in capsys.readouterr().err
    assert calls == [4, 5] and len(advanced) == 2
    assert program.compiled_programs() == compiled  # the restored carry reuses the programs
    _assert_same(resumed, one_scan)
    assert not [p for p in ck.iterdir() if p.name.isdigit()]  # finished: checkpoint cleared


def test_checkpoint_of_other_inputs_is_ignored(run, tmp_path, capsys):
    args, one_scan = run
    ck = tmp_path / "inflight"
    _kill_after_first_chunk(_other_keys(args), ck)  # another run's state
    calls = []
    result = solve(*args, chunk_steps=K, on_chunk=lambda d, n: calls.append(d), checkpoint=ck)
    assert "in-flight checkpoint of other settings (step 2) ignored" in capsys.readouterr().err
    assert calls == [2, 4, 5]
    _assert_same(result, one_scan)


def test_option_errors(run, tmp_path):
    args, _ = run
    with pytest.raises(P2LError, match="option chunk_steps: expected a positive integer"):
        solve(*args, chunk_steps=0)
    with pytest.raises(P2LError, match="option checkpoint_every: 3 is not a multiple"):
        solve(*args, chunk_steps=2, checkpoint_every=3, checkpoint=tmp_path / "c")
    with pytest.raises(P2LError, match="option chunk_steps: needed"):
        solve(*args, on_chunk=print)
    (tmp_path / "file").write_text("x")
    with pytest.raises(P2LError, match="file exists and is not a folder"):
        solve(*args, chunk_steps=2, checkpoint=tmp_path / "file")


def test_store_round_trip_of_a_p2l_carry(tmp_path):
    """The P2L carry (per-sample optax Adam state: counts, moments) comes back exactly, with
    its structure and dtypes; another fingerprint's checkpoint is not restored."""
    rs = np.random.RandomState(0)
    C = jnp.asarray(rs.randn(2, 77, 8), jnp.float32)
    opt = jax.vmap(optax.adam(1e-2).init)(C)
    opt = jax.tree_util.tree_map(lambda a: a + 3 if a.dtype == jnp.int32 else a + 0.5, opt)
    z = jnp.asarray(rs.randn(2, 8, 8, 4), jnp.float32)
    carry = program.Carry(State(z, C, opt), jnp.asarray(rs.randn(2, 6), jnp.float32),
                            jnp.full((2, 6), jnp.nan))
    resumable.InflightStore(tmp_path / "c", "run-a").save(carry, 4)
    like = jax.tree_util.tree_map(jnp.zeros_like, carry)
    restored, step = resumable.InflightStore(tmp_path / "c", "run-a").load(like)
    assert step == 4
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(carry)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(carry)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    messages = []
    other = resumable.InflightStore(tmp_path / "c", "run-b", messages.append)
    assert other.load(like) is None
    assert "other settings (step 4) ignored" in messages[0]
    # ... but kept until run-b saves its own: a run-b that dies before saving loses nothing
    assert resumable.InflightStore(tmp_path / "c", "run-a").load(like)[1] == 4
    other.save(carry, 2)
    assert resumable.InflightStore(tmp_path / "c", "run-b").load(like)[1] == 2
    assert resumable.InflightStore(tmp_path / "c", "run-a", messages.append).load(like) is None
