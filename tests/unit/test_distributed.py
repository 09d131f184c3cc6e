"""Worker groups over real Ray actors and real torch.distributed (gloo), plus the local launcher.

One private Ray instance (2 CPUs) serves the whole file. The shared pool uses half a CPU per
bundle so a "separate" one-rank group still fits beside it.
"""

import os

import pytest
import torch

from verlcli.data.batch import Batch
from verlcli.distributed import (
    LocalWorkerGroup,
    RayWorkerGroup,
    Worker,
    WorkerError,
    make_worker_group,
    ray_init,
    register,
    resource_pool,
)
from verlcli.distributed.dispatch import registered_methods
from verlcli.distributed.errors import from_actor_died
from verlcli.distributed.testing import ToyWorker
from verlcli.errors import UserError

ray = pytest.importorskip("ray")
os.environ.setdefault("OMP_NUM_THREADS", "1")

CPU = {"device": "cpu", "cpus_per_worker": 0.5}


@pytest.fixture(scope="module")
def pool():
    started = not ray.is_initialized()
    ray_init(num_cpus=2, address="local", env={"OMP_NUM_THREADS": "1"})
    p = resource_pool(nodes=1, devices_per_node=2, device="cpu", cpus_per_worker=0.5)
    yield p
    p.remove()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def toy(pool):
    group = RayWorkerGroup(ToyWorker, 2, CPU, {"scale": 2.0}, name="toy", placement_group=pool)
    yield group
    group.shutdown()


def test_dp_splits_over_ranks_and_all_reduces_over_gloo(toy):
    out = toy.double(Batch({"x": torch.tensor([1.0, 2.0, 3.0, 4.0])}))
    assert out["y"].tolist() == [2.0, 4.0, 6.0, 8.0]
    assert out["rank"].tolist() == [0, 0, 1, 1]
    assert out["total"].tolist() == [20.0] * 4  # each rank saw the other's rows via all_reduce


def test_dp_uneven_batch_drops_padding_and_keeps_order(toy):
    b = Batch({"x": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}, {"tag": list("abcde")})
    out = toy.double(b)
    assert len(out) == 5
    assert out["y"].tolist() == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert list(out["tag"]) == list("abcde")
    assert out["rank"].tolist() == [0, 0, 0, 1, 1]
    # The sum shows the padding row (a copy of row 0) really went to rank 1 and was then removed.
    assert out["total"][0].item() == 2.0 * (15.0 + 1.0)


def test_dp_several_rows_per_input_row_and_metrics_per_rank(toy):
    out = toy.expand(Batch({"x": torch.arange(3.0)}), 2)  # padded to 4, 8 rows back, 6 kept
    assert out["x"].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert toy.row_stats(Batch({"x": torch.arange(3.0)})) == [{"rank": 0, "rows": 2}, {"rank": 1, "rows": 2}]
    with pytest.raises(TypeError, match="must be a Batch"):
        toy.double([1, 2, 3])


def test_all_rank0_and_execute_all(toy):
    info = toy.info()
    assert [i["rank"] for i in info] == [0, 1]
    assert len({i["pid"] for i in info}) == 2  # two processes, not one
    assert {i["backend"] for i in info} == {"gloo"}
    assert {i["omp"] for i in info} == {"1"}
    assert {i["nice"] for i in info} == {os.nice(0)}  # not Ray's default 15: the workers do the compute
    assert toy.rank_sum(10) == (0 + 10) + (1 + 10)  # collective on both ranks, rank 0's answer
    assert toy.execute_all("rank_sum", 0) == [1, 1]


def test_raising_method_names_group_rank_method_and_message(toy):
    with pytest.raises(WorkerError) as info:
        toy.fail_on(1, "bad reward column 'score'")
    err = info.value
    assert (err.group, err.rank, err.method) == ("toy", 1, "fail_on")
    assert "ValueError: bad reward column 'score'" in str(err)
    assert "testing.py" in str(err)  # the remote traceback's last lines
    assert toy.rank_sum(0) == 1  # the group still works


