"""Where worker groups go: colocated by default (fractional shares of the run's devices),
`*.placement=separate` pools checked against the devices present, and the reward-model
example of `verl ppo --help` placing on one node by --dry-run."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from verlcli.config.arithmetic import check_placement, placement_plan
from verlcli.config.loader import load_config
from verlcli.errors import UserError

from _data import arith_parquet

RM = "reward.model.path=/models/rm"


def plan_of(preset, *overrides, estimator="gae"):
    return placement_plan(load_config(preset=preset, overrides=[f"algorithm.adv_estimator={estimator}", *overrides]))


def test_every_role_shares_the_run_devices_by_default():
    plan = plan_of("qwen2.5-7b-8xH100", RM)
    assert plan.colocated == ["actor+rollout+ref+critic", "reward_model"] and plan.separate == []
    assert plan.share == 0.5 and plan.devices_needed == 8 and plan.as_dict()["nodes needed"] == 1
    check_placement(plan, "cuda", cuda_devices=8, cpu_count=64)  # fits one 8-GPU node


def test_separate_pools_are_counted_and_named_with_a_fix():
    plan = plan_of("qwen2.5-7b-8xH100", RM, "reward.model.placement=separate", "critic.placement=separate")
    assert plan.colocated == ["actor+rollout+ref"] and plan.separate == ["critic", "reward_model"]
    assert plan.devices_needed == 24
    with pytest.raises(UserError) as e:
        check_placement(plan, "cuda", cuda_devices=8, cpu_count=64)
    msg = str(e.value)
    assert "24 GPUs" in msg and "has 8" in msg and "critic.placement=separate" in msg
    assert "reward.model.placement=colocated" in msg and "resources.devices_per_node=2" in msg
    # CPU workers: two pools of 2 workers × 1 core on a 2-core machine
    cpu = plan_of("tiny-cpu", "reward.model.path=tiny-qwen2", "reward.model.placement=separate")
    with pytest.raises(UserError, match="need 4 cores, this machine has 2"):
        check_placement(cpu, "cpu", cuda_devices=None, cpu_count=2)
    check_placement(plan_of("tiny-cpu", "reward.model.path=tiny-qwen2"), "cpu", None, cpu_count=2)


def test_grpo_without_reward_model_is_one_group_on_whole_devices():
    plan = plan_of("tiny-cpu", estimator="grpo")
    assert plan.colocated == ["actor+rollout"] and plan.share == 1.0 and plan.devices_needed == 2


def test_rm_example_in_ppo_help_places_on_one_node_by_dry_run(tmp_path):
    def verl(*args):
        env = {**os.environ, "COLUMNS": "300"}  # one example per line, unwrapped
        return subprocess.run([sys.executable, "-m", "verlcli.cli", *args], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)

    help_text = verl("ppo", "--help").stdout
    [example] = [line.strip() for line in help_text.splitlines() if "reward.model.path=" in line]
    # --dry-run's preflight opens the data and the reward model: point both at local stand-ins
    # (placement does not depend on them).
    data = arith_parquet(tmp_path / "a.parquet", 8)
    local = ["reward.model.path=tiny-qwen2", f"data.train_files={data}", f"data.val_files={data}"]
    r = verl(*shlex.split(example)[1:], *local, "--dry-run")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    out = re.sub(r"\s+", " ", r.stdout)
    assert "reward_model" in out and "1/2 of a device each" in out
    assert re.search(r"devices needed │ 8 │", out) and re.search(r"nodes needed │ 1 │", out)


def test_network_interface_settings_reach_workers_on_every_node(monkeypatch):
    from verlcli.distributed.placement import worker_env

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    env = worker_env()
    assert env["GLOO_SOCKET_IFNAME"] == "eth1" and env["NCCL_SOCKET_IFNAME"] == "ib0"
