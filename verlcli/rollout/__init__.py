"""Rollout engines behind one interface (see base.py for the conventions).

    engine = make_rollout("vllm", model_dir, device="cpu", dtype="float32",
                          max_model_len=1024, seed=0)
    outs = engine.generate(prompt_ids, SamplingSpec(n=4, temperature=1.0, max_tokens=256))
    stats = engine.sync_weights(actor_state_dict)   # {"sync_s", "sync_gb", "sync_gbps"}

Engines are imported lazily: `hf` must work where vLLM is not installed.
"""

from __future__ import annotations

import os

from verlcli.errors import UserError
from verlcli.rollout.base import RolloutEngine, RolloutOutput, SamplingSpec

ENGINES = ("vllm", "hf")

__all__ = ["ENGINES", "RolloutEngine", "RolloutOutput", "SamplingSpec", "make_rollout"]


def make_rollout(engine: str, model_path: str | os.PathLike, *, device: str, dtype,
                 max_model_len: int, seed: int, gpu_memory_utilization: float = 0.5,
                 cpu_kvcache_gb: float = 1, enable_sleep: bool = False) -> RolloutEngine:
    """Build the rollout engine named by `rollout.engine`."""
    if engine == "hf":
        from verlcli.rollout.hf_engine import HFRollout

        return HFRollout(model_path, device=device, dtype=dtype, max_model_len=max_model_len,
                         seed=seed)
    if engine == "vllm":
        from verlcli.rollout.vllm_engine import VLLMRollout

        return VLLMRollout(model_path, device=device, dtype=dtype, max_model_len=max_model_len,
                           seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                           cpu_kvcache_gb=cpu_kvcache_gb, enable_sleep=enable_sleep)
    raise UserError(f"unknown rollout.engine {engine!r}",
                    fix=f"set rollout.engine to one of: {', '.join(ENGINES)}")