def test_timeout_turns_a_hang_into_worker_error(toy, monkeypatch):
    monkeypatch.setenv("VERL_WORKER_TIMEOUT_S", "0.3")
    with pytest.raises(WorkerError, match="possible collective hang") as info:
        toy.sleep(1.0)
    assert "'toy'" in str(info.value) and "'sleep'" in str(info.value)
    monkeypatch.delenv("VERL_WORKER_TIMEOUT_S")
    assert toy.sleep(0.0) == [0, 1]  # queued behind the slow call, then fine


def test_colocated_group_shares_bundles_and_dead_worker_is_explained(pool, toy):
    critic = RayWorkerGroup(ToyWorker, 2, CPU, {"scale": 3.0}, name="critic", placement_group=pool)
    try:
        assert pool.users[:2] == ["toy", "critic"]
        assert critic.double(Batch({"x": torch.ones(2)}))["total"].tolist() == [6.0, 6.0]
        assert {i["pid"] for i in critic.info()}.isdisjoint({i["pid"] for i in toy.info()})
        with pytest.raises(WorkerError, match="died") as info:
            critic.crash(1)
        assert info.value.rank == 1 and "fix:" in str(info.value)
    finally:
        critic.shutdown()  # must not hang or raise with a dead rank
    assert toy.rank_sum(0) == 1  # the other group on the same bundles is unaffected


def test_separate_pool_setup_failure_is_reported_and_cleaned_up(pool):
    res = {"device": "cpu", "cpus_per_worker": 1}  # the whole CPU the shared pool left free
    with pytest.raises(WorkerError, match="unexpected keyword argument 'scael'") as info:
        make_worker_group("ray", ToyWorker, name="typo", world_size=1, resources=res,
                          init_kwargs={"scael": 2.0}, placement_group="separate")
    assert info.value.method == "__init__" and info.value.group == "typo" and info.value.rank == 0


def test_pool_larger_than_cluster_says_so(pool):
    with pytest.raises(UserError, match="need 8 CPU but the Ray cluster has 2 CPU"):
        resource_pool(nodes=1, devices_per_node=8, device="cpu", cpus_per_worker=1.0)


def test_local_group_runs_the_same_worker_in_process():
    group = LocalWorkerGroup(ToyWorker, {"scale": 3.0}, name="local")
    try:
        out = group.double(Batch({"x": torch.tensor([1.0, 2.0, 3.0])}))
        assert out["y"].tolist() == [3.0, 6.0, 9.0] and out["total"].tolist() == [18.0] * 3
        assert group.rank_sum(4) == 4
        assert group.info()[0]["pid"] == os.getpid()
        with pytest.raises(WorkerError, match="boom") as info:
            group.fail_on(0, "boom")
        assert isinstance(info.value.__cause__, ValueError)  # debuggers see the real frame
    finally:
        worker = group.worker
        group.shutdown()
    assert worker.shutdown_calls == 1
    assert not torch.distributed.is_initialized()  # the world this group made is gone


def test_register_contract():
    class Child(ToyWorker):
        def double(self, batch):  # overridden without the decorator: still dp-dispatched
            return batch

    assert registered_methods(Child)["double"].mode == "dp"
    assert registered_methods(ToyWorker)["rank_sum"].mode == "rank0"
    with pytest.raises(ValueError, match="dispatch"):
        register(dispatch="scatter")

    class Clash(Worker):
        @register(dispatch="all")
        def shutdown(self):
            pass

    with pytest.raises(TypeError, match="already has an attribute 'shutdown'"):
        make_worker_group("local", Clash, name="clash")
    with pytest.raises(UserError, match="launcher"):
        make_worker_group("slurm", ToyWorker, name="x")


def test_memory_monitor_kill_is_called_oom():
    note = ("The actor is dead because its worker process has died. 1 worker(s) were killed due "
            "to the node running low on memory. Memory on the node (IP: 10.0.0.1) was 23GB used / 24GB limit")
    err = from_actor_died("actor", "update_actor", 3, RuntimeError(note))
    assert "memory monitor" in str(err) and "micro_batch_sequences_per_device" in err.fix
    assert err.rank == 3
