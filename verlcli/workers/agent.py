"""The hybrid worker's multi-turn `generate` (rollout.multi_turn.enable): the agent loop
over this rank's rollout engine, laid out as training rows.

A trajectory is ONE response: `attention_mask` covers all of it (the model sees the tool
results), `response_mask` (the loss mask) only the tokens the model sampled, and the rollout
log-probs are the engine's at those tokens and 0 at inserted ones (seq.build_rows). The
non-tensor columns say how each trajectory went; trainer/metrics.agent_metrics reads them.
"""

from __future__ import annotations

from verlcli.data.batch import Batch
from verlcli.workers import seq


def make_agent_loop(cfg, engine, tokenizer):
    """The loop with the configured tools and the parser of this tokenizer's chat template
    (UserError when the template has no tool format)."""
    from verlcli.rollout.agent_loop import AgentLoop
    from verlcli.tools import make_tools, parser_for

    mt = cfg.rollout.multi_turn
    tools = make_tools(list(cfg.tools), timeout_s=mt.tool_timeout_s, memory_mb=mt.tool_memory_mb)
    return AgentLoop(engine, tokenizer, tools, parser_for(tokenizer), budget_tokens=cfg.data.max_response_tokens,
                     max_turns=mt.max_turns, max_tool_response_tokens=mt.max_tool_response_tokens)


def agent_generate(loop, batch: Batch, prompts: list[list[int]], spec, pad_id: int, cfg) -> Batch:
    """Rows for `prompts` (already repeated n times) from multi-turn trajectories."""
    from verlcli.errors import UserError

    if "prompt_messages" not in batch:
        raise UserError("rollout.multi_turn.enable=true, but the prompt batch carries no chat messages",
                        fix="load prompts with verl's dataset loader (it keeps each prompt's messages)")
    allowed = batch["tools"] if "tools" in batch else [None] * len(prompts)
    trajs = loop.run(prompts, [list(m) for m in batch["prompt_messages"]],
                     [None if a is None else list(a) for a in allowed], spec)
    rows = seq.build_rows(prompts, [t.ids for t in trajs], [t.logprobs for t in trajs], pad_id,
                          cfg.data.max_prompt_tokens, cfg.data.max_response_tokens,
                          loss_masks=[t.loss_mask for t in trajs])
    return Batch(rows, {
        "finish_reason": ["stop" if t.finish == "answer" else "length" for t in trajs],
        "agent_finish": [t.finish for t in trajs],
        "agent_turns": [t.turns for t in trajs],
        "agent_calls": [list(t.calls) for t in trajs],
        "agent_inserted_tokens": [t.inserted for t in trajs],
    })
