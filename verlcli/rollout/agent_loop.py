"""The agent loop: multi-turn tool-calling rollouts over any `RolloutEngine`.

    loop = AgentLoop(engine, tokenizer, tools, parser, budget_tokens=512, max_turns=4)
    trajs = loop.run(prompt_ids, prompt_messages, allowed_tools, spec)

Each round, every active conversation is generated in ONE `engine.generate` call (n=1 per
row) from its token ids so far. A turn that ends with a tool call gets the tools run and
their results appended as tool messages; the rest end: with an answer (no call), at
`max_turns`, or at the token budget of the whole trajectory (model + inserted tokens).

Token ids. The model's own tokens are kept exactly as sampled (never re-tokenized). The
tokens the loop inserts (the tool message and the template tokens that open the next
assistant turn) are what the chat template renders for the whole conversation after the
model's text: the conversation is rendered (tools included) with the model's turns as
assistant messages, the rendering must start with the prompt's rendering plus the text the
trajectory already holds (the check), and the rest is the inserted text, tokenized alone.
A conversation whose rendering does not extend its text (a template that rewrites the
model's turn, e.g. trims it) ends there: counted as `mismatch`, never trained on wrong ids.

Per trajectory: `ids` (the whole response), `loss_mask` (1 = sampled by the model),
`logprobs` (the engine's for sampled tokens, 0 at inserted ones), `final_text` (the last
model turn: what the reward scores), turns, tool calls and how it ended.
"""

from __future__ import annotations

import dataclasses
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from verlcli.rollout.base import RolloutEngine, SamplingSpec

# How a trajectory ended. "answer": the last model turn had no tool call and ended on its own.
FINISHES = ("answer", "max_turns", "length", "mismatch")


@dataclass
class Trajectory:
    prompt_ids: list[int]
    messages: list[dict]          # the conversation so far, for rendering
    tools: list[str]              # tool names this prompt may call
    prefix: str                   # the template's rendering of the prompt (with its tools)
    ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""                # what `ids` render as, after `prefix`
    turns: int = 0
    calls: list[tuple[str, bool]] = field(default_factory=list)  # (tool name, ok) in order
    finish: str = ""
    final_text: str = ""
    inserted: int = 0             # tokens the loop inserted (not trained on)


