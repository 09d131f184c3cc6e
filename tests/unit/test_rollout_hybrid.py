"""The hybrid engine on CPU: two ranks with gloo already initialised, each creating its own
in-process vLLM engine at the same time, generating, syncing weights, and keeping the
caller's process group usable before, between and after (shutdown included)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = r"""
import json, sys, time
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from verlcli.models.resolve import resolve_model
from verlcli.rollout import SamplingSpec, make_rollout

out_path = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()

def allreduce_ok():
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item() == dist.get_world_size()

path = resolve_model("tiny-qwen2")
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

def greedy_ok(outs, prompts):
    for o in outs:
        ids = torch.tensor([prompts[o.prompt_index] + o.response_ids])
        with torch.no_grad():
            logits = ref(ids).logits[0, len(prompts[o.prompt_index]) - 1:-1]
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(o.response_ids)[:, None])[:, 0]
        if o.response_ids != logits.argmax(-1).tolist():
            return False
        if not torch.allclose(lp, torch.tensor(o.logprobs), atol=1e-3):
            return False
    return True

result = {"rank": rank, "allreduce_before": allreduce_ok()}
start = time.perf_counter()
engine = make_rollout("vllm", path, device="cpu", dtype="float32", max_model_len=128, seed=0)
result["create_s"] = time.perf_counter() - start
result["allreduce_after_create"] = allreduce_ok()

prompts = [[1, 20 + rank, 30, 40], [7, 8, 9]]  # different work on each rank
spec = SamplingSpec(temperature=0, max_tokens=6)
result["greedy_ok"] = greedy_ok(engine.generate(prompts, spec), prompts)

g = torch.Generator().manual_seed(rank)  # ranks sync different weights: engines are independent
new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in ref.state_dict().items()}
stats = engine.sync_weights(new)
result["sync_s"] = stats["sync_s"]
ref.load_state_dict(new)
result["synced_greedy_ok"] = greedy_ok(engine.generate(prompts, spec), prompts)
result["allreduce_after_use"] = allreduce_ok()

engine.shutdown()
result["allreduce_after_shutdown"] = allreduce_ok()
dist.destroy_process_group()
with open(out_path, "w") as f:
    json.dump(result, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_each_run_their_own_engine(tmp_path):
    try:
        import vllm  # noqa: F401
    except Exception as e:
        pytest.skip(f"vllm not importable: {e}")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"rank{rank}.json")],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = {r: (tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2)}
    assert codes == [0, 0], logs
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        checks = {k: v for k, v in result.items() if isinstance(v, bool)}
        assert all(checks.values()), (rank, checks, logs[rank])
        print(f"rank {rank}: engine created in {result['create_s']:.1f} s, "
              f"sync {result['sync_s']:.3f} s")
