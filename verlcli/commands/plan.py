"""`verl plan`: does a run fit, how long is a step, and what to turn if it does not.

Thin: resolve the config like the training verbs, size the model from its config.json, call
`verlcli.config.plan`, print. No torch import, no weights, no network for shipped models.
"""

from __future__ import annotations

from typing import List, Optional

import typer

GB = 1024**3


def _gib(x: float) -> str:
    return f"{x / GB:.1f}" if x >= 0.05 * GB else ("0" if x == 0 else "<0.1")


def _kind_of(cfg, kind: str | None) -> str:
    if kind is None:
        return "ppo" if cfg.use_critic else "grpo"
    if kind not in ("sft", "ppo", "grpo"):
        from verlcli.errors import UserError

        raise UserError(f"--kind {kind!r} is not a training verb", fix="use --kind sft, ppo or grpo")
    return kind


def _shapes(cfg) -> dict:
    from verlcli.models.shape import load_shape

    out = {}
    if cfg.use_critic and cfg.critic.model_path:
        out["critic_shape"] = load_shape(cfg.critic.model_path)
    if cfg.reward.model.path:
        out["rm_shape"] = load_shape(cfg.reward.model.path)
    return out


def _fmt_sets(sets: dict) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items())


def show_plan(kind: str, cfg, console=None) -> bool:
    """Print the memory table, host memory, verdict and step time. Returns whether it fits."""
    from rich.console import Console
    from rich.table import Table

    from verlcli.config.plan import memory_plan, resolve_device
    from verlcli.config.plan_fixes import fixes
    from verlcli.models.shape import load_shape

    console = console or Console()
    shape = load_shape(cfg.model.path)
    shapes = _shapes(cfg)
    device = resolve_device(cfg)
    plan = memory_plan(cfg, kind, shape, device, **shapes)
    cpu = device == "cpu"
    where = (f"{plan.devices_per_node} CPU worker(s) on a node with {plan.device_memory / GB:.1f} GiB"
             if cpu else f"{plan.nodes * plan.devices_per_node} × {plan.hardware} "
             f"({plan.device_memory / 1e9:g} GB = {plan.device_memory / GB:.1f} GiB), "
             f"{plan.nodes} node(s) × {plan.devices_per_node}")
    console.print(f"[bold]plan ({kind})[/bold]: {cfg.model.path}, {shape.params / 1e9:.3g}B params; {where}")
    unit = "per worker process" if cpu else "per device"
    table = Table(title=f"memory {unit} (GiB), by phase", title_justify="left",
                  caption="* working set: roles run one at a time, the largest one counts",
                  caption_justify="left")
    table.add_column("role")
    table.add_column("term")
    for p in plan.phases:
        table.add_column(p, justify="right")
    table.add_column("host", justify="right")
    for t in plan.terms:
        table.add_row(t.role, t.name + (" *" if t.transient else ""), *[_gib(t.bytes) if p in t.phases else "" for p in plan.phases],
                      _gib(t.host) if t.host else "")
    table.add_row("", f"[bold]peak {unit}[/bold]", *[_gib(plan.per_device[p]) for p in plan.phases], "",
                  end_section=True)
    if cpu:
        for name, b in plan.node_terms.items():
            table.add_row("node", name, *[_gib(b)] * len(plan.phases), "")
        table.add_row("", f"[bold]peak per node ({plan.devices_per_node} worker(s))[/bold]",
                      *[_gib(plan.peaks[p]) for p in plan.phases], "")
    table.add_row("", "memory", *[_gib(plan.device_memory)] * len(plan.phases), "")
    console.print(table)
    if not cpu:
        outside = sum(plan.node_terms.values())
        console.print(f"host memory per node: {plan.host_per_node / GB:.1f} GiB "
                      f"({plan.devices_per_node} × {(plan.host_per_node - outside) / plan.devices_per_node / GB:.1f} "
                      f"GiB offloaded state + worker processes, {outside / GB:.1f} GiB Ray, driver, reward pool)")
    for name, b in plan.extra_peaks.items():
        console.print(f"{name}: peak {b / GB:.1f} GiB")
    if plan.kv_tokens:
        max_len = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens + 8
        console.print(f"rollout KV cache: {plan.kv_tokens:,} tokens per engine "
                      f"(= {plan.kv_tokens // max_len} sequences at full length in flight)")
    _verdict(console, plan, kind, cfg, shape, device, shapes, fixes)
    s, m = plan.seconds, plan.mfu
    parts = ", ".join(f"{k} {v:.3g} s" for k, v in s.items() if k != "total")
    gen = f"generate at {m['generate']:.0%} MFU, " if "generate" in s else ""
    console.print(f"time per step ≈ {s['total']:.3g} s ({parts}) — from FLOPs at the maximum lengths, "
                  f"{gen}training at {m['train']:.0%} MFU of {plan.peak_flops / 1e12:.4g} TFLOP/s "
                  f"per {'worker' if cpu else 'device'}; weight sync and data movement not included")
    return plan.fits


def _verdict(console, plan, kind, cfg, shape, device, shapes, fixes) -> None:
    phase = plan.worst_phase
    peak, mem = plan.peaks[phase], plan.device_memory
    top = plan.largest_term(phase)
    if plan.fits:
        console.print(f"[bold green]verdict: fits[/bold green] — peak {peak / GB:.1f} of {mem / GB:.1f} GiB "
                      f"({peak / mem:.0%}) in phase '{phase}'; largest term: {top.role} {top.name} "
                      f"{top.bytes / GB:.1f} GiB")
        return
    reasons = list(plan.problems)
    if peak > mem:
        reasons.insert(0, f"phase '{phase}' needs {peak / GB:.1f} GiB of {mem / GB:.1f} GiB; largest term: "
                          f"{top.role} {top.name} {top.bytes / GB:.1f} GiB")
    if plan.host_memory is not None and plan.host_per_node > plan.host_memory and peak <= mem:
        reasons.append(f"host needs {plan.host_per_node / GB:.1f} of {plan.host_memory / GB:.1f} GiB")
    console.print("[bold red]verdict: does not fit[/bold red] — " + "; ".join(reasons))
    found = fixes(cfg, kind, shape, device, **shapes)
    if found:
        console.print("fits with: " + "  |  ".join(_fmt_sets(f) for f in found))
    else:
        console.print("no single knob (or combination of three) found that fits: use a larger device "
                      "or more nodes")


def command(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted KEY=VALUE overrides, e.g. actor.micro_batch_sequences_per_device=8"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name or YAML path; `verl presets` lists them."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (sparse, over the preset)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="sft, ppo or grpo (default: ppo if the config uses a critic, else grpo)."),
):
    """Memory per device per phase, host memory, a verdict and seconds per step — before launch.

    Reads the model's config.json only (the preset models' configs ship with verl: no network,
    no weights). Exits 1 when the run does not fit, after naming the knobs that would make it fit.

    Examples:

      verl plan --preset qwen2.5-32b-4x8xH100

      verl plan --preset qwen2.5-7b-8xH100 actor.micro_batch_sequences_per_device=32

      verl plan --preset qwen2.5-7b-8xH100 resources.device_memory_gb=141   # on H200s

      verl plan --preset smollm2-135m-cpu --kind sft
    """
    from verlcli.commands.train import DEFAULT_PRESET
    from verlcli.config.loader import load_config

    if preset is None and config is None:
        preset = DEFAULT_PRESET
    cfg = load_config(preset=preset, config_file=config, overrides=overrides or [])
    if not show_plan(_kind_of(cfg, kind), cfg):
        raise typer.Exit(1)
