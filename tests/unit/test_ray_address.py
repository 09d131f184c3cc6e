"""A Ray cluster that is gone must not hang the next run (each case in a fresh subprocess,
so the environment and Ray's temp dir are the test's own)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[2]


def _dead_address() -> str:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_dead_ray_address_is_an_error_naming_it_and_the_fix():
    addr = _dead_address()
    r = _python("from verlcli.distributed import ray_init\n"
                "from verlcli.errors import UserError\n"
                "try:\n    ray_init()\nexcept UserError as e:\n    print(e); raise SystemExit(2)\n",
                RAY_ADDRESS=addr)
    assert r.returncode == 2, r.stderr
    assert f"RAY_ADDRESS={addr} does not answer" in r.stdout
    assert "unset RAY_ADDRESS" in r.stdout and "ray start --head" in r.stdout


def test_stale_address_ray_remembered_is_skipped_with_one_warning():
    """What `ray start --head` leaves behind after its cluster was killed: the address in
    $RAY_TMPDIR/ray/ray_current_cluster. A local instance starts instead (heavy: flock)."""
    tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths are ≤107 bytes
    try:
        (Path(tmp) / "ray").mkdir()
        addr = _dead_address()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(addr + "\n")
        code = ("import ray\n"
                "from verlcli.distributed import ray_init\n"
                "from verlcli.distributed.placement import _answers\n"
                "ray_init(num_cpus=1)\n"
                "live = ray._private.worker.global_worker.node.gcs_address\n"
                "print('started', ray.is_initialized(), 'live answers', _answers(live))\n"
                "ray.shutdown()\n")
        r = _python(code, RAY_TMPDIR=tmp)
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout
        assert out.count(f"ignoring Ray cluster address {addr}") == 1
        assert "starting a local Ray instance" in out
        assert "started True live answers True" in out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
