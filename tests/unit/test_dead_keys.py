"""No dead config keys: every key of the schema is read somewhere in the package's code.

A key nobody reads is worse than a missing one: users set it and nothing happens (the
`rollout.tensor_parallel_size` that every rank silently ignored). The test is generic, so
keys added later are covered: it walks every field of `Config` (nested sections included)
and looks for a READ of the field's name in the package source, parsed with `ast`:
an attribute access `x.name`, or `getattr(x, "name")` / `x["name"]` / `x.get("name")` for
code that works on dumped dicts. Declarations in the schema are not reads (they are
assignments and keyword arguments, never attribute nodes).

A key may be reserved (documented, not wired yet) only if setting it is an error: list it
in RESERVED with the reason, and keep a test that setting it raises.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pydantic import BaseModel

import verlcli
from verlcli.config.schema import Config

PACKAGE = Path(verlcli.__file__).parent
RESERVED: dict[str, str] = {}  # "section.key": why it is reserved (setting it must raise)


def _keys(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _keys(ann, f"{prefix}{name}.")


def _reads() -> set[str]:
    """Every name the package reads as an attribute or by string key."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                if isinstance(node.slice.value, str):
                    names.add(node.slice.value)
            elif isinstance(node, ast.Call) and node.args:
                func = node.func
                fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if fname in ("getattr", "get", "pop", "setdefault", "hasattr"):
                    for arg in node.args[:2]:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            names.add(arg.value)
    return names


def test_every_config_key_is_read_by_running_code():
    reads = _reads()
    dead = [key for key, name in _keys(Config) if name not in reads and key not in RESERVED]
    assert not dead, (
        f"config keys read nowhere in {PACKAGE}: {dead}. Wire each into the code that should "
        "honour it, or delete it; a key kept for later must raise when set (list it in RESERVED)."
    )


def test_reserved_keys_are_still_keys():
    keys = {key for key, _ in _keys(Config)}
    assert set(RESERVED) <= keys, sorted(set(RESERVED) - keys)


# ---------------------------------------------------------------- model.trust_remote_code

# Code that runs with a run config: every Hugging Face load there must honour the key.
CONFIG_DRIVEN = ("workers", "rollout", "engine", "trainer")
TRUST_GAPS = {  # file (relative to the package): why it may still load without the key
    "engine/megatron.py": "megatron engine: make_engine passes trust_remote_code only when set; "
                          "the backend still has to take it",
    "engine/deepspeed.py": "deepspeed engine: same (its owner wires it; fsdp's _hf_config/_hf_model "
                           "already take it)",
}


def _loads_without_trust(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("from_pretrained", "from_config"):
            kw = {k.arg for k in node.keywords}
            if "trust_remote_code" not in kw and None not in kw:  # None: **kwargs passed on
                lines.append(node.lineno)
    return lines


def test_trust_remote_code_reaches_every_hf_load_and_vllm():
    gaps = {}
    for part in CONFIG_DRIVEN:
        for path in (PACKAGE / part).rglob("*.py"):
            rel = str(path.relative_to(PACKAGE))
            lines = _loads_without_trust(path)
            if lines and rel not in TRUST_GAPS:
                gaps[rel] = lines
    assert not gaps, f"from_pretrained/from_config without trust_remote_code= (file: lines): {gaps}"
    vllm_src = (PACKAGE / "rollout" / "vllm_engine.py").read_text()
    assert "trust_remote_code=trust_remote_code" in vllm_src  # into LLM(**kwargs)


def test_the_checker_finds_a_dead_key():
    from pydantic import Field

    from verlcli.config.schema import Section

    class Probe(Section):
        zz_never_read_anywhere: int = Field(0, description="probe")

    reads = _reads()
    assert [k for k, n in _keys(Probe) if n not in reads] == ["zz_never_read_anywhere"]
