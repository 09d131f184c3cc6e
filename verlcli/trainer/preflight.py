"""Preflight: everything that can be checked in seconds, checked before anything starts.

`verl sft/ppo/grpo --dry-run` runs it after printing the plan; a real run runs it before the
run directory is touched and before Ray starts, and then reuses what it loaded (the model
path, the tokenizer, the tokenized datasets), so the checks cost nothing extra. Each failure
is a `UserError` naming the thing and the fix: the run directory (writable, not another
run's), the model (resolves, config and tokenizer load, has a chat template), the data
(files, columns, types, prompt lengths), the rewards (every data_source has one; a user
function exists, takes the right arguments and returns numbers) and the checkpoint a resume
would read (same kind of run, same model, same world size).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from verlcli.errors import UserError
from verlcli.trainer.preflight_model import check_model, load_tokenizer
from verlcli.trainer.preflight_reward import check_rewards

# What makes a run directory "another run's": these keys differ between its config.yaml and
# this run's. Other keys (total_steps, save_every, logging, resources, ...) may change on resume.
IDENTITY_KEYS = ("model.path", "model.lora.rank", "data.train_files", "algorithm.adv_estimator")


@dataclass
class Checked:
    """What preflight loaded, for the trainer to reuse. model_path/tokenizer/train are None
    only in a dry run whose hub model could not be reached."""

    model_path: Path | None = None
    tokenizer: object = None
    train: object = None
    val: object = None
    lines: list[str] = field(default_factory=list)  # what was checked, for --dry-run
    warnings: list[str] = field(default_factory=list)

    def warn(self) -> "Checked":
        """Print each warning once (a real run; --dry-run prints its own report)."""
        for line in self.warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)
        return self


def preflight(cfg, kind: str, dry_run: bool = False) -> Checked:
    """kind: 'sft' or 'rl' ('ppo'/'grpo'). dry_run: write nothing, download nothing."""
    kind = "sft" if kind == "sft" else "rl"
    out = Checked()
    run = check_run_dir(cfg, kind, dry_run, out)
    out.model_path = check_model(cfg.model.path, cfg.model.trust_remote_code, dry_run, out, "model.path")
    if kind == "rl":
        if cfg.use_critic and cfg.critic.model_path:
            check_model(cfg.critic.model_path, cfg.model.trust_remote_code, dry_run, out, "critic.model_path")
        if cfg.reward.model.path:
            check_model(cfg.reward.model.path, cfg.model.trust_remote_code, dry_run, out, "reward.model.path")
    if out.model_path is not None:
        out.tokenizer = load_tokenizer(out.model_path, cfg.model.trust_remote_code)
        _load_data(cfg, kind, out)
    else:
        _check_data_files(cfg, kind, out)  # no tokenizer: existence and columns only
    if kind == "rl":
        check_rewards(cfg, out)
    check_megatron(cfg, kind, out)
    check_resume(cfg, kind, run, out)
    return out


def check_megatron(cfg, kind: str, out: Checked) -> None:
    """strategy=megatron: tensor/pipeline sizes against the ranks and the model's heads,
    before any worker starts (a bad size otherwise surfaces as a worker error)."""
    roles = [cfg.sft] if kind == "sft" else [cfg.actor] + ([cfg.critic] if cfg.use_critic else [])
    roles = [r for r in roles if r.strategy == "megatron"]
    if not roles:
        return
    import torch
    from transformers import AutoConfig

    from verlcli.engine.megatron_convert import check_parallel_sizes

    device = cfg.resources.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = 1 if cfg.launcher == "local" else cfg.world_size
    hf = (AutoConfig.from_pretrained(out.model_path, trust_remote_code=cfg.model.trust_remote_code)
          if out.model_path is not None else None)
    for role in roles:
        check_parallel_sizes(role.tensor_parallel_size, role.pipeline_parallel_size, world, device, hf)
    if cfg.resources.compute_dtype == "bfloat16":
        raise UserError("strategy=megatron computes in float32, but resources.compute_dtype=bfloat16",
                        fix="set resources.compute_dtype=auto or float32 (or use strategy=fsdp for bf16)")
    out.lines.append(f"megatron: tensor_parallel_size {roles[0].tensor_parallel_size} on {world} ranks")


# ---------------------------------------------------------------- run directory


def check_run_dir(cfg, kind: str, dry_run: bool, out: Checked) -> Path:
    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"run directory {run} is a file", fix="set trainer.run_dir (or trainer.name) to a directory path")
    _check_writable(run)
    if _check_same_run(cfg, kind, run) and not dry_run:
        # Continuing another run on purpose (trainer.resume=PATH): its config is kept, not overwritten.
        from verlcli.io import write_text_atomic

        kept = run / f"config.before_step_{len(list((run / 'checkpoints').glob('step_*')))}.yaml"
        write_text_atomic(kept, (run / "config.yaml").read_text())
        out.warnings.append(f"{run} held another run's config.yaml: kept as {kept.name}")
    out.lines.append(f"run directory {run}: writable")
    return run


def _check_writable(run: Path) -> None:
    """Probe with a real file (os.access says yes to root on a read-only bind mount)."""
    probe = run
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    blocker = next((p for p in [probe, *probe.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"run directory {run} cannot be created: {blocker} is a file",
                        fix="set trainer.run_dir (or trainer.name) to a path under a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".verl-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"run directory {run} is not writable ({probe}: {e.strerror or e})",
                        fix="set trainer.run_dir to a directory you can write, or fix its permissions") from None


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _check_same_run(cfg, kind: str, run: Path) -> bool:
    """A directory holding another run's results is never trained into by accident.
    True when it holds another run and trainer.resume=PATH continues it on purpose."""
    import yaml

    if cfg.trainer.resume == "never" and any((run / "checkpoints").glob("step_*")):
        raise UserError(
            f"trainer.resume=never, but run directory {run} already holds checkpoints that this run would overwrite",
            fix="use a new trainer.name (or trainer.run_dir), or trainer.resume=auto to continue it",
        )
    old_file = run / "config.yaml"
    if not old_file.is_file():
        return False
    has_results = (run / "metrics.jsonl").is_file() or any((run / "checkpoints").glob("step_*"))
    if not has_results:
        return False  # a run that never logged a step: nothing to lose
    try:
        old = yaml.safe_load(old_file.read_text()) or {}
    except yaml.YAMLError:
        old = {}
    new = cfg.model_dump(mode="json")
    diffs = [f"{k}: {_dotted(old, k)!r} → {_dotted(new, k)!r}" for k in IDENTITY_KEYS if _dotted(old, k) != _dotted(new, k)]
    explicit = cfg.trainer.resume not in ("auto", "never")
    if diffs and not explicit:
        raise UserError(
            f"run directory {run} holds another run ({'; '.join(diffs)} in its config.yaml)",
            fix=f"use a new trainer.name (or trainer.run_dir), or continue that run on purpose with "
                f"trainer.resume={run}/checkpoints/step_N",
        )
    return bool(diffs)


# ---------------------------------------------------------------- data


def _load_data(cfg, kind: str, out: Checked) -> None:
    d = cfg.data
    if kind == "sft":
        from verlcli.data.sft_dataset import load_sft_dataset

        keys = dict(messages_key=d.messages_key, prompt_key=d.prompt_key, response_key=d.response_key,
                    truncation="filter" if d.truncation == "filter" else "error")
        out.train = load_sft_dataset(d.train_files, out.tokenizer, cfg.sft.max_length_tokens, **keys)
        out.val = load_sft_dataset(d.val_files, out.tokenizer, cfg.sft.max_length_tokens, **keys) if d.val_files else None
        for name, ds in (("train", out.train), ("val", out.val)):
            if ds is not None:
                out.lines.append(f"data ({name}): {len(ds)} samples")
                if ds.num_filtered:
                    out.warnings.append(f"data ({name}): dropped {ds.num_filtered} samples over "
                                        f"sft.max_length_tokens={cfg.sft.max_length_tokens} (data.truncation=filter)")
        return
    from verlcli.data.dataset import load_rl_dataset

    kw = dict(prompt_key=d.prompt_key, max_prompt_tokens=d.max_prompt_tokens, truncation=d.truncation)
    if cfg.rollout.multi_turn.enable:  # each prompt shows the tools it may call (data/tool_chat.py)
        from verlcli.tools import make_tools, tool_schemas

        mt = cfg.rollout.multi_turn
        tools = make_tools(list(cfg.tools), timeout_s=mt.tool_timeout_s, memory_mb=mt.tool_memory_mb)
        kw["tool_schemas"] = dict(zip(tools, tool_schemas(tools)))
    out.train = load_rl_dataset(d.train_files, out.tokenizer, **kw)
    out.val = load_rl_dataset(d.val_files, out.tokenizer, **kw) if d.val_files else None
    for name, ds in (("train", out.train), ("val", out.val)):
        if ds is None:
            continue
        sources = ", ".join(f"{k} ({v})" for k, v in sorted(ds.data_sources.items()))
        out.lines.append(f"data ({name}): {len(ds)} prompts; data_source: {sources}")
        if ds.num_filtered:
            out.warnings.append(f"data ({name}): dropped {ds.num_filtered} of {len(ds) + ds.num_filtered} prompts over "
                                f"data.max_prompt_tokens={d.max_prompt_tokens} (data.truncation=filter)")
        if ds.num_truncated:
            out.warnings.append(f"data ({name}): cut {ds.num_truncated} prompts to data.max_prompt_tokens="
                                f"{d.max_prompt_tokens} (data.truncation={d.truncation})")


def _check_data_files(cfg, kind: str, out: Checked) -> None:
    """Without a tokenizer: the files exist, are parquet, and have the needed columns."""
    from verlcli.data.parquet import as_file_list, column_names, read_columns

    d = cfg.data
    files = as_file_list(d.train_files) + list(d.val_files)
    for path in files:
        if kind == "sft":
            names = column_names(path, "SFT data")
            if d.messages_key not in names and not {d.prompt_key, d.response_key} <= set(names):
                raise UserError(f"SFT data file {path} has neither {d.messages_key!r} nor {d.prompt_key!r} + "
                                f"{d.response_key!r} columns (columns: {', '.join(names)})",
                                fix="SFT data needs `messages` or `prompt` + `response`")
        else:
            read_columns(path, [d.prompt_key, "data_source"], [], "data")
    out.lines.append(f"data: {len(files)} file(s) have the needed columns (prompts not tokenized: no tokenizer)")


# ---------------------------------------------------------------- resume


def check_resume(cfg, kind: str, run: Path, out: Checked) -> None:
    """The checkpoint a resume would read must come from the same kind of run, the same
    model and (for trainer.resume=auto) the same world size."""
    from verlcli.trainer import run_dir as rd

    ckpt = rd.resume_from(cfg, run)
    if ckpt is None:
        return
    try:
        extra = json.loads((ckpt / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt} has an unreadable trainer.json ({e})",
                        fix="resume from another step with trainer.resume=PATH, or start a new trainer.name") from None
    was = "sft" if extra.get("kind") == "sft" else "rl"
    if was != kind:
        raise UserError(
            f"checkpoint {ckpt} was written by `verl {'sft' if was == 'sft' else 'ppo/grpo'}`, this is "
            f"`verl {'sft' if kind == 'sft' else 'ppo/grpo'}`",
            fix=f"use a new trainer.name; to start from its weights run `verl merge-checkpoint {ckpt}` "
                "and set model.path to the result",
        )
    meta = _read_meta(ckpt / "actor")
    _check_model_matches(ckpt, meta, out)
    _check_strategy_matches(cfg, kind, ckpt, meta)
    if kind == "rl" and cfg.use_critic and not (ckpt / "critic").is_dir():
        raise UserError(f"checkpoint {ckpt} has no critic (it was written by a run without one, "
                        f"algorithm.adv_estimator={cfg.algorithm.adv_estimator} needs one)",
                        fix="use a new trainer.name, or the estimator the run was started with")
    saved = meta.get("world_size")
    if saved is not None and saved != cfg.world_size:
        if cfg.trainer.resume == "auto":
            raise UserError(
                f"checkpoint {ckpt} was saved by {saved} workers, this run has {cfg.world_size} "
                f"(resources.nodes × resources.devices_per_node)",
                fix=f"run with {saved} workers as before, or reshard it on purpose with trainer.resume={ckpt} "
                    "(per-rank random streams are not carried over)",
            )
        out.warnings.append(f"resuming {ckpt} (saved by {saved} workers) on {cfg.world_size}: resharded, "
                            "per-rank random streams start fresh")
    out.lines.append(f"resume: from {ckpt} (step {extra.get('step')})")


def _check_strategy_matches(cfg, kind: str, ckpt: Path, meta: dict) -> None:
    """A checkpoint resumes with the engine that wrote it; a ZeRO one also at its world size
    (its partitions are per rank)."""
    key = "sft" if kind == "sft" else "actor"
    want, have = getattr(getattr(cfg, key), "strategy", "fsdp"), meta.get("strategy", "fsdp")
    if want != have:
        raise UserError(f"checkpoint {ckpt} was trained with {key}.strategy={have}, this run has {want}",
                        fix=f"set {key}.strategy={have} to resume it, or use a new trainer.name (to start from "
                            f"its weights: `verl merge-checkpoint {ckpt}` and model.path)")
    saved = meta.get("world_size")
    if have == "deepspeed" and saved is not None and saved != cfg.world_size:
        raise UserError(f"checkpoint {ckpt} is a DeepSpeed ZeRO checkpoint of {saved} workers; this run has "
                        f"{cfg.world_size}", fix=f"run with {saved} workers (resources.nodes × "
                        "resources.devices_per_node), or merge it and start a new run from the merged model")


def _read_meta(role_dir: Path) -> dict:
    try:
        return json.loads((role_dir / "meta.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"checkpoint {role_dir.parent} has no readable {role_dir.name}/meta.json",
                        fix="resume from another step with trainer.resume=PATH, or start a new trainer.name") from None


SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _check_model_matches(ckpt: Path, meta: dict, out: Checked) -> None:
    """Same architecture and shapes as model.path (the saved path may differ after a move)."""
    if out.model_path is None:
        return
    try:
        saved = json.loads((ckpt / "actor" / "hf" / "config.json").read_text())
        now = json.loads((Path(out.model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # nothing to compare with; loading will say more
    diffs = [f"{k} {saved.get(k)} vs {now.get(k)}" for k in SHAPE_KEYS if saved.get(k) != now.get(k)]
    if diffs:
        raise UserError(
            f"checkpoint {ckpt} was trained from another model ({meta.get('base_model_path', '?')}; "
            f"{', '.join(diffs)} for model.path={out.model_path})",
            fix="set model.path to the model the run started from, or use a new trainer.name",
        )
