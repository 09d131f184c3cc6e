"""Reading tool calls out of the model's text, in its chat template's format.

`parser_for(tokenizer)` picks the parser: Hermes-style `<tool_call>{json}</tool_call>` for
templates that render tools that way (Qwen2.5/Qwen3, Hermes) and for templates that ignore
tools (SmolLM2, tiny-qwen2: verl then writes the tool list in that same format, see
verlcli/data/tool_chat.py). A template with another native tool format (e.g. Llama 3.1's
`<|python_tag|>`, Mistral's `[TOOL_CALLS]`) is a UserError naming the template.
"""

from __future__ import annotations

import json
import re

from verlcli.data.parquet import check_chat_template
from verlcli.data.tool_chat import check_tool_template, tool_format
from verlcli.tools.base import ToolCall

_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)


class HermesParser:
    """`.parse(text) -> list[ToolCall]`; an empty list means the model made no call (an answer).

    Every <tool_call> block is one call, in order. A final block without </tool_call> counts
    too (generation stopped on the stop string "</tool_call>", which engines drop from the
    text). A block that is not {"name": str, "arguments": {...}} JSON is still a call — the
    model tried — with `error` set, so the loop tells the model and counts the failure."""

    start, end = "<tool_call>", "</tool_call>"

    def __init__(self, source: str = "hermes"):
        self.source = source  # "hermes" (the template's own) or "fallback" (verl renders tools)

    def parse(self, text: str) -> list[ToolCall]:
        return [_read_call(m.group(1), m.group(0)) for m in _BLOCK.finditer(text or "")]


def _read_call(body: str, raw: str) -> ToolCall:
    body = body.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        obj = _first_json_object(body)
    if not isinstance(obj, dict):
        return ToolCall("", {}, raw, error='expected {"name": ..., "arguments": {...}} JSON inside <tool_call>')
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return ToolCall(name if isinstance(name, str) else "", {}, raw, error="the arguments are not valid JSON")
    if not isinstance(name, str) or not name:
        return ToolCall("", {}, raw, error='the call has no "name"')
    if not isinstance(args, dict):
        return ToolCall(name, {}, raw, error='"arguments" must be a JSON object')
    return ToolCall(name, args, raw)


def _first_json_object(text: str):
    """The JSON object at the first '{' (the model may add words after it); None if none."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except json.JSONDecodeError:
        return None


def parser_for(tokenizer) -> HermesParser:
    """The tool-call parser for this tokenizer's chat template (UserError when it has none)."""
    check_chat_template(tokenizer)
    check_tool_template(tokenizer)
    return HermesParser(tool_format(tokenizer))
