"""The child side of a sandboxed tool call (run as a script: `python -I _runner.py`).

Reads one JSON request on stdin, confines itself with verlcli/rewards/sandbox.py (memory,
CPU time, no network, writes only in its temporary working directory), then either runs
code (`python` tool: stdout/stderr go to the files the parent gave it) or imports a user
tool file and calls the function (its return value goes to result.json in the working
directory). Only the standard library is imported before the sandbox is entered.
"""

import ast
import importlib.util
import json
import os
import resource
import sys
import traceback


def _load_sandbox(path):
    spec = importlib.util.spec_from_file_location("verl_tool_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_code(code: str) -> int:
    """Run like a notebook cell: the value of a final expression is printed."""
    try:
        tree = ast.parse(code, "<code>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        scope = {"__name__": "__main__"}
        exec(compile(tree, "<code>", "exec"), scope)
        if last is not None:
            value = eval(compile(last, "<code>", "eval"), scope)
            if value is not None:
                print(repr(value))
        return 0
    except BaseException:  # noqa: BLE001 (SystemExit too: the model's code ends, the tool reports)
        etype, value, tb = sys.exc_info()
        if etype is SystemExit and value.code in (None, 0):
            return 0
        # The traceback below the runner's own frames: what the model needs to fix its code.
        frames = [f for f in traceback.extract_tb(tb) if f.filename == "<code>"]
        lines = traceback.format_list(frames) + traceback.format_exception_only(etype, value)
        sys.stderr.write("Traceback (most recent call last):\n" + "".join(lines))
        return 1


def _call_user(request: dict) -> int:
    spec = importlib.util.spec_from_file_location("verl_user_tool", request["file"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, request["function"])
    if request.get("describe"):
        from_schema = getattr(fn, "schema", None)
        out = {"schema": from_schema} if isinstance(from_schema, dict) else {"doc": fn.__doc__ or "",
                                                                               "params": _params(fn)}
    else:
        value = fn(**request["arguments"])
        out = {"content": value if isinstance(value, str) else json.dumps(value, default=str)}
    with open("result.json", "w") as f:
        json.dump(out, f)
    return 0


def _params(fn) -> list:
    import inspect
    import typing

    hints = typing.get_type_hints(fn)
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(p.name)
        out.append({"name": p.name, "type": getattr(hint, "__name__", str(hint)) if hint else None,
                    "required": p.default is p.empty})
    return out


def main() -> int:
    request = json.loads(sys.stdin.read())
    sandbox = _load_sandbox(request["sandbox_py"])
    sandbox.enter(os.getcwd(), None, request["memory_mb"] / 1024)
    limit = request["max_file_bytes"]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # output files cannot fill the disk
    sandbox.arm_cpu_limit(request["cpu_s"])
    if request["kind"] == "python":
        return _run_code(request["code"])
    return _call_user(request)


if __name__ == "__main__":
    sys.exit(main())
