"""Step metrics: per-phase timing, throughput, reward and length statistics, log-prob gap."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import numpy as np
import torch

from verlcli.data.batch import Batch


class Timer:
    """`with timer("gen"):` accumulates seconds per phase into timing/<phase>_s."""

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] += time.perf_counter() - t0

    def metrics(self) -> dict:
        out = {f"timing/{k}_s": v for k, v in self.times.items()}
        out["timing/step_s"] = sum(self.times.values())
        return out


def average(dicts: list[dict]) -> dict:
    """Mean of per-rank metric dicts."""
    acc = defaultdict(list)
    for d in dicts:
        for k, v in (d or {}).items():
            if v is not None:
                acc[k].append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def data_metrics(batch: Batch, max_response_tokens: int) -> dict:
    mask = batch["response_mask"].float()
    lengths = mask.sum(-1)
    scores = batch["scores"]
    out = {
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clip_frac": float((lengths >= max_response_tokens).float().mean()),
        "prompt/length_mean": float(batch["attention_mask"][:, : batch["prompts"].shape[1]].float().sum(-1).mean()),
        "reward/mean": float(batch["token_level_rewards"].sum(-1).mean()),
        "score/mean": float(scores.mean()),
        "score/max": float(scores.max()),
        "score/min": float(scores.min()),
        "advantage/mean": _masked_mean(batch["advantages"], mask),
        "advantage/abs_max": float((batch["advantages"].abs() * mask).max()),
    }
    for ds in sorted(set(batch["data_source"])):
        sel = torch.tensor([d == ds for d in batch["data_source"]])
        out[f"score/{ds}/mean"] = float(scores[sel].mean())
    if "old_log_probs" in batch:
        gap = (batch["rollout_log_probs"] - batch["old_log_probs"]).abs() * mask
        # The first thing to look at when training goes wrong: rollout vs trainer log-probs.
        out["rollout/logprob_gap_mean"] = float(gap.sum() / mask.sum().clamp(min=1))
        out["rollout/logprob_gap_max"] = float(gap.max())
    if "entropy" in batch:
        out["actor/entropy"] = _masked_mean(batch["entropy"], mask)
    if "values" in batch:
        out["critic/values_mean"] = _masked_mean(batch["values"], mask)
        out["critic/returns_mean"] = _masked_mean(batch["returns"], mask)
    out.update(agent_metrics(batch))
    return out


def agent_metrics(batch: Batch, prefix: str = "agent/") -> dict:
    """Multi-turn rollouts (workers/agent.py columns): turns per trajectory, tool calls and
    failures per tool, how trajectories ended (answered_frac: with an answer, not cut short)."""
    if "agent_turns" not in batch:
        return {}
    turns = np.asarray(batch["agent_turns"], dtype=float)
    finish = list(batch["agent_finish"])
    out = {f"{prefix}turns_mean": float(turns.mean()), f"{prefix}turns_max": float(turns.max()),
           f"{prefix}answered_frac": float(np.mean([f == "answer" for f in finish])),
           f"{prefix}inserted_tokens_mean": float(np.mean(np.asarray(batch["agent_inserted_tokens"], dtype=float)))}
    for reason in sorted(set(finish)):
        out[f"{prefix}finish/{reason}_frac"] = float(np.mean([f == reason for f in finish]))
    calls, fails = defaultdict(int), defaultdict(int)
    for row in batch["agent_calls"]:
        for name, ok in row:
            calls[name] += 1
            fails[name] += 0 if ok else 1
    out[f"{prefix}tool_calls_per_trajectory"] = float(sum(calls.values()) / max(len(turns), 1))
    for name in sorted(calls):
        out[f"{prefix}tool_calls/{name}"] = float(calls[name])
        out[f"{prefix}tool_failures/{name}"] = float(fails[name])
    return out


# Dense bf16 peak of one GPU, for MFU (H100 SXM; other GPUs: set VERL_PEAK_TFLOPS).
DEFAULT_PEAK_TFLOPS = 989.0


def throughput(batch: Batch, timing: dict, world_size: int, n_params: int = 0, device: str = "cpu") -> dict:
    gen_tokens = float(batch["response_mask"].sum())
    all_tokens = float(batch["attention_mask"].sum())
    step_s = timing.get("timing/step_s", 0.0) or 1e-9
    gen_s = timing.get("timing/gen_s", 0.0) or 1e-9
    out = {
        "perf/gen_tokens_per_s": gen_tokens / gen_s,
        "perf/tokens_per_s": all_tokens / step_s,
        "perf/tokens_per_s_per_device": all_tokens / step_s / world_size,
        "perf/total_tokens": all_tokens,
    }
    update_s = timing.get("timing/update_actor_s", 0.0)
    if device == "cuda" and n_params and update_s:
        import os

        # Training MFU of the actor update: 6·N FLOPs per token (forward + backward).
        peak = float(os.environ.get("VERL_PEAK_TFLOPS", DEFAULT_PEAK_TFLOPS)) * 1e12
        out["perf/mfu_actor_update"] = 6 * n_params * all_tokens / update_s / (peak * world_size)
    return out


def count_params(model_dir) -> int:
    """Parameters in a HF directory's safetensors files, read from their headers only."""
    from pathlib import Path

    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total
