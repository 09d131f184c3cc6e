"""`verl grpo` with rollout tensor parallelism on CPU: 2 Ray workers share ONE vLLM engine
(rollout.tensor_parallel_size=2, external launcher inside the gloo world), weights streamed
in 1 MB buckets. The log-prob gap between the TP engine and the FSDP trainer shows the sync
and the per-replica dispatch are right (a stale or misordered rollout would be far off)."""

import json

from e2e_helpers import ok, verl


def test_grpo_rollout_tp2_one_engine_two_ranks(workdir):
    run = workdir / "runs" / "grpo_tp2"
    ok(verl("grpo", "--preset", "tiny-cpu", f"trainer.run_dir={run}", "rollout.tensor_parallel_size=2",
            "rollout.sync_bucket_mb=1", "trainer.total_steps=1", "trainer.val_every=0",
            "trainer.val_before_train=false", "logging.progress_bar=false", cwd=workdir))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in rows if "score/mean" in m][-1]
    assert last["step"] == 1
    assert last["sync/buckets"] > 1 and last["sync/gbps"] > 0
    # fp32 vLLM (TP=2) vs fp32 FSDP: the rollout log-probs are the trainer's
    assert last["rollout/logprob_gap_mean"] < 0.05
