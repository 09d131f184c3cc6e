"""AdamW and the learning-rate schedules, as a `LambdaLR` multiplier of `optim.lr`.

Schedules (`OptimConfig.schedule`), for optimizer step s = 0, 1, ... (the lr that step s
uses), with W = warmup_steps and N = total optimizer steps:

- warmup (both schedules): s < W → lr · (s + 1) / W. The first step already moves the
  weights (HF's warmup gives lr 0 at step 0, a wasted step); step W − 1 runs at full lr.
- `constant`: lr after warmup.
- `cosine`: after warmup, lr · (m + (1 − m) · ½(1 + cos(π·p))) with p = (s − W) / (N − W)
  clamped to [0, 1] and m = min_lr_ratio, so the last step (s = N − 1) sits just above
  the floor m·lr and anything past N stays on it.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from verlcli.config.schema import OptimConfig


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """The factor of the base lr that optimizer step `s` runs at (see module docstring)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule!r}; expected 'constant' or 'cosine'")
    warmup = max(0, int(warmup_steps))
    decay_steps = max(1, int(total_steps) - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - warmup) / decay_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (weight decay on all of them, as verl does)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters to optimize")
    # fused: one kernel per tensor instead of ~10 elementwise passes. On this CPU it took
    # 0.15 s instead of 0.55-0.65 s per step for 134.5M fp32 params (single-tensor and foreach
    # alike); CUDA has the same kernel. Other devices: torch's default.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for p in params) or None
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused)


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` whose step count is the number of optimizer steps taken so far."""
    fn = lr_multiplier(cfg.schedule, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
