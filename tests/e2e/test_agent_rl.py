"""Multi-turn tool-calling RL end to end: `verl grpo` with rollout.multi_turn on tiny-qwen2
(its template has no tool format: verl writes the tools Hermes-style) with the calculator and
the vLLM engine, then `verl eval --tool` on its checkpoint with the hf engine. tiny-qwen2 is
random-init and rarely writes a tool call, so here the loop mostly ends after one turn; the tool path itself (calls, inserted tokens, masks, log-prob parity)
is covered by tests/unit/test_agent_loop.py."""

import json

from e2e_helpers import ok, verl


def test_grpo_multi_turn_then_eval_with_tools(workdir):
    run = workdir / "runs" / "agent"
    ok(verl("grpo", "--preset", "tiny-cpu", f"trainer.run_dir={run}", "data.max_prompt_tokens=512",
            "launcher=local", "resources.devices_per_node=1", "rollout.engine=vllm",
            "rollout.multi_turn.enable=true", "tools=[calculator]", "rollout.multi_turn.max_turns=3",
            "rollout.multi_turn.max_tool_response_tokens=16", "data.max_response_tokens=48",
            "trainer.total_steps=1", "trainer.val_every=1", "data.val_prompts=4",
            "trainer.val_before_train=false", "logging.progress_bar=false", cwd=workdir))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "score/mean" in m]
    assert [m["step"] for m in steps] == [1]
    for m in steps:
        assert 1 <= m["agent/turns_mean"] <= 3 and 0 <= m["agent/answered_frac"] <= 1
        assert m["response/length_max"] <= 48
    assert any("val/agent/answered_frac" in m for m in rows)

    out = workdir / "evals" / "agent"
    r = ok(verl("eval", "--model", run / "checkpoints" / "step_1", "--data", "data/arithmetic/test.parquet",
                "--engine", "hf", "--limit", "4", "--max-tokens", "48", "--max-prompt-tokens", "512", "--tool", "calculator", "--max-turns", "3",
                "--out", out, cwd=workdir))
    assert "agent:" in r.stdout
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 and all(g["turns"] >= 1 and "trajectory" in g for g in gens)
    assert "agent" in json.loads((out / "metrics.json").read_text())["config"]
