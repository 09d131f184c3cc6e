"""Metric sinks: console, metrics.jsonl (always), TensorBoard and wandb on request.

wandb runs offline when no API key is configured, so a run never blocks on a login.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console

CONSOLE_KEYS = [
    "score/mean", "val/score/mean", "response/length_mean", "actor/entropy", "actor/ppo_kl",
    "actor/pg_clipfrac", "actor/grad_norm", "rollout/logprob_gap_mean", "timing/step_s", "perf/gen_tokens_per_s",
    "train/loss", "val/loss", "train/grad_norm", "train/lr", "perf/tokens_per_s",
]


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
        if "console" in self.backends:
            shown = [f"{k}={clean[k]:.4g}" for k in CONSOLE_KEYS if isinstance(clean.get(k), (int, float))]
            self.console.print(f"[bold]step {step}[/bold] " + " ".join(shown), highlight=False)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
