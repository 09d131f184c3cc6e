"""Shared set-up for the e2e tests: the real `verl` CLI in a subprocess, a temp VERL_HOME
(built-in models are built once per session), and small prepared datasets."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def verl(*args, cwd, timeout=900, env_extra=None):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-m", "verlcli.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-8000:]}"
    return r


@pytest.fixture(scope="session")
def verl_home(tmp_path_factory):
    home = os.environ.get("VERL_HOME") or str(tmp_path_factory.mktemp("verl_home"))
    os.environ["VERL_HOME"] = home
    return home


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, verl_home):
    """A working directory with data/arithmetic prepared (small)."""
    wd = tmp_path_factory.mktemp("work")
    ok(verl("prepare-data", "arithmetic", "--train-size", "64", "--test-size", "16", "--seed", "0", cwd=wd))
    return wd
