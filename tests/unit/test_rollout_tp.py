"""Rollout tensor parallelism and the streamed weight sync.

* The `replica` dispatch: the ranks of one TP engine get the same prompts, one answers.
* `rollout.tensor_parallel_size` checks: world size, vLLM engine, the model's heads.
* One 2-rank job (gloo, real FSDP2 + vLLM TP=2 on tiny-qwen2): `weight_buckets` streams
  exactly the full state dict in bounded buckets (bf16 cast, lm_head.weight included); after a
  streamed sync into the TP=2 engine, greedy output equals a TP=1 engine given the same
  weights, and the trainer's (transformers) greedy continuation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from verlcli.config.arithmetic import check_rollout_tp, tp_fits
from verlcli.config.loader import load_config
from verlcli.data.batch import Batch
from verlcli.distributed.dispatch import DispatchSpec, collect_results, split_call
from verlcli.errors import UserError

from _rollout_tp_job import PROMPTS  # noqa: E402 - tests/unit helper

JOB = Path(__file__).with_name("_rollout_tp_job.py")


# ---------------------------------------------------------------- dispatch


def test_replica_dispatch_gives_a_tp_group_one_chunk_and_keeps_order():
    batch = Batch({"x": torch.arange(6)})
    spec = DispatchSpec("replica")
    per_rank, plan = split_call(spec, 4, (batch,), {}, "gen", replica=2)
    chunks = [args[0]["x"].tolist() for args, _ in per_rank]
    assert chunks == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    # Each rank answers 2 rows per input row (n samples); only one rank per replica counts.
    answers = [Batch({"y": a[0]["x"].repeat_interleave(2) * 10}) for a, _ in per_rank]
    out = collect_results(spec, plan, answers, "gen")
    assert out["y"].tolist() == [0, 0, 10, 10, 20, 20, 30, 30, 40, 40, 50, 50]


def test_replica_dispatch_pads_per_replica_and_is_dp_at_replica_1():
    batch = Batch({"x": torch.arange(3)})
    spec = DispatchSpec("replica")
    per_rank, plan = split_call(spec, 4, (batch,), {}, "gen", replica=2)
    assert plan.pad == 1 and len(per_rank[0][0][0]) == 2
    out = collect_results(spec, plan, [a[0] for a, _ in per_rank], "gen")
    assert out["x"].tolist() == [0, 1, 2]
    dp_rank, _ = split_call(DispatchSpec("dp"), 2, (batch,), {}, "gen")
    rep_rank, _ = split_call(spec, 2, (batch,), {}, "gen", replica=1)
    assert [a[0]["x"].tolist() for a, _ in dp_rank] == [a[0]["x"].tolist() for a, _ in rep_rank]


# ---------------------------------------------------------------- config checks


def _cfg(**over):
    return load_config(preset="tiny-cpu", overrides=[f"{k}={v}" for k, v in over.items()])


def test_tp_rule_is_vllms():
    assert tp_fits(2, 4, 2) and tp_fits(4, 4, 2) and tp_fits(2, 8, 1)
    assert not tp_fits(2, 9, 3) and not tp_fits(3, 6, 4)


def test_tp_must_divide_the_world_and_needs_vllm():
    with pytest.raises(UserError, match="rollout.tensor_parallel_size=4 does not divide the 2 workers"):
        check_rollout_tp(_cfg(**{"rollout.tensor_parallel_size": 4}), None)
    with pytest.raises(UserError, match="needs rollout.engine=vllm"):
        check_rollout_tp(_cfg(**{"rollout.tensor_parallel_size": 2, "rollout.engine": "hf",
                                 "resources.devices_per_node": 2}), None)


def test_tp_not_dividing_heads_names_key_heads_and_values_that_work():
    cfg = _cfg(**{"rollout.tensor_parallel_size": 2, "resources.devices_per_node": 6})
    smollm2 = {"num_attention_heads": 9, "num_key_value_heads": 3}
    with pytest.raises(UserError) as e:
        check_rollout_tp(cfg, smollm2)
    text = str(e.value) + " " + (e.value.fix or "")
    assert "rollout.tensor_parallel_size=2" in text and "9 attention heads" in text
    assert "3 KV heads" in text and "one of: 1, 3" in text
    check_rollout_tp(cfg, {"num_attention_heads": 4, "num_key_value_heads": 2})  # tiny-qwen2


# ---------------------------------------------------------------- the 2-rank job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, world: int, tp: int, *extra: str) -> list[dict]:
    port, procs = _free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
        log = open(f"{out}.rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(JOB), str(out), str(tp), *extra],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = {r: Path(f"{out}.rank{r}.log").read_text()[-3000:] for r in range(world)}
    assert codes == [0] * world, logs
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def tp_job(tmp_path_factory):
    try:
        import vllm  # noqa: F401
    except Exception as e:
        pytest.skip(f"vllm not importable: {e}")
    out = tmp_path_factory.mktemp("tp") / "job"
    tp2 = _launch(out, 2, 2)
    tp1 = _launch(out.with_name("tp1"), 1, 1, f"{out}.weights.safetensors")
    return {"tp2": tp2, "tp1": tp1[0], "weights": f"{out}.weights.safetensors"}


@pytest.mark.slow  # one ~100 s job (2 ranks: FSDP + vLLM TP=2, then TP=1) serves both
def test_weight_buckets_stream_the_full_state_dict_bounded(tp_job):
    for r in tp_job["tp2"]:
        assert r["n_buckets"] > 3, r
        for key in ("bounded", "same_names", "same_values", "lm_head_synced", "bf16_cast"):
            assert r[key] is True, (key, r["rank"])
        assert r["sync_buckets"] > 1


@pytest.mark.slow  # one ~100 s job (2 ranks: FSDP + vLLM TP=2, then TP=1) serves both
def test_tp2_generates_what_tp1_and_the_trainer_do_after_a_sync(tp_job):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from verlcli.models.resolve import resolve_model

    r0, r1 = tp_job["tp2"]
    for r in (r0, r1):
        assert r["allreduce_after_create"] and r["allreduce_after_use"] and r["allreduce_after_shutdown"]
    assert [o[1] for o in r0["outputs"]] == [o[1] for o in r1["outputs"]]  # one engine, two ranks
    tp1 = tp_job["tp1"]["outputs"]
    assert [o[1] for o in r0["outputs"]] == [o[1] for o in tp1]
    for a, b in zip(r0["outputs"], tp1):
        assert a[2] == pytest.approx(b[2], abs=1e-3)
    # The trainer's weights in plain transformers: the same greedy continuation.
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-qwen2"), dtype=torch.float32).eval()
    model.load_state_dict(load_file(tp_job["weights"]), strict=False)
    model.tie_weights()
    for index, ids, _ in r0["outputs"]:
        seq = torch.tensor([PROMPTS[index] + ids])
        with torch.no_grad():
            logits = model(seq).logits[0, len(PROMPTS[index]) - 1:-1]
        assert logits.argmax(-1).tolist() == ids  # each token was the trainer's argmax
