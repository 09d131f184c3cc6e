"""User tools given as `path/to/file.py:function` (like user rewards, verlcli/rewards/user.py).

The file is never imported in the training process: every call runs in a fresh sandboxed
subprocess (sandboxed.py), which imports the file and calls `function(**arguments)`. A str
return value is the tool message; anything else is sent as JSON.

The JSON schema comes from the function, read once inside the sandbox at start-up:
  - a `schema` attribute holding the parameters schema (a dict), or
  - its signature and docstring: type hints give the types (str, int, float, bool, list,
    dict), parameters without defaults are required, the docstring's first paragraph is the
    description and a Google-style "Args:" section describes each parameter.
"""

from __future__ import annotations

import re

from verlcli.errors import UserError
from verlcli.rewards.user import split_spec
from verlcli.tools.base import Tool, ToolFailure
from verlcli.tools.sandboxed import run_sandboxed, truncate

MAX_OUTPUT = 2000
_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
               "dict": "object"}


def is_user_spec(name: str) -> bool:
    return ".py" in name


def schema_from_signature(doc: str, params: list[dict]) -> tuple[str, dict]:
    """(description, parameters schema) from a docstring and [{name, type, required}]."""
    doc = (doc or "").strip()
    head = re.split(r"\n\s*\n|^\s*Args:", doc, maxsplit=1, flags=re.M)[0]
    arg_docs = {}
    m = re.search(r"^\s*Args:\s*\n(.*?)(?:\n\s*\n|\n\s*\w+:\s*\n|\Z)", doc, re.S | re.M)
    if m:
        for line in m.group(1).splitlines():
            hit = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)", line)
            if hit:
                arg_docs[hit.group(1)] = hit.group(2).strip()
    props = {}
    for p in params:
        prop = {"type": _JSON_TYPES[p["type"]]} if p.get("type") in _JSON_TYPES else {}
        if p["name"] in arg_docs:
            prop["description"] = arg_docs[p["name"]]
        props[p["name"]] = prop
    schema = {"type": "object", "properties": props, "required": [p["name"] for p in params if p["required"]]}
    return " ".join(head.split()), schema


class UserTool(Tool):
    def __init__(self, spec: str, timeout_s: float, memory_mb: int):
        path, function = split_spec(spec)
        if not path.is_file():
            raise UserError(f"tool file {str(path)!r} (from {spec!r}) does not exist",
                            fix="give a user tool as path/to/file.py:function_name, relative to where you run verl")
        self.path, self.function = path, function
        self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)
        description, parameters = self._describe(spec)
        super().__init__(name=function, description=description or f"the function {function} from {path.name}",
                         parameters=parameters)

    def _request(self, **kw) -> dict:
        return {"kind": "user", "file": str(self.path), "function": self.function, **kw}

    def _describe(self, spec: str) -> tuple[str, dict]:
        # Start-up may import heavy modules: allow it more time than a call.
        run = run_sandboxed(self._request(describe=True), timeout_s=max(self.timeout_s, 30.0), memory_mb=self.memory_mb)
        if run.result is None:
            raise UserError(f"loading tool {spec!r} in the sandbox failed: {run.why(max(self.timeout_s, 30.0))}",
                            fix=f"run `python {self.path}` to see the error; the file must define {self.function}()")
        if "schema" in run.result:
            schema = run.result["schema"]
            return (schema.get("description") or ""), {k: v for k, v in schema.items() if k != "description"}
        return schema_from_signature(run.result.get("doc", ""), run.result.get("params", []))

    def run(self, arguments: dict) -> str:
        run = run_sandboxed(self._request(arguments=arguments), timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        if run.result is None or "content" not in run.result:
            raise ToolFailure(run.why(self.timeout_s))
        return truncate(str(run.result["content"]), MAX_OUTPUT)
