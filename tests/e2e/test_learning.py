"""The reward must rise: GRPO on the real SmolLM2-135M-Instruct (built in, offline) learning
short arithmetic with the `#### N` answer format, on CPU with Ray + vLLM. Held-out greedy
validation reward before training vs after one GRPO step (8 prompts × 4 samples).

One step, not eight (the suite has a time budget): with ≤32 response tokens and lr 5e-5 a
single update already moves the held-out reward well past the bar — measured here (fp32, this
CPU has no bf16): 0.073 -> 0.208, and a second run repeated step 1 exactly. The multi-step loop itself
(rollouts from synced weights, resume) is covered on tiny-qwen2 by the other e2e tests."""

import json

from e2e_helpers import ok, verl


def test_grpo_raises_heldout_reward(tmp_path_factory, verl_home):
    wd = tmp_path_factory.mktemp("learn")
    ok(verl("prepare-data", "arithmetic", "--max-operand", "20", "--operators", "+*", "--train-size", "400",
            "--test-size", "48", "--seed", "0", cwd=wd))
    run = wd / "runs" / "learn"
    ok(verl("grpo", "--preset", "smollm2-135m-cpu", f"trainer.run_dir={run}", "trainer.total_steps=1",
            "trainer.val_every=1", "trainer.save_every=0", "data.val_prompts=48", "data.max_response_tokens=32",
            "data.train_prompts_per_step=8", "actor.mini_batch_prompts=8",
            "actor.optim.lr=5e-5", "actor.optim.schedule=constant", "logging.progress_bar=false", cwd=wd,
            timeout=1500))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val/score/mean"]) for r in rows if "val/score/mean" in r]
    assert [s for s, _ in val] == [0, 1]
    before, after = val[0][1], val[-1][1]
    assert after > before + 0.05, f"held-out reward did not rise: {before:.3f} -> {after:.3f}"
