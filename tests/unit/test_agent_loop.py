"""The multi-turn agent loop (rollout/agent_loop.py) and training on its trajectories, on
tiny-qwen2 (fp32) with the real calculator tool: its own template (no tool format: verl
writes the tools Hermes-style) and a copy whose template renders tools itself.

tiny-qwen2 is random-init and never writes a tool call by itself, so the tool path is driven
by TEST-ONLY engines, clearly not product code:
  * `ScriptedEngine` returns fixed turns (a calculator call, then an answer) with made-up
    log-probs: the token/mask layout test, where only positions matter.
  * `ForcedFirstTurn` wraps the REAL hf engine: the first turn of each conversation is a fixed
    tool call scored by the real model (teacher forcing, the log-probs it would report had it
    sampled those tokens), every later turn is really sampled. The trainer's recomputed
    log-probs must then equal the rollout's at every model token, across the inserted tool
    results.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from verlcli.rollout import RolloutEngine, RolloutOutput, SamplingSpec
from verlcli.rollout.agent_loop import AgentLoop

# Hermes/Qwen2.5-style: tools listed in a system turn, calls as <tool_call>{json}</tool_call>,
# results as a user turn wrapped in <tool_response>.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call these tools:\n<tools>\n"
    "{%- for t in tools %}{{ t | tojson }}\n{%- endfor %}</tools>\n"
    "Call one as <tool_call>{\"name\": NAME, \"arguments\": ARGS}</tool_call><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 456"}}</tool_call>'
QUESTION = [{"role": "user", "content": "What is 123 * 456?"}]
R = 160  # data.max_response_tokens of the worker: the budget of a whole trajectory


@pytest.fixture(scope="module")
def tiny():
    from verlcli.models.resolve import resolve_model

    return resolve_model("tiny-qwen2")


@pytest.fixture(scope="module")
def hermes_model(tiny, tmp_path_factory):
    """tiny-qwen2 with a template that renders tools itself (its own has no tool format:
    verl then writes the tool list and results, tools/parser.py)."""
    path = tmp_path_factory.mktemp("tiny-hermes") / "model"
    shutil.copytree(tiny, path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TOOL_TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def tools():
    from verlcli.tools import make_tools

    return make_tools(["calculator"], timeout_s=5.0, memory_mb=512)


def _prompt(tok, tools, messages=QUESTION) -> list[int]:
    from verlcli.tools import render_chat, tool_schemas

    text = render_chat(tok, messages, tool_schemas(tools), add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


class ScriptedEngine(RolloutEngine):
    """TEST ONLY: answers from a script, one list of token ids per call and row."""

    def __init__(self, turns: list[list[int]]):
        self.turns, self.calls, self.batch_sizes = turns, 0, []

    def generate(self, prompts, spec):
        ids = self.turns[self.calls]
        self.calls += 1
        self.batch_sizes.append(len(prompts))
        return [RolloutOutput(i, ids[: spec.max_tokens], [-0.5] * min(len(ids), spec.max_tokens),
                              "stop" if len(ids) <= spec.max_tokens else "length") for i in range(len(prompts))]

    def sync_weight_buckets(self, buckets):
        return {}


@pytest.mark.parametrize("template", ["fallback", "hermes"])
def test_mask_and_ids_on_a_hand_built_conversation(template, tok, hermes_model, tools):
    from transformers import AutoTokenizer

    from verlcli.tools import parser_for, render_chat, tool_schemas

    if template == "hermes":
        tok = AutoTokenizer.from_pretrained(hermes_model)
    assert parser_for(tok).source == template

    eos = tok.eos_token_id
    call_ids = tok.encode(CALL, add_special_tokens=False) + [eos]
    answer_ids = tok.encode("The answer is 56088.", add_special_tokens=False) + [eos]
    engine = ScriptedEngine([call_ids, answer_ids])
    loop = AgentLoop(engine, tok, tools, parser_for(tok), budget_tokens=200, max_turns=4)
    prompt = _prompt(tok, tools)
    [t] = loop.run([prompt], [QUESTION], [None], SamplingSpec(temperature=1.0, max_tokens=200))

    assert t.finish == "answer" and t.turns == 2 and t.calls == [("calculator", True)]
    # The whole trajectory is exactly the template's tokens for the whole conversation
    # (its trailing newline after the final <|im_end|> is the template's, never sampled).
    convo = QUESTION + [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "56088"},
                        {"role": "assistant", "content": "The answer is 56088."}]
    full = render_chat(tok, convo, tool_schemas(tools), add_generation_prompt=False)
    assert prompt + t.ids + tok.encode("\n", add_special_tokens=False) == tok.encode(full, add_special_tokens=False)
    # Loss mask: the two model turns, nothing the loop inserted; log-probs 0 where inserted.
    inserted = len(t.ids) - len(call_ids) - len(answer_ids)
    assert t.loss_mask == [1] * len(call_ids) + [0] * inserted + [1] * len(answer_ids)
    assert inserted == t.inserted > 0
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if m == 0)
    assert all(lp == -0.5 for lp, m in zip(t.logprobs, t.loss_mask) if m == 1)
    middle = tok.decode(t.ids[len(call_ids): len(call_ids) + inserted])
    assert "<tool_response>\n56088\n</tool_response>" in middle and middle.endswith("<|im_start|>assistant\n")
    assert t.final_text == "The answer is 56088."

    # The same through the worker's row layout: attention covers all, the loss mask has a hole.
    from verlcli.workers import seq

    rows = seq.build_rows([prompt], [t.ids], [t.logprobs], 0, len(prompt), 200, loss_masks=[t.loss_mask])
    n = len(t.ids)
    assert rows["attention_mask"][0, len(prompt):len(prompt) + n].all()
    assert rows["response_mask"][0, :n].tolist() == t.loss_mask
    from verlcli.data.batch import Batch
    from verlcli.trainer.steps import decode_responses, last_model_turn

    assert last_model_turn(rows["response_mask"][0]) == (n - len(answer_ids), n)
    # The reward reads the final answer, not the calculator's output or the call.
    assert decode_responses(tok, Batch(rows)) == ["The answer is 56088."]


def test_budget_max_turns_and_one_engine_call_per_round(tok, tools):
    from verlcli.tools import parser_for

    call_ids = tok.encode(CALL, add_special_tokens=False) + [tok.eos_token_id]
    prompt = _prompt(tok, tools)
    # Always calling: ends at max_turns; three conversations share each engine call.
    engine = ScriptedEngine([call_ids] * 3)
    loop = AgentLoop(engine, tok, tools, parser_for(tok), budget_tokens=500, max_turns=3)
    trajs = loop.run([prompt] * 3, [QUESTION] * 3, [None] * 3, SamplingSpec(max_tokens=500))
    assert engine.batch_sizes == [3, 3, 3]
    assert all(t.finish == "max_turns" and t.turns == 3 and len(t.calls) == 2 for t in trajs)
    # A budget that cuts the second turn: never more tokens than the budget, ends at "length".
    budget = len(call_ids) + 30
    loop = AgentLoop(ScriptedEngine([call_ids] * 3), tok, tools, parser_for(tok), budget_tokens=budget, max_turns=4)
    [t] = loop.run([prompt], [QUESTION], [None], SamplingSpec(max_tokens=budget))
    assert t.finish == "length" and len(t.ids) <= budget
    # A tool the prompt may not use is an error message to the model, not a crash.
    loop = AgentLoop(ScriptedEngine([call_ids, call_ids]), tok, tools, parser_for(tok), budget_tokens=500, max_turns=2)
    [t] = loop.run([prompt], [QUESTION], [[]], SamplingSpec(max_tokens=500))
    assert t.calls == [("calculator", False)]


class ForcedFirstTurn(RolloutEngine):
    """TEST ONLY: the first engine call returns `forced` for every row, scored by `model` (the
    rollout's weights; teacher forcing at the sampling temperature: the log-probs the engine
    would report had it sampled those tokens); later calls are the real engine's."""

    def __init__(self, real, model, forced: list[int]):
        self.real, self.model, self.forced, self.calls = real, model, forced, 0

    def generate(self, prompts, spec):
        self.calls += 1
        if self.calls > 1:
            return self.real.generate(prompts, spec)
        outs = []
        for i, p in enumerate(prompts):
            with torch.no_grad():
                logits = self.model(torch.tensor([p + self.forced])).logits[0, len(p) - 1:-1].float()
            lp = (logits / spec.temperature).log_softmax(-1).gather(-1, torch.tensor(self.forced)[:, None])[:, 0]
            outs.append(RolloutOutput(i, list(self.forced), lp.tolist(), "stop"))
        return outs

    def sync_weight_buckets(self, buckets):
        return self.real.sync_weight_buckets(buckets)

    # The worker's memory modes act on the real engine (it sleeps outside generation).
    def sleep(self):
        self.real.sleep()

    def wake(self, tags=None):
        self.real.wake(tags)

    def drop_weights(self):
        self.real.drop_weights()

    @property
    def weights_dropped(self):
        return self.real.weights_dropped


