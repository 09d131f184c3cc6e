"""Tools for multi-turn agent rollouts: a registry, a parser for the model's calls, sandboxes.

    from verlcli.tools import make_tools, parser_for, run_tools, tool_schemas
    tools = make_tools(["calculator", "python", "my_tools.py:lookup"], timeout_s=5, memory_mb=512)
    schemas = tool_schemas(tools)         # for the prompt (verlcli.data.tool_chat.render_chat)
    calls = parser_for(tokenizer).parse(model_text)        # [] -> the model answered
    results = run_tools(calls, tools)     # one ToolResult per call; never raises
    close, text = tool_turn(tokenizer, [r.content for r in results], schemas)  # what to append

Built-in tools: `calculator` (exact arithmetic, no eval; in process) and `python` (code in a
sandboxed subprocess). User tools `path.py:function` run in the same sandbox (tools/user.py).
Rendering (tool list, tool results) lives in verlcli/data/tool_chat.py, because the dataset
loaders render prompts with it too.
"""

from verlcli.data.tool_chat import render_chat, tool_turn
from verlcli.tools.base import Tool, ToolCall, ToolFailure, ToolResult, run_tools, tool_schemas
from verlcli.tools.parser import HermesParser, parser_for
from verlcli.tools.registry import BUILTIN, make_tools

__all__ = ["BUILTIN", "HermesParser", "Tool", "ToolCall", "ToolFailure", "ToolResult", "make_tools", "parser_for",
           "render_chat", "run_tools", "tool_schemas", "tool_turn"]
