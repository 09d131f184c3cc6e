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
                 cpu_kvcache_gb: float = 1, enable_sleep: bool = False,
                 tensor_parallel_size: int = 1, trust_remote_code: bool = False) -> RolloutEngine:
    """Build the rollout engine named by `rollout.engine`. `tensor_parallel_size` > 1 (vLLM
    only): consecutive groups of that many ranks of the caller's process group share one
    engine; every rank of a group must call `generate` with the same prompts."""
    if engine == "hf":
        if tensor_parallel_size != 1:
            raise UserError(f"rollout.tensor_parallel_size={tensor_parallel_size} needs the vllm engine",
                            fix="set rollout.engine=vllm, or rollout.tensor_parallel_size=1")
        from verlcli.rollout.hf_engine import HFRollout

        return HFRollout(model_path, device=device, dtype=dtype, max_model_len=max_model_len,
                         seed=seed, trust_remote_code=trust_remote_code)
    if engine == "vllm":
        from verlcli.rollout.vllm_engine import VLLMRollout

        return VLLMRollout(model_path, device=device, dtype=dtype, max_model_len=max_model_len,
                           seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                           cpu_kvcache_gb=cpu_kvcache_gb, enable_sleep=enable_sleep,
                           tensor_parallel_size=tensor_parallel_size,
                           trust_remote_code=trust_remote_code)
    raise UserError(f"unknown rollout.engine {engine!r}",
                    fix=f"set rollout.engine to one of: {', '.join(ENGINES)}")
