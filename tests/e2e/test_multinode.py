"""Multi-node on one machine: a two-node Ray cluster (each node its own CPU), `verl grpo` with
resources.nodes=2 joins it through RAY_ADDRESS and must put one rank on each node."""

import json
import os
import shutil
import tempfile

import pytest

from e2e_helpers import ok, verl


@pytest.fixture(scope="module")
def two_node_cluster():
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Ray's Unix sockets live under RAY_TMPDIR and their paths must stay ≤ 107 bytes.
    tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster, tmp
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old


def test_pool_of_two_nodes_with_two_bundles_each(two_node_cluster):
    """devices_per_node > 1: each node's group is pinned to its own node, in node-id order;
    more nodes than the cluster has is an error naming the key."""
    import ray

    from verlcli.distributed.placement import resource_pool
    from verlcli.errors import UserError

    cluster, _ = two_node_cluster
    ray.init(address=cluster.address)
    try:
        pool = resource_pool(nodes=2, devices_per_node=2, device="cpu", cpus_per_worker=0.5, max_colocate=1)
        try:
            assert len(set(pool.node_ids)) == 2 and pool.node_ids == sorted(pool.node_ids)
            assert [ray.util.placement_group_table(pg)["bundles_to_node_id"] for pg in pool.pgs] == [
                {0: node, 1: node} for node in pool.node_ids]
        finally:
            pool.remove()
        with pytest.raises(UserError, match="resources.nodes=3 but the Ray cluster has 2 node"):
            resource_pool(nodes=3, devices_per_node=1, device="cpu", cpus_per_worker=0.5)
    finally:
        ray.shutdown()


def test_grpo_on_two_nodes_one_rank_each(workdir, two_node_cluster):
    cluster, tmp = two_node_cluster
    run = workdir / "runs" / "two-nodes"
    ok(verl("grpo", "--preset", "tiny-cpu", f"trainer.run_dir={run}", "resources.nodes=2",
            "resources.devices_per_node=1", "trainer.val_before_train=false", "trainer.val_every=0",
            "logging.progress_bar=false", cwd=workdir,
            env_extra={"RAY_ADDRESS": cluster.address, "RAY_TMPDIR": tmp}))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if "score/mean" in m] == [1, 2]
    ranks = json.loads((run / "placement.json").read_text())["actor"]
    nodes = [r["node_id"] for r in ranks]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len(set(nodes)) == 2 and None not in nodes  # strict spread: one rank per node
    assert nodes == sorted(nodes)  # ranks follow node ids (simulated nodes share one IP)
    assert {r["world_size"] for r in ranks} == {2}
