"""`verl grpo` with the megatron-core actor at tensor_parallel_size=2 (2 Ray workers, gloo,
vLLM rollout): a step, a checkpoint, a resumed step, then merge-checkpoint --verify."""

import json

import pytest

from e2e_helpers import ok, verl

pytest.importorskip("megatron.core")


@pytest.mark.slow  # ~150 s: two short runs (Ray + 2 vLLM engines each) and a merge
def test_grpo_megatron_tp2_resume_and_merge(workdir):
    run = workdir / "runs" / "megatron"
    args = ["--preset", "tiny-cpu", f"trainer.run_dir={run}", "actor.strategy=megatron",
            "actor.tensor_parallel_size=2", "trainer.val_every=0", "trainer.save_every=1",
            "trainer.val_before_train=false", "logging.progress_bar=false"]
    ok(verl("grpo", *args, "trainer.total_steps=1", cwd=workdir))
    r = ok(verl("grpo", *args, "trainer.total_steps=2", cwd=workdir))
    assert "resumed from" in r.stderr + r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in rows if "score/mean" in m]
    assert [m["step"] for m in rows] == [1, 2]
    # fp32 vLLM vs the fp32 Megatron actor: the streamed, TP-gathered weights must be fresh.
    assert rows[-1]["rollout/logprob_gap_mean"] < 0.05
    ckpt = run / "checkpoints" / "step_2"
    meta = json.loads((ckpt / "actor" / "meta.json").read_text())
    assert meta["strategy"] == "megatron" and meta["tensor_parallel_size"] == 2
    out = workdir / "merged_megatron"
    ok(verl("merge-checkpoint", ckpt, "--out", out, "--verify", cwd=workdir))
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
