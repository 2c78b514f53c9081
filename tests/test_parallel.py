"""Batch sharding, per-image keys and multi-host shares (p2l_jax/parallel.py).

Fake devices need their own process, so the device and jax.distributed checks run
tests/parallel_worker.py in subprocesses; the reference values come from this (1-device)
process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2l_jax.errors import P2LError
from p2l_jax.parallel import (clear_marker, gather_via_files, identity_hash, image_key, image_keys,
                              init_distributed, my_share, pad_batch)
from parallel_worker import run_toy

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "parallel_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
ENV.pop("XLA_FLAGS", None)


def _reference(identities):
    """Each identity restored alone (batch of one, one device)."""
    out = {}
    for s in identities:
        out.update(run_toy([s])[0])
    return out


def test_image_keys_depend_on_identity_not_position():
    a = np.asarray(image_keys(3, ["a.png", "b.png"]))
    b = np.asarray(image_keys(3, ["b.png", "a.png"]))
    np.testing.assert_array_equal(a, b[::-1])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(np.asarray(image_key(3, "a.png")), np.asarray(image_key(4, "a.png")))
    assert identity_hash("a.png") == identity_hash("a.png") < 2**32


def test_pad_batch_repeats_last_row():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded, size = pad_batch({"x": x}, 4)
    assert size == 3 and padded["x"].shape == (4, 2)
    np.testing.assert_array_equal(np.asarray(padded["x"]), np.concatenate([x, x[-1:]]))


def test_my_share_partitions_items():
    items = [f"f{i}" for i in range(11)]
    shares = [my_share(items, i, 3) for i in range(3)]
    assert sorted(sum(shares, [])) == sorted(items)
    assert [len(s) for s in shares] == [4, 4, 3]


def test_init_distributed_option_errors():
    assert init_distributed(env={}) is False
    with pytest.raises(P2LError, match="--num-processes"):
        init_distributed("127.0.0.1:1234", env={})
    with pytest.raises(P2LError, match="--process-id 2"):
        init_distributed("127.0.0.1:1234", 2, 2, env={})
    with pytest.raises(P2LError, match="P2L_NUM_PROCESSES"):
        init_distributed(env={"P2L_COORDINATOR_ADDRESS": "h:1", "P2L_NUM_PROCESSES": "x"})
    with pytest.raises(P2LError, match="without --coordinator"):
        init_distributed(num_processes=2, process_id=1, env={})


def test_gather_via_files_times_out_naming_missing_process(tmp_path):
    with pytest.raises(P2LError, match=r"process-1-of-2"):
        gather_via_files(str(tmp_path), "s", {"a": 1}, index=0, count=2, timeout_s=0.2,
                         poll_s=0.05)
    assert gather_via_files(str(tmp_path), "s", {"b": 2}, index=1, count=2) is None
    assert gather_via_files(str(tmp_path), "s", {"a": 1}, index=0, count=2) == [{"a": 1},
                                                                                {"b": 2}]
    assert list(tmp_path.iterdir()) == []  # process 0 removes the markers it has read
    assert gather_via_files(str(tmp_path), "s", {"c": 3}, index=0, count=1) == [{"c": 3}]
    assert list(tmp_path.iterdir()) == []
    gather_via_files(str(tmp_path), "s", {"b": 2}, index=1, count=2)
    clear_marker(str(tmp_path), "s", index=1, count=2)  # a killed run's stale marker
    assert list(tmp_path.iterdir()) == []


def test_same_results_on_1_2_8_devices_shard_map_and_pmap():
    proc = subprocess.run([sys.executable, WORKER, "devices"], env=ENV, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["device_count"] == 8
    ids = {s for r in report["results"] for s in r["values"]}
    ref = _reference(sorted(ids))
    seen = set()
    for r in report["results"]:
        n, size = r["n"], r["size"]
        # The batch really was split: each device saw ceil(size / n) rows (padding included).
        assert r["shard_rows"] == [-(-size // n)], r
        assert len(r["values"]) == size
        for s, v in r["values"].items():
            np.testing.assert_allclose(v, ref[s], atol=1e-5, rtol=0, err_msg=f"{r['mode']} {n} {s}")
        seen.add((n, r["mode"], size))
    assert len(seen) == 3 * 2 * 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_distributed_covers_every_input_once(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "distributed", str(port), str(i), "2",
                               str(tmp_path)], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    gathered = json.loads((tmp_path / "merged.json").read_text())
    assert [g["process"] for g in gathered] == [0, 1]
    assert all(g["count"] == 2 and g["local_devices"] == 2 for g in gathered)
    done = [s for g in gathered for s in g["values"]]
    identities = [f"img-{i}" for i in range(7)]
    assert sorted(done) == sorted(identities) and len(done) == len(set(done))
    ref = _reference(identities)
    for g in gathered:
        for s, v in g["values"].items():
            np.testing.assert_allclose(v, ref[s], atol=1e-5, rtol=0)
