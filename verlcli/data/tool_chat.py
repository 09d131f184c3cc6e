"""Chat templates with tools: rendering the tool list, tool calls and tool results.

Two cases, decided per template by rendering a probe (`tool_format`):

- The template renders `tools=` itself (Qwen2.5/Qwen3, Hermes models): it is used as is, with
  `apply_chat_template(messages, tools=schemas)` and role "tool" messages. Its format must be
  Hermes-style (`<tool_call>{json}</tool_call>`), the one format the parser reads.
- The template ignores `tools=` (SmolLM2-135M-Instruct, tiny-qwen2, most small chat models:
  `apply_chat_template` silently drops the tools): verl writes the tools the way Qwen2.5's
  template does, with plain messages, so the model's own turn markers stay untouched:
    * the tool list is a "# Tools" block with the JSON schemas in <tools></tools>, appended to
      the system message (a system message is added when there is none);
    * the results of one round of calls are ONE user message holding a
      `<tool_response>\\n...\\n</tool_response>` block per call.
  Why a user turn and not role "tool": a template without tool support knows only
  system/user/assistant — some reject other roles, some ("strict alternation") reject two
  non-assistant turns in a row, and a ChatML template would print a `tool` header the model
  has never seen. A user turn keeps user/assistant alternation and is byte-for-byte what
  Qwen2.5's own template produces for tool results.
In both cases the model writes a call as
    <tool_call>\\n{"name": "calculator", "arguments": {"expression": "4821 * 377"}}\\n</tool_call>
inside its assistant turn (plain assistant content; nothing is rewritten).
"""

from __future__ import annotations

import json

from verlcli.errors import UserError

_PROBE = {"type": "function", "function": {"name": "verl_probe_tool_5f3a", "description": "probe",
                                           "parameters": {"type": "object", "properties": {}}}}
_CACHE: dict[str, tuple[str, bool]] = {}


def tool_block(schemas: list[dict]) -> str:
    """The Hermes-style tool list (the words of Qwen2.5's template; models trained on it know them)."""
    listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def template_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def tool_format(tokenizer) -> str:
    """'hermes' (the template renders tools, Hermes-style), 'fallback' (it ignores tools: verl
    renders them) or 'other' (it renders tools in a format verl cannot parse)."""
    return _probe(tokenizer)[0]


def _probe(tokenizer) -> tuple[str, bool]:
    """(tool format, whether the template accepts a system message); cached per template."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if template not in _CACHE:
        user = [{"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(user, tools=[_PROBE], tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 (a template may reject the tools argument outright)
            text = ""
        if _PROBE["function"]["name"] not in text:
            fmt = "fallback"
        else:
            fmt = "hermes" if "<tool_call>" in text else "other"
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "s"}, *user], tokenize=False)
            system_ok = True
        except Exception:  # noqa: BLE001 (e.g. Gemma: "System role not supported")
            system_ok = False
        _CACHE[template] = (fmt, system_ok)
    return _CACHE[template]


def check_tool_template(tokenizer) -> None:
    if tool_format(tokenizer) == "other":
        raise UserError(
            f"the chat template of {template_name(tokenizer)!r} renders tools in its own format, not Hermes-style "
            "<tool_call>{json}</tool_call>, so verl cannot parse the model's tool calls",
            fix="use a model whose template uses <tool_call> (Qwen2.5, Qwen3, Hermes) or one whose template has no "
                "tool support (verl then writes the tools itself), or remove the tools",
        )


def fallback_messages(messages: list[dict], schemas: list[dict], system_ok: bool = True) -> list[dict]:
    """Messages with the tool list written in and tool results as <tool_response> user turns."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    for m in out:
        m.pop("_tool", None)
    if not schemas:
        return out
    block = tool_block(schemas)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{block}"
    elif system_ok:
        out.insert(0, {"role": "system", "content": f"You are a helpful assistant.\n\n{block}"})
    else:  # no system role in this template: the tool list opens the first user message
        first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        if first is None:
            out.insert(0, {"role": "user", "content": block})
        else:
            out[first]["content"] = f"{block}\n\n{out[first]['content']}"
    return out


def render_chat(tokenizer, messages: list[dict], schemas: list[dict] | None, *, add_generation_prompt: bool,
                where: str = "conversation") -> str:
    """The conversation as text, with `schemas` (function schemas) offered as tools."""
    fmt, system_ok = _probe(tokenizer)
    check_tool_template(tokenizer)
    kw = {}
    if fmt == "hermes" and schemas:
        kw["tools"] = schemas
    elif fmt == "fallback" or not schemas:
        messages = fallback_messages(messages, schemas or [], system_ok)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
    except Exception as e:  # noqa: BLE001 (jinja raises its own types)
        raise UserError(f"{where}: the chat template rejected these messages: {type(e).__name__}: {e}",
                        fix="check the roles/order of the messages against the model's chat template") from None


def tool_turn(tokenizer, contents: list[str], schemas: list[dict] | None) -> tuple[str, str]:
    """What the loop appends after a model turn that made tool calls: (close, text).

    close: the text the template puts right after an assistant message's content (for ChatML
      "<|im_end|>\\n"); when the model's output already ends with part of it (its end-of-turn
      token "<|im_end|>"), append only the rest.
    text: the tool results (one entry of `contents` per call, in call order) and the next
      assistant generation prompt, e.g.
      "<|im_start|>user\\n<tool_response>\\n1817517\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n".
    Found by rendering a conversation with and without the results (the model's own tokens are
    never re-rendered, so what it wrote is kept byte for byte)."""
    marker = "VERL_ASSISTANT_CONTENT_8c1d"
    base = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    before = render_chat(tokenizer, base, schemas, add_generation_prompt=False)
    after = render_chat(tokenizer, base + [{"role": "tool", "content": c} for c in contents], schemas,
                        add_generation_prompt=True)
    if not after.startswith(before):
        raise UserError(f"the chat template of {template_name(tokenizer)!r} re-renders earlier turns when a tool "
                        "result is added, so a multi-turn conversation cannot be extended token by token",
                        fix="use a model with a ChatML/Qwen-style chat template")
    return before[before.rindex(marker) + len(marker):], after[len(before):]
