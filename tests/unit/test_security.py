"""Security rules checked on the source itself (the run-time half — secrets never reach the
run directory or the logs — is checked on a real run in tests/e2e/test_rl.py):

- weights are read only through safetensors, or `torch.load(..., weights_only=True)`;
- no `eval` / `exec` (config values are data, never code), no `yaml.load` / `pickle.load`;
- `trust_remote_code` is never hard-wired to True (it is off unless model.trust_remote_code).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("verlcli", "data_prep", "bench") for p in (REPO / d).rglob("*.py"))


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    """'torch.load' for torch.load(...), 'eval' for eval(...), '' for anything fancier."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
        return ".".join(reversed(parts))
    return ""


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_sources_found():
    assert len(SOURCES) > 50


def test_torch_load_only_with_weights_only_true():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            if _name(call.func) in ("torch.load", "torch.serialization.load"):
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    bad.append(_where(path, call))
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_no_eval_exec_or_unsafe_deserializers():
    banned = {"eval", "exec", "builtins.eval", "builtins.exec", "yaml.load", "yaml.unsafe_load",
              "pickle.load", "pickle.loads", "marshal.loads"}
    bad = [f"{_where(path, call)} {_name(call.func)}" for path in SOURCES for call in _calls(path)
           if _name(call.func) in banned]
    # The one place that runs code on purpose: the `python` tool's child process, which runs the
    # model's code only after confining itself (verlcli/rewards/sandbox.py: rlimits, no network,
    # writes in a temp dir). Allowed by function, so a new exec elsewhere in the file still fails.
    allowed = {("verlcli/tools/_runner.py", "_run_code")}
    bad = [b for b in bad if (b.split(":")[0], _enclosing_function(b)) not in allowed]
    assert not bad, f"code execution from data: {bad}"


def _enclosing_function(where: str) -> str:
    """Name of the function around `path:line` (from test_no_eval's report)."""
    rel, line = where.split(" ")[0].split(":")
    tree = ast.parse((REPO / rel).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.lineno <= int(line) <= node.end_lineno:
            return node.name
    return ""


def test_trust_remote_code_is_never_hard_wired_on():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            for k in call.keywords:
                if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True:
                    bad.append(_where(path, call))
    assert not bad, f"trust_remote_code=True hard-wired: {bad}"
    from verlcli.config.schema import ModelConfig

    assert ModelConfig().trust_remote_code is False


def test_the_grep_catches_what_it_should(tmp_path):
    """The checks above fail on the patterns they forbid (else they prove nothing)."""
    f = tmp_path / "bad.py"
    f.write_text("import torch\nx = torch.load('a.pt')\ny = eval('1')\nz = f(trust_remote_code=True)\n"
                 "w = torch.load('b.pt', weights_only=True)\n")
    names = [(_name(c.func), {k.arg for k in c.keywords}) for c in _calls(f)]
    assert ("torch.load", set()) in names and ("eval", set()) in names
    assert ("f", {"trust_remote_code"}) in names and ("torch.load", {"weights_only"}) in names
