"""Kill and resume, exactly: `kill -9` mid-run, then the same command continues from the last
complete checkpoint; with trainer.deterministic=true its metrics equal an uninterrupted run's
step for step. The data has 8 prompts and a step takes 4, so step 2 ends an epoch: resuming
there must train the remaining steps in the uninterrupted run's data order."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e_helpers import REPO, ok, verl
from verlcli.manifest import check_manifest

# Varies from response to response, so every group has advantages and every step a gradient.
REWARD = "def score(data_source, response, ground_truth, extra_info):\n    return sum(map(ord, response)) % 10 / 10\n"
VOLATILE = ("timing/", "perf/", "mem/", "sync/")  # wall-clock numbers: never equal


def run_args(run: Path, *extra):
    reward = run.parent / "reward.py"
    if not reward.exists():
        reward.parent.mkdir(parents=True, exist_ok=True)
        reward.write_text(REWARD)
    return ["grpo", "--preset", "tiny-cpu", f"trainer.run_dir={run}", "trainer.deterministic=true",
            "trainer.total_steps=3", "trainer.save_every=1", "trainer.keep_checkpoints=3",
            "trainer.val_every=0", "trainer.val_before_train=false", "logging.progress_bar=false",
            f"reward.fn={reward}:score", *extra]


LOCAL_HF = ["launcher=local", "resources.devices_per_node=1", "rollout.engine=hf"]


def train_rows(run: Path) -> dict[int, dict]:
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "score/mean" in m:
            assert m["step"] not in rows, f"step {m['step']} logged twice"
            rows[m["step"]] = {k: v for k, v in m.items() if not k.startswith(VOLATILE)}
    return rows


def popen(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "verlcli.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(cond, proc, timeout=600, poll=0.005):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) first:\n{proc.stderr.read()[-4000:]}")
        time.sleep(poll)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def epoch8(tmp_path_factory, verl_home):
    wd = tmp_path_factory.mktemp("epoch8")
    ok(verl("prepare-data", "arithmetic", "--train-size", "8", "--test-size", "8", "--seed", "0", cwd=wd))
    return wd


@pytest.fixture(scope="module")
def hf_ref(epoch8):
    """The uninterrupted run (local launcher, hf engine) the others are compared with."""
    ref = epoch8 / "runs" / "ref"
    ok(verl(*run_args(ref, *LOCAL_HF), cwd=epoch8))
    return ref


@pytest.mark.slow
def test_kill_driver_during_save_resumes_exactly_at_epoch_boundary(epoch8, hf_ref):
    ref = hf_ref

    run = epoch8 / "runs" / "killed"
    ckpts = run / "checkpoints"
    proc = popen(run_args(run, *LOCAL_HF), epoch8)
    try:  # kill -9 the driver while step 3's checkpoint is being written
        wait_for(lambda: (ckpts / "step_3.tmp").exists(), proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (ckpts / "step_3").exists() and (ckpts / "step_2" / "manifest.json").exists()

    r = ok(verl(*run_args(run, *LOCAL_HF), cwd=epoch8))  # the same command again
    assert f"resumed from {ckpts / 'step_2'} at step 2" in "".join((r.stdout + r.stderr).split("\n"))
    assert not (ckpts / "step_3.tmp").exists()
    want, got = train_rows(ref), train_rows(run)
    assert sorted(got) == [1, 2, 3]
    assert any(v != 0 for k, v in want[3].items() if k.startswith("actor/grad_norm"))  # a real update
    for step in (1, 2, 3):
        assert got[step] == want[step], f"step {step} differs"
    # Step 3 started a new epoch; the position after it is the uninterrupted run's.
    state = lambda d: json.loads((d / "checkpoints" / "step_3" / "trainer.json").read_text())["loader"]
    assert state(run) == state(ref) == {**state(ref), "epoch": 1, "position": 4}


@pytest.mark.slow
def test_kill_9_of_a_ray_worker_is_reported_and_the_rerun_resumes_exactly_vllm(epoch8):
    """Ray, 2 ranks (FSDP over gloo), vLLM rollout: rank 1 is SIGKILLed mid-step 3 while rank 0
    waits for it. The driver names the dead worker and exits; the same command resumes."""
    ref = epoch8 / "runs" / "ref_vllm"
    ok(verl(*run_args(ref), cwd=epoch8))

    run = epoch8 / "runs" / "killed_vllm"
    proc = popen(run_args(run), epoch8)
    try:
        wait_for(lambda: 2 in train_rows(run) if (run / "metrics.jsonl").exists() else False, proc, poll=0.05)
        victim = json.loads((run / "placement.json").read_text())["actor"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)  # must not hang on the rank stuck in a collective
        print(f"kill -9 of rank 1 → driver exited in {time.monotonic() - killed:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert f"worker process died: role 'actor', rank 1" in err and f"pid {victim}" in err, err[-3000:]
    assert "exit: SIGKILL" in err and "last lines of its log" in err, err[-3000:]
    assert not (run / "checkpoints" / "step_3").exists()

    r = ok(verl(*run_args(run), cwd=epoch8))
    assert "resumed from" in r.stdout + r.stderr
    want, got = train_rows(ref), train_rows(run)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step] == want[step], f"step {step} differs"


@pytest.mark.slow
def test_full_disk_during_save_keeps_the_last_checkpoint_and_says_what_it_needs(epoch8, hf_ref):
    """RLIMIT_FSIZE (1 MB per file) stands in for a full disk: the engine's weight shards can
    no longer be written. The run stops with exit 2, naming the directory and the bytes a
    checkpoint needs; step_3 stays whole and no partial step_4 is left."""
    run = epoch8 / "runs" / "full_disk"
    shutil.copytree(hf_ref, run)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # noqa: E731
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = run_args(run, *LOCAL_HF)
    args[args.index("trainer.total_steps=3")] = "trainer.total_steps=4"
    r = subprocess.run([sys.executable, "-m", "verlcli.cli", *args], cwd=epoch8, env=env, capture_output=True,
                       text=True, timeout=600, preexec_fn=limit)
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2, text[-3000:]
    need = json.loads((run / "checkpoints" / "step_3" / "manifest.json").read_text())["total_bytes"]
    assert f"saving checkpoint {run / 'checkpoints' / 'step_4'} failed: out of disk space" in text
    assert f"{need} bytes" in text and "step_3 is intact" in text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]
    assert check_manifest(run / "checkpoints" / "step_3", hashes=True) == []
