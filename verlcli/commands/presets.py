"""`verl presets [NAME]`: list presets, or show one resolved."""

from typing import Optional

import typer


def command(name: Optional[str] = typer.Argument(None, help="Preset to show fully resolved.")):
    """List presets with model and hardware, or show one resolved.

    Examples:

      verl presets

      verl presets qwen2.5-7b-8xH100
    """
    from rich.console import Console
    from rich.table import Table

    from verlcli.config.loader import load_config, preset_names, read_preset, to_yaml

    console = Console()
    if name:
        console.print(to_yaml(load_config(preset=name)), markup=False, highlight=False)
        return
    table = Table(title="presets")
    for col in ("name", "model", "hardware", "rollout"):
        table.add_column(col)
    for p in preset_names():
        cfg = load_config(preset=p)
        r = cfg.resources
        hw = f"{r.nodes}×{r.devices_per_node} {r.device}"
        table.add_row(p, cfg.model.path, hw, f"{cfg.rollout.engine} n={cfg.rollout.n}")
    console.print(table)

