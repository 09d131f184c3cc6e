"""Shared by `verl sft`, `verl ppo` and `verl grpo`: one set of flags, defined once.

Each verb file calls `make_command(kind)`; the command resolves the config (defaults ← preset
← --config ← KEY=VALUE), checks the batch arithmetic, and either prints the plan
(--dry-run) or hands the config to the trainer in the library.
"""

from __future__ import annotations

from typing import List, Optional

import typer

DEFAULT_PRESET = "smollm2-135m-cpu"

# What each verb means: these win over a preset's choice; only the user's --config or
# KEY=VALUE overrides change them (so `verl ppo --preset X` is PPO with a critic whatever X
# picks). `verl sft` also reads the SFT twins of the data files (config.loader).
VERB_DEFAULTS = {
    "grpo": {"algorithm": {"adv_estimator": "grpo"}},
    "ppo": {"algorithm": {"adv_estimator": "gae"}},
    "sft": {},
}


def resolve(kind: str, preset: str | None, config: str | None, overrides: list[str]):
    from verlcli.config.loader import load_config

    if preset is None and config is None:
        preset = DEFAULT_PRESET
    return load_config(preset=preset, config_file=config, overrides=overrides,
                       verb_defaults=VERB_DEFAULTS[kind], verb=kind)


def verb_notice(kind: str, cfg) -> str | None:
    """One line when the user's estimator makes the verb mean something else."""
    if kind == "ppo" and not cfg.use_critic:
        return (f"note: verl ppo with algorithm.adv_estimator={cfg.algorithm.adv_estimator} runs without a critic "
                "(that estimator needs none); drop the override for PPO with a critic (gae)")
    if kind == "grpo" and cfg.use_critic:
        return (f"note: verl grpo with algorithm.adv_estimator={cfg.algorithm.adv_estimator} trains a critic; "
                "`verl ppo` is the same run")
    return None


def print_plan(kind: str, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    from verlcli.config.arithmetic import rl_plan, sft_plan
    from verlcli.config.loader import to_yaml

    plan = sft_plan(cfg) if kind == "sft" else rl_plan(cfg).as_dict()
    console = Console()
    console.print(f"# resolved config ({kind}, preset: {cfg.preset or 'none'})", style="bold")
    console.print(to_yaml(cfg), markup=False, highlight=False)
    table = Table(title="batch arithmetic (per step)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in plan.items():
        table.add_row(k.replace("_", " "), str(v))
    console.print(table)
    if kind != "sft":
        _print_placement(console, cfg)
        console.print(
            f"critic: {'on' if cfg.use_critic else 'off'} (algorithm.adv_estimator={cfg.algorithm.adv_estimator}); "
            f"reference model: {'on' if cfg.use_reference else 'off'}; launcher: {cfg.launcher}; "
            f"workers: {cfg.world_size} ({cfg.resources.nodes} node(s) × {cfg.resources.devices_per_node})"
        )
        console.print(f"padding removal (model.remove_padding={cfg.model.remove_padding}): {_packing_note(cfg)}")
    _print_memory_plan(kind, cfg, console)


def _packing_note(cfg) -> str:
    """What the engines do with model.remove_padding (engine/packing.py; no torch import here)."""
    if cfg.model.remove_padding is False:
        return "off: padded rows, trimmed to the longest per micro-batch"
    strategies = {cfg.actor.strategy} | ({cfg.critic.strategy} if cfg.use_critic else set())
    how = ["fsdp/deepspeed: per-sequence attention (flash-attn varlen on GPU when installed)"] if strategies - {"megatron"} else []
    how += ["megatron: block-diagonal mask"] if "megatron" in strategies else []
    return "on: each micro-batch packed into one row; " + "; ".join(how)


def _print_memory_plan(kind: str, cfg, console) -> None:
    """`verl plan`'s table and verdict; a model whose config cannot be read is a note here."""
    from verlcli.commands.plan import show_plan
    from verlcli.errors import UserError

    try:
        show_plan(kind, cfg, console)
    except UserError as e:
        console.print(f"memory plan: not available ({e.message})", markup=False)


def _print_placement(console, cfg) -> None:
    """Where the worker groups go, and whether they fit on the devices this machine can see."""
    from rich.table import Table

    from verlcli.config.arithmetic import check_placement, placement_plan

    plan = placement_plan(cfg)
    table = Table(title="placement")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in plan.as_dict().items():
        table.add_row(k, str(v))
    console.print(table)
    device = cfg.resources.device
    try:
        import torch

        cuda = torch.cuda.device_count() if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        cuda = None
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device == "cuda" and cuda is None:
        console.print("devices present: no CUDA device on this machine; a run checks the Ray cluster before it starts")
    import os

    check_placement(plan, device, cuda, os.cpu_count())


def print_preflight(kind: str, cfg) -> None:
    """The checks a real run does before it starts; a failure raises UserError (exit 2)."""
    from verlcli.trainer.preflight import preflight

    checked = preflight(cfg, kind, dry_run=True)
    for line in checked.lines:
        print(f"ok: {line}")
    for line in checked.warnings:
        print(f"warning: {line}")


def from_verl_overrides(kind: str, text_or_path: str) -> list[str]:
    """verl overrides → ours (config.verl_compat), with the translation shown."""
    from verlcli.config.verl_compat import read_overrides, translate

    t = translate(read_overrides(text_or_path))
    print(f"translated: {t.command(kind)}")
    for key, why in t.ignored:
        print(f"ignored (no effect here): {key}: {why}")
    for item in t.unmapped:
        print(f"not mapped: {item}")
    return t.overrides


def make_command(kind: str, example: str):
    def command(
        overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. actor.optim.lr=1e-6"),
        preset: Optional[str] = typer.Option(None, "--preset", "-p", help=f"Preset name or YAML path (default {DEFAULT_PRESET}); `verl presets` lists them."),
        config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (sparse, over the preset)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and batch arithmetic, check "
                                     "data, model, rewards and run directory, then exit (nothing is written)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show vLLM, Ray and worker output on the console "
                                     "(else it goes to RUN_DIR/logs/); same as logging.verbose=true."),
        from_verl: Optional[str] = typer.Option(None, "--from-verl", help="verl's hydra overrides ('KEY=VALUE ...', or "
                                                "a run-script file), translated to these keys; prints the command "
                                                "and names what it cannot map. KEY=VALUE arguments still win."),
    ):
        overrides = (from_verl_overrides(kind, from_verl) if from_verl else []) + (overrides or [])
        cfg = resolve(kind, preset, config, overrides + (["logging.verbose=true"] if verbose else []))
        notice = verb_notice(kind, cfg)
        if notice:
            print(notice)
        if dry_run:
            print_plan(kind, cfg)
            print_preflight(kind, cfg)
            return
        if kind == "sft":
            from verlcli.trainer.sft import run_sft

            run_sft(cfg)
        else:
            from verlcli.trainer.rl import run_rl

            run_rl(cfg)

    command.__doc__ = example
    return command