@pytest.fixture(scope="module")
def ref_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


# The trainer's log-probs vs the engine's at sampled tokens (fp32): the hf engine computes them
# with the same model code (~1e-6); vLLM's kernels differ slightly (test_rollout.py: 1e-3).
GAP = {"hf": 1e-4, "vllm": 2e-3}


@pytest.fixture(scope="module", params=["hf", "vllm"])
def worker(request, tiny):
    """A hybrid worker (actor + rollout engine) in this process, multi-turn on, fp32."""
    from verlcli.config.loader import load_config
    from verlcli.distributed import make_worker_group
    from verlcli.workers.hybrid import HybridWorker

    if request.param == "vllm":
        pytest.importorskip("vllm")
    cfg = load_config(preset="tiny-cpu", overrides=[
        f"rollout.engine={request.param}", "launcher=local", "resources.devices_per_node=1",
        "rollout.multi_turn.enable=true", "tools=[calculator]", "rollout.multi_turn.max_turns=3",
        "rollout.multi_turn.max_tool_response_tokens=16", "data.max_prompt_tokens=448", f"data.max_response_tokens={R}"])
    group = make_worker_group("local", HybridWorker, name="actor", resources={"device": "cpu"},
                              init_kwargs={"cfg": cfg.model_dump(mode="json"), "roles": ["actor", "rollout"],
                                           "total_steps": 1})
    group.engine_name = request.param
    yield group
    group.shutdown()


