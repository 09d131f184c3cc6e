"""The tool interface the multi-turn agent loop codes against.

    ToolCall(name, arguments, raw)          one call parsed from the model's text (parser.py)
    ToolResult(name, content, ok, error)    what goes back to the model as a tool message
    Tool                                    name, description, parameters (JSON schema);
                                            tool(arguments) -> ToolResult, never raises
    run_tools(calls, tools) -> results      one result per call, in order; never raises
    tool_schemas(tools) -> [ {"type": "function", "function": {...}} ]  (OpenAI / HF format,
                                            what `apply_chat_template(..., tools=...)` takes)

A failure (unknown tool, bad arguments, a call that could not be parsed, an exception, a
timeout) is a ToolResult with ok=False: `content` is the message the model reads ("Error: ..."),
`error` a short reason for metrics and logs. Nothing a model writes can crash the run.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# JSON-schema type name -> Python types accepted (bool is not an integer here: the model
# writing `true` for a count is a mistake worth telling it about).
_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "array": (list,), "object": (dict,), "null": (type(None),)}


@dataclass
class ToolCall:
    name: str
    arguments: dict
    raw: str  # the text the call was parsed from (logs; failures quote it)
    error: str | None = None  # set by the parser when `raw` is not a valid call


@dataclass
class ToolResult:
    name: str
    content: str  # the tool message the model sees (an "Error: ..." text when not ok)
    ok: bool
    error: str | None = None


def failure(name: str, why: str) -> ToolResult:
    return ToolResult(name=name, content=f"Error: {why}", ok=False, error=why)


@dataclass
class Tool:
    """A named function the model may call. Subclasses implement `run(arguments) -> str`
    (raise ToolFailure or any exception for a failure); `__call__` checks the arguments
    against `parameters` first and turns every failure into ToolResult(ok=False)."""

    name: str
    description: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def run(self, arguments: dict) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def schema(self) -> dict:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, arguments: dict) -> ToolResult:
        why = check_arguments(arguments, self.parameters)
        if why:
            return failure(self.name, f"{self.name}: {why}")
        try:
            return ToolResult(self.name, self.run(arguments), True, None)
        except ToolFailure as e:
            return failure(self.name, f"{self.name}: {e}")
        except Exception as e:  # noqa: BLE001 (a tool bug must not end the run)
            return failure(self.name, f"{self.name}: {type(e).__name__}: {e}")


class ToolFailure(Exception):
    """A tool's expected failure (bad expression, timeout): its text goes to the model."""


def check_arguments(arguments, schema: dict) -> str | None:
    """A short reason when `arguments` do not fit the (flat) JSON schema, else None.
    Checks the top level only: object, required keys, unknown keys, property types."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    props = schema.get("properties") or {}
    missing = [k for k in schema.get("required") or [] if k not in arguments]
    if missing:
        return f"missing argument {', '.join(map(repr, missing))}"
    if schema.get("additionalProperties", True) is False or props:
        extra = [k for k in arguments if k not in props]
        if extra:
            return f"unknown argument {', '.join(map(repr, extra))} (expected: {', '.join(props) or 'none'})"
    for key, value in arguments.items():
        want = (props.get(key) or {}).get("type")
        names = want if isinstance(want, list) else [want] if want else []
        allowed = tuple(t for n in names for t in _TYPES.get(n, (object,)))
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            return f"argument {key!r} must be {' or '.join(names)}, got {type(value).__name__}"
    return None


def tool_schemas(tools) -> list[dict]:
    """Tools (a dict name -> Tool, or a list) -> function schemas for chat templates."""
    items = tools.values() if isinstance(tools, dict) else tools
    return [t.schema for t in items]


def run_one(call: ToolCall, tools: dict) -> ToolResult:
    try:
        if call.error:
            return failure(call.name or "unparsed", f"the tool call could not be read: {call.error}")
        tool = tools.get(call.name)
        if tool is None:
            return failure(call.name, f"unknown tool {call.name!r} (available: {', '.join(sorted(tools)) or 'none'})")
        return tool(call.arguments)
    except Exception as e:  # noqa: BLE001 (the last guard: run_tools never raises)
        return failure(call.name or "unparsed", f"{type(e).__name__}: {e}")


def run_tools(calls: list[ToolCall], tools: dict) -> list[ToolResult]:
    """Run every call (sandboxed ones concurrently: they wait on subprocesses); one result per
    call, in order. Never raises."""
    if len(calls) <= 1:
        return [run_one(c, tools) for c in calls]
    workers = min(len(calls), max(2, os.cpu_count() or 2), 8)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verl-tool") as pool:
        return list(pool.map(lambda c: run_one(c, tools), calls))
