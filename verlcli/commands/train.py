"""Shared by `verl sft`, `verl ppo` and `verl grpo`: one set of flags, defined once.

Each verb file calls `make_command(kind)`; the command resolves the config (defaults ← preset
← --config ← KEY=VALUE), checks the batch arithmetic, and either prints the plan
(--dry-run) or hands the config to the trainer in the library.
"""

from __future__ import annotations

from typing import List, Optional

import typer

DEFAULT_PRESET = "smollm2-135m-cpu"

# What each verb changes relative to the schema defaults (the user can still override it).
VERB_DEFAULTS = {
    "grpo": {"algorithm": {"adv_estimator": "grpo"}},
    "ppo": {"algorithm": {"adv_estimator": "gae"}},
    "sft": {},
}


def resolve(kind: str, preset: str | None, config: str | None, overrides: list[str]):
    from verlcli.config.loader import load_config

    if preset is None and config is None:
        preset = DEFAULT_PRESET
    return load_config(preset=preset, config_file=config, overrides=overrides, base=VERB_DEFAULTS[kind])


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
        console.print(
            f"critic: {'on' if cfg.use_critic else 'off'} (algorithm.adv_estimator={cfg.algorithm.adv_estimator}); "
            f"reference model: {'on' if cfg.use_reference else 'off'}; launcher: {cfg.launcher}; "
            f"workers: {cfg.world_size} ({cfg.resources.nodes} node(s) × {cfg.resources.devices_per_node})"
        )


def make_command(kind: str, example: str):
    def command(
        overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. actor.optim.lr=1e-6"),
        preset: Optional[str] = typer.Option(None, "--preset", "-p", help=f"Preset name or YAML path (default {DEFAULT_PRESET}); `verl presets` lists them."),
        config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (sparse, over the preset)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and batch arithmetic, then exit."),
    ):
        cfg = resolve(kind, preset, config, overrides or [])
        if dry_run:
            print_plan(kind, cfg)
            return
        if kind == "sft":
            from verlcli.trainer.sft import run_sft

            run_sft(cfg)
        else:
            from verlcli.trainer.rl import run_rl

            run_rl(cfg)

    command.__doc__ = example
    return command
