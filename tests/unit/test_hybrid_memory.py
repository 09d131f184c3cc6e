"""The hybrid worker's CPU memory modes (rollout.free_cache_engine, workers/hybrid.py): vLLM's KV
cache pages are released outside generation and its packed weights from the update until the
weight sync. A generate that finds them dropped (an update with no sync after it; `run_rl`
always syncs) loads the actor's weights first, so it samples from the updated policy.

Real worker in this process: FSDP2 actor + in-process vLLM on tiny-qwen2, fp32, one gloo rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from verlcli.config.loader import load_config
from verlcli.data.batch import Batch

R = 8


@pytest.fixture(scope="module")
def worker():
    pytest.importorskip("vllm")
    from verlcli.workers.hybrid import HybridWorker

    cfg = load_config(preset="tiny-cpu", overrides=[
        "launcher=local", "resources.devices_per_node=1", "rollout.engine=vllm", "data.max_prompt_tokens=16",
        f"data.max_response_tokens={R}", "data.train_prompts_per_step=2", "rollout.n=2",
        "actor.mini_batch_prompts=2", "actor.optim.lr=1e-2"]).model_dump(mode="json")
    w = HybridWorker(rank=0, world_size=1, cfg=cfg, roles=["actor", "rollout"], total_steps=1)
    yield w
    w.rollout.shutdown()
    if w.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def _prompts() -> Batch:
    prompts = [[11, 22, 33, 44, 55], [66, 77, 88]]
    return Batch(non_tensors={"prompt_ids": prompts}, meta={"temperature": 1.0, "top_p": 1.0, "top_k": -1}).repeat(2)


def _gap(worker, batch: Batch) -> float:
    """Largest |rollout log-prob - actor log-prob| over the response tokens."""
    lp = worker.compute_log_probs(batch)["old_log_probs"]
    mask = batch["response_mask"].bool()
    return (lp - batch["rollout_log_probs"])[mask].abs().max().item()


def test_kv_pages_and_packed_weights_come_and_go(worker):
    rollout = worker.rollout
    worker.sync_weights()
    batch = worker.generate(_prompts())
    assert rollout._asleep == {"kv_cache"} and not rollout.weights_dropped  # KV pages back to the OS
    assert _gap(worker, batch) < 1e-4
    g = torch.Generator().manual_seed(0)
    batch["advantages"] = torch.randn(batch["response_mask"].shape, generator=g) * batch["response_mask"]
    worker.update_actor(batch)
    assert rollout.weights_dropped  # stale once the actor stepped: freed before the update
    # No sync here: generate loads the new weights itself, so its log-probs are the actor's.
    again = worker.generate(_prompts())
    assert not rollout.weights_dropped and _gap(worker, again) < 1e-4
    assert _gap(worker, batch) > 1e-3  # the actor did move: the old samples no longer match