def _prompt_batch(tok, tools, n: int):
    from verlcli.data.batch import Batch

    msgs = [[{"role": "user", "content": f"What is {a} * {b}?"}] for a, b in ((123, 456), (77, 89))]
    batch = Batch(non_tensors={"prompt_ids": [_prompt(tok, tools, m) for m in msgs], "prompt_messages": msgs,
                               "uid": ["a", "b"]},
                  meta={"temperature": 1.0, "top_p": 1.0, "top_k": -1})
    return batch.repeat(n, interleave=True)


def test_trainer_log_probs_equal_the_rollouts_at_model_tokens(worker, ref_model, tok, tools):
    w = worker.worker
    real = w.rollout
    call_ids = tok.encode(CALL, add_special_tokens=False) + [tok.eos_token_id]
    w.rollout, w.agent_loop = ForcedFirstTurn(real, ref_model, call_ids), None
    try:
        batch = worker.generate(_prompt_batch(tok, tools, 2))
    finally:
        w.rollout, w.agent_loop = real, None
    mask, am = batch["response_mask"], batch["attention_mask"][:, batch["prompts"].shape[1]:]
    assert all(calls == [("calculator", True)] for calls in batch["agent_calls"])
    assert list(batch["agent_turns"]) and min(batch["agent_turns"]) == 2
    # Holes: inserted tokens are attended to but not trained on, and carry log-prob 0.
    holes = (am == 1) & (mask == 0)
    assert holes.any(dim=1).all()
    assert (batch["rollout_log_probs"][holes] == 0).all()
    assert (am.sum(-1) <= R).all()  # the whole trajectory within data.max_response_tokens
    # The trainer's forward over the whole trajectory gives the rollout's log-probs back at
    # every model token: the forced call, and the turn sampled after the tool result.
    old = worker.compute_log_probs(batch)
    m = mask.bool()
    gap = (old["old_log_probs"][m] - batch["rollout_log_probs"][m]).abs()
    assert gap.max() < GAP[worker.engine_name], float(gap.max())
    first = len(call_ids)
    assert mask[:, first + 1:].sum() > 0  # tokens sampled after the tool result are in the check


def test_real_engine_multi_turn_generate_respects_the_budget(worker, tok, tools):
    batch = worker.generate(_prompt_batch(tok, tools, 2))
    am = batch["attention_mask"][:, batch["prompts"].shape[1]:]
    assert (am.sum(-1) <= R).all() and (batch["response_mask"] <= am).all()
    assert set(batch["agent_finish"]) <= {"answer", "length", "max_turns", "mismatch"}
    from verlcli.trainer.metrics import agent_metrics

    m = agent_metrics(batch)
    assert 0.0 <= m["agent/answered_frac"] <= 1.0 and m["agent/turns_mean"] >= 1


def test_config_checks_name_the_key():
    from verlcli.config.loader import load_config
    from verlcli.errors import UserError

    with pytest.raises(UserError, match="no tools") as e:
        load_config(preset="tiny-cpu", overrides=["rollout.multi_turn.enable=true"])
    assert "tools=[calculator]" in e.value.fix
    with pytest.raises(UserError, match="max_tool_response_tokens"):
        load_config(preset="tiny-cpu", overrides=["rollout.multi_turn.enable=true", "tools=[calculator]",
                                                  "rollout.multi_turn.max_tool_response_tokens=64"])
