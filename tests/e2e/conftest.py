"""Shared set-up for the e2e tests: a temp VERL_HOME (built-in models are built once per
session) and small prepared datasets."""

import os

import pytest

from e2e_helpers import ok, verl


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
