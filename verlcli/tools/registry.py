"""Tool names -> Tool objects: the built-ins and user tools (`path.py:function`)."""

from __future__ import annotations

from verlcli.errors import UserError
from verlcli.tools.base import Tool
from verlcli.tools.calculator import Calculator
from verlcli.tools.python_tool import PythonTool
from verlcli.tools.user import UserTool, is_user_spec

BUILTIN = {
    "calculator": lambda timeout_s, memory_mb: Calculator(),
    "python": lambda timeout_s, memory_mb: PythonTool(timeout_s, memory_mb),
}


def make_tools(names: list[str], *, timeout_s: float, memory_mb: int) -> dict[str, Tool]:
    """Build the named tools, keyed by the name the model calls them by. A name is a built-in
    (calculator, python) or a user tool `path.py:function` (called `function`).
    UserError on an unknown name, a missing user file, or two tools with the same name."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise UserError(f"tool limits must be positive (timeout_s={timeout_s}, memory_mb={memory_mb})",
                        fix="give the tools a positive timeout in seconds and memory in MB")
    tools: dict[str, Tool] = {}
    for name in names:
        if is_user_spec(name):
            tool = UserTool(name, timeout_s, memory_mb)
        elif name in BUILTIN:
            tool = BUILTIN[name](timeout_s, memory_mb)
        else:
            raise UserError(f"unknown tool {name!r} (built-in tools: {', '.join(BUILTIN)})",
                            fix="use a built-in tool name, or a user tool as path/to/file.py:function")
        if tool.name in tools:
            raise UserError(f"two tools are called {tool.name!r}", fix="give every tool a different function name")
        tools[tool.name] = tool
    return tools
