"""Faults surface in seconds, with their cause: a Ray worker killed with `kill -9` while its
peer waits for it in a gloo collective is reported with its role, rank, node, pid, exit
signal and the last lines of its log, and the group goes down without waiting on the stuck
peer; a rank that never answers is named (real Ray, real gloo, a real SIGKILL)."""

import os
import signal
import threading
import time

import pytest

from verlcli.distributed import RayWorkerGroup, WorkerError, ray_init
from verlcli.distributed.testing import ToyWorker

ray = pytest.importorskip("ray")
CPU = {"device": "cpu", "cpus_per_worker": 0.5, "devices_per_node": 2}


@pytest.fixture(scope="module")
def ray_up():
    started = not ray.is_initialized()
    ray_init(num_cpus=2, address="local", env={"OMP_NUM_THREADS": "1"})
    yield
    if started:
        ray.shutdown()


def test_kill_9_of_a_worker_names_role_rank_node_signal_and_log(ray_up, tmp_path):
    # As in a real run, each worker writes to RUN_DIR/logs/<group>_rank<r>.log: the report
    # must read that file (the workers redirect their output there after the group found them).
    group = RayWorkerGroup(ToyWorker, 2, CPU, {}, name="actor", placement_group="separate",
                           env={"VERL_LOG_DIR": str(tmp_path / "logs")})
    try:
        pids = group.say("loaded the model, about to wait in a collective")
        victim = pids[1]
        killed = []
        timer = threading.Timer(2.0, lambda: (os.kill(victim, signal.SIGKILL), killed.append(time.monotonic())))
        timer.start()
        with pytest.raises(WorkerError) as info:
            group.sleep_then_reduce(1, 120.0)  # rank 0 waits in all_reduce for rank 1
        timer.join()
    finally:
        group.shutdown()  # rank 0 is stuck in gloo: the broken group is killed, not asked
    err = str(info.value)
    print(f"{err}\n(kill -9 → error and group down: {time.monotonic() - killed[0]:.1f} s)")
    assert info.value.rank == 1 and info.value.group == "actor"
    assert f"role 'actor', rank 1, node {os.uname().nodename}" in err and f"pid {victim}" in err
    assert "SIGKILL" in err
    assert "last lines of its log" in err and "about to wait in a collective" in err
    assert "verl plan" in info.value.fix


def test_a_rank_that_never_answers_is_named(ray_up):
    group = RayWorkerGroup(ToyWorker, 2, CPU, {}, name="critic", placement_group="separate")
    group.timeout_s = 3.0  # after start-up: starting worker processes takes longer than that here
    try:
        with pytest.raises(WorkerError, match=r"no answer within 3 s from ranks \[1\] \(ranks \[0\] finished\)") as info:
            group.sleep_on(1, 60.0)
        assert "trainer.call_timeout_s" in info.value.fix
    finally:
        group.shutdown()  # the hung rank is killed, not waited for


RAY_NOTE = ("The actor died unexpectedly before finishing this task.\n\tclass_name: _WorkerHost\n\tpid: 4242\n"
            "\tip: 10.0.0.7\nThe actor is dead because its worker process has died. Worker exit type: "
            "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. "
            "End of file. Some common causes include: (1) the process was killed by the OOM killer due to "
            "high memory usage, (2) ray stop --force was called, or (3) the worker crashed unexpectedly.")


def test_death_report_from_rays_note_and_the_workers_log():
    """What Ray 2.60 says about a SIGKILLed actor (recorded above), plus the worker's log."""
    from verlcli.distributed.errors import worker_died

    where = {"pid": 4242, "ip": "10.0.0.7", "host": "node-7"}
    killed = worker_died("actor", "update_actor", 3, RuntimeError(RAY_NOTE), where, "step 12: loss 0.3")
    text = str(killed)
    assert "worker process died: role 'actor', rank 3, node node-7 (10.0.0.7), pid 4242, exit: SIGKILL" in text
    assert "step 12: loss 0.3" in text and "verl plan" in killed.fix
    crashed = worker_died("actor", "generate", 0, RuntimeError(RAY_NOTE), where,
                          "Fatal Python error: Segmentation fault\n  File vllm/worker.py, line 10")
    assert "exit: SIGSEGV (signal 11: segmentation fault" in str(crashed)


def test_collective_timeout_fails_the_waiting_rank_and_names_the_hung_one(ray_up):
    """trainer.collective_timeout_s reaches init_process_group (VERL_DIST_TIMEOUT_S)."""
    group = RayWorkerGroup(ToyWorker, 2, CPU, {}, name="actor", placement_group="separate",
                           env={"VERL_DIST_TIMEOUT_S": "3"})
    try:
        with pytest.raises(WorkerError) as info:
            group.sleep_then_reduce(1, 30.0)  # rank 0's all_reduce gives up after 3 s
    finally:
        group.shutdown()
    assert info.value.rank == 0 and "ranks [1] had not answered yet" in str(info.value)
