"""Build a Config from defaults ← preset ← --config FILE ← KEY=VALUE overrides.

Presets are sparse YAML over the schema defaults. Every layer is checked against the schema
before anything starts, and every mistake names the key and the fix (nearest-key suggestions
for typos, the expected type for bad values). Names the config selects from a registry
(estimator, policy loss, KL estimator, rejection options, reward function) are checked here
too, with "did you mean", so `--dry-run` catches them: the registries in verlcli.algorithms
are declarations, read lazily (the one upward read from config, so the names live once).
"""

from __future__ import annotations

import copy
import difflib
import re
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
        mark = getattr(e, "problem_mark", None)  # one line: the problem and where, not PyYAML's excerpt
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{what} file {path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}",
                        fix="fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} file {path} must hold a mapping of config keys", fix="see `verl presets NAME`")
    return data


# ---------------------------------------------------------------- merging and overrides

def deep_merge(base: dict, top: dict) -> dict:
    # A deep copy: overrides are set into the result, and must never reach a shared layer
    # (the verbs' defaults, a cached preset) when verl runs twice in one process.
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
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

def sft_data_files(paths: list[str]) -> list[str]:
    """`verl prepare-data` writes DIR/train.parquet (RL) beside DIR/sft_train.parquet (SFT):
    the SFT twin of each RL file, so `verl sft` reads what prepare-data wrote for it."""
    twins = {"train.parquet": "sft_train.parquet", "test.parquet": "sft_test.parquet"}
    out = []
    for p in paths:
        head, _, name = p.rpartition("/")
        out.append(f"{head}/{twins[name]}" if head and name in twins else twins.get(p, p))
    return out


def load_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    verb_defaults: dict | None = None,
    verb: str | None = None,
) -> Config:
    """defaults ← base ← preset ← verb defaults ← config file ← overrides, then validate.

    `verb_defaults` are what a verb means (`verl ppo`: a critic): they win over the preset,
    and only the user's config file or overrides change them. For `verl sft`, the data files
    that the defaults or the preset give (RL files) become their SFT twins."""
    tree: dict = {}
    layers = [("command defaults", base or {})]
    if preset:
        layers.append((f"preset {preset}", read_preset(preset)))
    if verb_defaults:
        layers.append(("verb defaults", verb_defaults))
    for where, layer in layers:
        _check_tree(layer, where)
        tree = deep_merge(tree, layer)
    if verb == "sft":
        data = tree.setdefault("data", {})
        defaults = Config.model_fields["data"].default_factory()
        for key in ("train_files", "val_files"):
            files = data.get(key, getattr(defaults, key))
            data[key] = sft_data_files([files] if isinstance(files, str) else list(files))
    if config_file:
        layer = _read_yaml(Path(config_file), what="config")
        _check_tree(layer, f"config file {config_file}")
        tree = deep_merge(tree, layer)
    for text in overrides or []:
        parts, value = parse_override(text)
        _check_path(parts)
        set_dotted(tree, parts, value)
    if preset:
        tree["preset"] = preset
    cfg = validate_tree(tree)
    check_names(cfg)
    return cfg


def validate_tree(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("literal[", "function-")))
        got = err.get("input")
        if err["type"] == "literal_error":  # a name from a fixed list: say which one was meant
            choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
            close = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"unknown value {got!r} for config key '{key}'",
                            fix=f"{hint}set {key} to one of: {', '.join(choices)}") from None
        raise UserError(
            f"bad value for config key '{key}': {err['msg']} (got {got!r})",
            fix=f"set {key} to a valid value; `verl presets NAME` shows a resolved example",
        ) from None


def check_names(cfg: Config) -> None:
    """Every name the config selects from a registry exists (UserError with 'did you mean'),
    and the combinations the algorithms cannot run are refused before any worker starts."""
    from verlcli.algorithms import ADV_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES
    from verlcli.algorithms.catalog import check_rejection

    ADV_ESTIMATORS.check(cfg.algorithm.adv_estimator, "algorithm.adv_estimator")
    POLICY_LOSSES.check(cfg.actor.policy_loss, "actor.policy_loss")
    KL_ESTIMATORS.check(cfg.algorithm.kl_penalty, "algorithm.kl_penalty")
    KL_ESTIMATORS.check(cfg.actor.kl_loss_type, "actor.kl_loss_type")
    rc = cfg.algorithm.rollout_correction
    if rc.rollout_rs is not None:
        check_rejection(rc.rollout_rs, rc.rollout_rs_threshold)
    if rc.bypass_mode and cfg.estimator_needs.old_log_probs:
        raise UserError(
            f"algorithm.adv_estimator={cfg.algorithm.adv_estimator} needs the old-policy forward pass, "
            "which algorithm.rollout_correction.bypass_mode=true skips",
            fix="set algorithm.rollout_correction.bypass_mode=false, or pick another estimator",
        )
    mt = cfg.rollout.multi_turn
    if mt.enable and not cfg.tools:
        raise UserError("rollout.multi_turn.enable=true but no tools are configured",
                        fix="name the tools the model may call, e.g. tools=[calculator] or tools=[python,my_tools.py:search]")
    if mt.enable and cfg.rollout.ignore_eos:
        raise UserError("rollout.ignore_eos=true with rollout.multi_turn.enable=true: a model turn would never end",
                        fix="set rollout.ignore_eos=false for multi-turn runs")
    if mt.enable and mt.max_tool_response_tokens >= cfg.data.max_response_tokens:
        raise UserError(f"rollout.multi_turn.max_tool_response_tokens={mt.max_tool_response_tokens} leaves no room "
                        f"in the trajectory budget data.max_response_tokens={cfg.data.max_response_tokens}",
                        fix="raise data.max_response_tokens (the whole trajectory) or lower max_tool_response_tokens")
    if cfg.reward.fn:
        from verlcli.rewards.user import load_user_fn

        load_user_fn(cfg.reward.fn)  # names the file or the function that is missing


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
