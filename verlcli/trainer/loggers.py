"""Metric sinks: console, metrics.jsonl (always), TensorBoard and wandb on request.

wandb runs offline when no API key is configured, so a run never blocks on a login.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console

# The console's one line per step: (label, candidate keys — the first present is shown, format).
# Everything else is in metrics.jsonl (and TensorBoard / wandb).
CONSOLE_COLUMNS = [
    ("reward", ("score/mean",), ".3f"),
    ("val", ("val/score/mean",), ".3f"),
    ("len", ("response/length_mean",), ".1f"),
    ("entropy", ("actor/entropy",), ".3f"),
    ("kl", ("actor/kl_loss", "actor/reward_kl_penalty", "actor/ppo_kl"), ".2g"),
    ("loss", ("train/loss",), ".4f"),
    ("val_loss", ("val/loss",), ".4f"),
    ("lr", ("train/lr",), ".2g"),
    ("tok/s", ("perf/tokens_per_s",), ".0f"),
    ("s", ("timing/step_s",), ".1f"),
]


def console_line(step: int, metrics: dict) -> str | None:
    """'step 3  reward 0.250  val 0.310  len 45.2  entropy 1.23  kl 0.0012  s 3.2'; None when
    the step has none of those metrics (e.g. the weight-sync numbers logged at step 0)."""
    parts = []
    for label, keys, fmt in CONSOLE_COLUMNS:
        key = next((k for k in keys if isinstance(metrics.get(k), (int, float))), None)
        if key is not None:
            parts.append(f"{label} {format(metrics[key], fmt)}")
    return f"step {step}  " + "  ".join(parts) if parts else None


class Tracker:
    def __init__(self, run_dir: str, backends: list[str], project: str, name: str, config: dict):
        self.console = Console(stderr=True)
        self.backends = set(backends) | {"jsonl"}
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = self.wandb = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in self.backends:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=project, name=name, config=config, dir=run_dir, mode=mode)

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        # One line per step, appended and flushed: a crash loses at most the current step.
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(clean, step=step)
        line = console_line(step, clean) if "console" in self.backends else None
        if line:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