class AgentLoop:
    def __init__(self, engine: RolloutEngine, tokenizer, tools: dict, parser, *, budget_tokens: int,
                 max_turns: int, max_tool_response_tokens: int = 256, tool_workers: int = 4):
        self.engine = engine
        self.tok = tokenizer
        self.tools = tools
        self.parser = parser
        self.budget = budget_tokens
        self.max_turns = max_turns
        self.max_tool_tokens = max_tool_response_tokens
        self.tool_workers = tool_workers
        self.eos_ids = {tokenizer.eos_token_id} | set(getattr(engine, "eos_ids", []) or [])
        self._warned = self._warned_prompt = False

    # ------------------------------------------------------------------ public
    def run(self, prompts: list[list[int]], messages: list[list[dict]], allowed: list[list[str] | None],
            spec: SamplingSpec) -> list[Trajectory]:
        """One trajectory per prompt (repeat prompts for n samples), in order."""
        trajs = [self._start(p, m, a) for p, m, a in zip(prompts, messages, allowed)]
        active = list(trajs)
        rnd = 0
        while active:
            room = [self.budget - len(t.ids) for t in active]
            # One call for the whole round; a row with less room than the longest is cut after.
            round_spec = dataclasses.replace(spec, n=1, max_tokens=max(room),
                                             seed=None if spec.seed is None else spec.seed + rnd)
            outs = self.engine.generate([t.prompt_ids + t.ids for t in active], round_spec)
            calling = []
            for t, out, r in zip(active, outs, room):
                calls = self._model_turn(t, out.response_ids[:r], out.logprobs[:r],
                                         out.finish_reason if len(out.response_ids) <= r else "length")
                if calls:
                    calling.append((t, calls))
            results = self._run_tools(calling)
            active = [t for (t, _), res in zip(calling, results) if self._insert(t, res)]
            rnd += 1
        return trajs

    # ------------------------------------------------------------------ steps
    def _start(self, prompt_ids, messages, allowed) -> Trajectory:
        names = list(self.tools) if allowed is None else list(allowed)
        unknown = [n for n in names if n not in self.tools]
        if unknown:
            from verlcli.errors import UserError

            raise UserError(f"a prompt's tools column names {unknown}, which are not among tools={list(self.tools)}",
                            fix="add them to tools=[...] or fix the dataset's tools column")
        messages = [dict(m) for m in messages]
        prefix = self._render(messages, names, add_generation_prompt=True)
        if not self._warned_prompt and self.tok.decode(list(prompt_ids), skip_special_tokens=False) != prefix:
            # Not fatal (the inserted tokens are computed relative to `prefix`), but the model
            # may not have been shown the tools it is expected to call.
            self._warned_prompt = True
            warnings.warn("agent loop: a prompt's tokens differ from the chat template's rendering of its "
                          "messages with its tools (tokenized without the tool schemas, or truncated?)",
                          stacklevel=2)
        return Trajectory(list(prompt_ids), messages, names, prefix)

    def _model_turn(self, t: Trajectory, ids: list[int], logprobs: list[float], finish: str):
        """Append the model's tokens; return the tool calls to run (empty: the trajectory ended)."""
        t.ids += ids
        t.loss_mask += [1] * len(ids)
        t.logprobs += list(logprobs)
        t.turns += 1
        content_ids = ids[:-1] if ids and ids[-1] in self.eos_ids else ids
        content = self.tok.decode(content_ids, skip_special_tokens=False)
        t.text += self.tok.decode(ids, skip_special_tokens=False)
        t.final_text = self.tok.decode(content_ids, skip_special_tokens=True)
        # The turn as an assistant message: its raw text (tool calls included), which is what
        # templates of the Hermes family render back verbatim.
        t.messages.append({"role": "assistant", "content": content})
        if finish == "length" or len(t.ids) >= self.budget:
            t.finish = "length"
            return []
        calls = self.parser.parse(content)
        if not calls:
            t.finish = "answer"
            return []
        if t.turns >= self.max_turns:
            t.finish = "max_turns"
            return []
        return calls

    def _run_tools(self, calling: list) -> list:
        """Every conversation's calls of this round, concurrently (tools sandbox themselves)."""
        from verlcli.tools import run_tools

        if not calling:
            return []

        def one(item):
            t, calls = item
            return run_tools(calls, {n: self.tools[n] for n in t.tools})

        with ThreadPoolExecutor(max_workers=max(1, min(self.tool_workers, len(calling)))) as pool:
            return list(pool.map(one, calling))

    def _insert(self, t: Trajectory, results: list) -> bool:
        """Append the tool messages and the next turn's opening; False when the trajectory ends."""
        results = [self._cut(r) for r in results]
        t.calls += [(r.name, bool(r.ok)) for r in results]
        t.messages += self._tool_messages(results)
        full = self._render(t.messages, t.tools, add_generation_prompt=True)
        have = t.prefix + t.text
        if not full.startswith(have):
            self._warn_mismatch(have, full)
            t.finish = "mismatch"
            return False
        delta = self.tok.encode(full[len(have):], add_special_tokens=False)
        if len(t.ids) + len(delta) >= self.budget:  # no room left for the model to answer
            t.finish = "length"
            return False
        t.ids += delta
        t.loss_mask += [0] * len(delta)
        t.logprobs += [0.0] * len(delta)
        t.text += full[len(have):]
        t.inserted += len(delta)
        return True

    # ------------------------------------------------------------------ helpers
    def _render(self, messages: list[dict], names: list[str], add_generation_prompt: bool) -> str:
        # render_chat: the template's own tool format, or verl's Hermes-style rendering for
        # templates without one (the same function renders the dataset's prompts).
        from verlcli.tools import render_chat, tool_schemas

        schemas = tool_schemas([self.tools[n] for n in names]) if names else None
        return render_chat(self.tok, messages, schemas, add_generation_prompt=add_generation_prompt)

    def _tool_messages(self, results: list) -> list[dict]:
        render = getattr(self.parser, "render_results", None)
        if render is not None:
            return render(results)
        return [{"role": "tool", "name": r.name, "content": r.content} for r in results]

    def _cut(self, result):
        """A result over max_tool_response_tokens keeps its first tokens and says it was cut."""
        ids = self.tok.encode(result.content or "", add_special_tokens=False)
        if len(ids) <= self.max_tool_tokens:
            return result
        cut = self.tok.decode(ids[: self.max_tool_tokens]) + f"\n... (cut: {len(ids)} tokens)"
        return dataclasses.replace(result, content=cut)

    def _warn_mismatch(self, have: str, full: str) -> None:
        if self._warned:
            return
        self._warned = True
        at = next((i for i, (a, b) in enumerate(zip(have, full)) if a != b), min(len(have), len(full)))
        name = getattr(self.tok, "name_or_path", "") or type(self.tok).__name__
        warnings.warn(f"agent loop: the chat template of {name!r} does not render the conversation as an "
                      f"extension of the tokens so far (first difference at char {at}: had "
                      f"{have[at:at + 40]!r}, template gives {full[at:at + 40]!r}); such trajectories end "
                      "there (agent/finish/mismatch)", stacklevel=2)
