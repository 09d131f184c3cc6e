"""Multi-node on one machine: a two-node Ray cluster (each node its own CPU), `verl grpo` with
resources.nodes=2 joins it through RAY_ADDRESS and must put one rank on each node."""

import json
import os
import shutil
import tempfile

import pytest

from e2e_helpers import ok, verl


@pytest.fixture
def two_node_cluster(monkeypatch):
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Ray's Unix sockets live under RAY_TMPDIR and their paths must stay ≤ 107 bytes.
    tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster, tmp
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


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
