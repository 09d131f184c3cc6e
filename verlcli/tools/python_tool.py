"""`python`: run a snippet of Python code in a sandboxed subprocess (code interpreter).

The code runs like a notebook cell in a fresh interpreter (a final expression's value is
printed); the tool message is its stdout, then its stderr (a short traceback on an error),
cut to MAX_OUTPUT characters. An error in the code is a failed call (ok=False) whose message
still shows the model the traceback, so it can fix its code on the next turn.
"""

from __future__ import annotations

from verlcli.tools.base import Tool, ToolFailure, ToolResult, check_arguments, failure
from verlcli.tools.sandboxed import run_sandboxed, truncate

MAX_OUTPUT = 2000
MAX_CODE_CHARS = 20_000


class PythonTool(Tool):
    def __init__(self, timeout_s: float, memory_mb: int):
        super().__init__(
            name="python",
            description="Run Python code and return what it prints (the value of a last expression is "
                        "printed too). Standard library only; no network; a fresh interpreter every call.",
            parameters={"type": "object",
                        "properties": {"code": {"type": "string", "description": "the Python code to run"}},
                        "required": ["code"]},
        )
        self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)

    def __call__(self, arguments: dict) -> ToolResult:
        why = check_arguments(arguments, self.parameters)
        if why:
            return failure(self.name, f"python: {why}")
        code = arguments["code"]
        if len(code) > MAX_CODE_CHARS:
            return failure(self.name, f"python: the code is longer than {MAX_CODE_CHARS} characters")
        run = run_sandboxed({"kind": "python", "code": code}, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        text = run.stdout + (("\n" if run.stdout and not run.stdout.endswith("\n") else "") + run.stderr
                             if run.stderr else "")
        if run.returncode == 0 and not run.timed_out:
            return ToolResult(self.name, truncate(text, MAX_OUTPUT) or "(no output)", True, None)
        why = run.why(self.timeout_s)
        content = truncate(text, MAX_OUTPUT) if run.returncode == 1 and text else f"Error: python: {why}"
        return ToolResult(self.name, content, False, f"python: {why}")

    def run(self, arguments: dict) -> str:  # pragma: no cover - __call__ is overridden
        raise ToolFailure("not used")
