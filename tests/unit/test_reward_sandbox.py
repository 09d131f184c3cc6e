"""User reward functions run sandboxed: CPU-time and memory limits, no network, a temporary
working directory, and no access to the run directory (real worker processes, real limits)."""

import socket

import pytest

from verlcli.errors import UserError
from verlcli.rewards.pool import RewardScorer

PROBE = '''
import os, socket

def score(data_source, response, ground_truth, extra_info):
    if ground_truth == "spin":
        while True:
            pass
    if ground_truth == "hog":
        block = bytearray(3 * 2**30)
        return 0.0
    out = {"score": 1.0, "cwd": os.getcwd()}
    try:
        socket.create_connection(("127.0.0.1", int(extra_info["port"])), timeout=2).close()
        out["net"] = "open"
    except OSError as e:
        out["net"] = type(e).__name__
    for what, path, mode in (("run_read", extra_info["run"] + "/config.yaml", "r"),
                             ("run_write", extra_info["run"] + "/metrics.jsonl", "a"),
                             ("elsewhere", extra_info["elsewhere"], "w")):
        try:
            with open(path, mode) as f:
                f.read() if mode == "r" else f.write("x")
            out[what] = "allowed"
        except OSError as e:
            out[what] = type(e).__name__
    with open("scratch.txt", "w") as f:  # the working directory is writable
        f.write("ok")
    out["scratch"] = open("scratch.txt").read()
    return out
'''


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the unsandboxed call writes scratch.txt where it runs
    fn = tmp_path / "probe.py"
    fn.write_text(PROBE)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("secret: 1\n")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield fn, run, server.getsockname()[1], tmp_path
    server.close()


def test_sandbox_blocks_network_and_run_dir_and_gives_a_temp_cwd(setup):
    fn, run, port, tmp = setup
    extra = {"port": port, "run": str(run), "elsewhere": str(tmp / "elsewhere.txt")}
    sandbox = {"run_dir": str(run), "memory_gb": 2.0, "cpu_s": 5.0}
    with RewardScorer(f"{fn}:score", timeout_s=30, num_workers=1, sandbox=sandbox) as scorer:
        [r] = scorer.score([{"data_source": "x", "response": "r", "ground_truth": "probe", "extra_info": extra}])
    assert r["error"] is None and r["score"] == 1.0
    assert r["net"] != "open"
    assert r["run_read"] == r["run_write"] == "PermissionError"
    assert r["elsewhere"] == "PermissionError"  # Landlock: writes only in the working dir
    assert r["scratch"] == "ok" and "verl-reward-" in r["cwd"]
    assert (run / "config.yaml").read_text() == "secret: 1\n" and not (run / "metrics.jsonl").exists()
    # Without the sandbox the same function reaches both (this is what the sandbox stops).
    with RewardScorer(f"{fn}:score", timeout_s=30, num_workers=1, sandbox=None) as scorer:
        [r] = scorer.score([{"data_source": "x", "response": "r", "ground_truth": "probe", "extra_info": extra}])
    assert r["net"] == "open" and r["run_write"] == "allowed"


def test_cpu_and_memory_limits_end_only_that_response(setup):
    fn, run, port, tmp = setup
    sandbox = {"run_dir": str(run), "memory_gb": 1.0, "cpu_s": 1.0}
    items = [{"data_source": "x", "response": "r", "ground_truth": gt, "extra_info": {}} for gt in ("spin", "hog")]
    with RewardScorer(f"{fn}:score", timeout_s=60, num_workers=1, sandbox=sandbox) as scorer:
        spin, hog = scorer.score(items)
    assert spin["score"] == 0.0 and "SIGXCPU" in spin["error"]
    assert hog["score"] == 0.0 and "MemoryError" in hog["error"]


def test_missing_function_fails_fast_from_inside_the_sandbox(setup):
    fn, run, _, _ = setup
    with pytest.raises(UserError, match="has no function 'nope'"):
        RewardScorer(f"{fn}:nope", num_workers=1, sandbox={"run_dir": str(run)})
