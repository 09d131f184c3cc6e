"""Build a Config from defaults ← preset ← --config FILE ← KEY=VALUE overrides.

Presets are sparse YAML over the schema defaults. Every layer is checked against the schema
before anything starts, and every mistake names the key and the fix (nearest-key suggestions
for typos, the expected type for bad values).
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from verlcli.config.schema import Config
from verlcli.errors import UserError

PRESET_PACKAGE = "verlcli.presets"


# ---------------------------------------------------------------- presets

def preset_names() -> list[str]:
    files = resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def read_preset(name_or_path: str) -> dict:
    """A preset by name (shipped YAML) or by path to a YAML file."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.exists():
        return _read_yaml(path, what="preset")
    names = preset_names()
    if name_or_path not in names:
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(
            f"unknown preset '{name_or_path}'",
            fix=f"{hint}choose one of: {', '.join(names)} (or pass a YAML path); `verl presets` lists them",
        )
    text = resources.files(PRESET_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}", fix="check the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} file {path} is not valid YAML: {e}", fix="fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} file {path} must hold a mapping of config keys", fix="see `verl presets NAME`")
    return data


# ---------------------------------------------------------------- merging and overrides

def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'actor.optim.lr=1e-6' -> (['actor','optim','lr'], 1e-6). Values are YAML scalars/lists."""
    if "=" not in text or text.startswith("="):
        raise UserError(
            f"cannot read override '{text}'",
            fix="write overrides as KEY=VALUE with a dotted key, e.g. actor.optim.lr=1e-6 or rollout.n=8",
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # keep it as a string; the schema will say if that is wrong
    if isinstance(value, str) and value.lower() == "none":
        value = None
    return key.split("."), value


def _check_path(parts: list[str], model: type[BaseModel] = Config) -> None:
    """Raise UserError with a suggestion if a dotted key does not exist in the schema."""
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            dotted = ".".join(parts[: i + 1])
            prefix = ".".join(parts[:i])
            candidates = [f"{prefix}.{f}" if prefix else f for f in fields]
            close = difflib.get_close_matches(dotted, candidates + _all_keys(), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(candidates)}"
            raise UserError(f"unknown config key '{'.'.join(parts)}'", fix=hint)
        ann = fields[part].annotation
        sub = _section_type(ann)
        if sub is None:
            if i != len(parts) - 1:
                raise UserError(
                    f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section",
                    fix=f"set it directly: {'.'.join(parts[: i + 1])}=VALUE",
                )
            return
        model = sub


def _section_type(ann) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def _all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, f in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _section_type(f.annotation)
        keys.extend(_all_keys(sub, dotted + ".") if sub else [dotted])
    return keys


def _check_tree(tree: dict, where: str, model: type[BaseModel] = Config, prefix: list[str] | None = None):
    prefix = prefix or []
    for k, v in tree.items():
        parts = prefix + [str(k)]
        try:
            _check_path(parts)
        except UserError as e:
            raise UserError(f"{e.message} (in {where})", fix=e.fix) from None
        sub = _section_type(_field_at(parts))
        if sub is not None and isinstance(v, dict):
            _check_tree(v, where, sub, parts)


def _field_at(parts: list[str]):
    model: type[BaseModel] = Config
    ann = None
    for p in parts:
        ann = model.model_fields[p].annotation
        model = _section_type(ann) or model
    return ann


def set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{'.'.join(parts)}' conflicts with a value", fix="check the override")
    node[parts[-1]] = value


# ---------------------------------------------------------------- the whole thing

def load_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> Config:
    """defaults ← base (command defaults) ← preset ← config file ← overrides, then validate."""
    tree: dict = {}
    layers = [("command defaults", base or {})]
    if preset:
        layers.append((f"preset {preset}", read_preset(preset)))
    if config_file:
        layers.append((f"config file {config_file}", _read_yaml(Path(config_file), what="config")))
    for where, layer in layers:
        _check_tree(layer, where)
        tree = deep_merge(tree, layer)
    for text in overrides or []:
        parts, value = parse_override(text)
        _check_path(parts)
        set_dotted(tree, parts, value)
    if preset:
        tree["preset"] = preset
    return validate_tree(tree)


def validate_tree(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        raise UserError(
            f"bad value for config key '{key}': {err['msg']} (got {got!r})",
            fix=f"set {key} to a valid value; `verl presets NAME` shows a resolved example",
        ) from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
