"""Micro-batches by token budget (`*.micro_batch_tokens_per_device`).

A fixed sequence count sizes every micro-batch for the longest rows; a token budget fills each
forward with as many rows as fit, so short responses cost fewer forwards. The cost of a
micro-batch is what its forward pays for:

- padded rows (workers/seq.py `trim`): rows × (longest prompt + longest response) of the
  micro-batch: every row is padded to that width;
- packed rows (engine `pack_mode`, engine/packing.py): the real tokens, Σ (prompt + response),
  because padding removal runs one row of only the real tokens.

Rows are sorted by length first (similar lengths together = little padding). Every rank must
run the same number of forwards (FSDP gathers parameters in each one), so the count is agreed
over the ranks (`max_over_ranks`) and a rank that needs fewer splits its largest micro-batches.
Which rows share a forward never changes the gradient: the losses are normalized by global
token/sequence counts (workers/losses.py), so micro-batch gradients add up to the same sum.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def row_lengths(attention_mask: torch.Tensor, response_width: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, response extent) per row: attention_mask counts every real token."""
    P = attention_mask.shape[1] - response_width
    return attention_mask[:, :P].sum(-1).tolist(), attention_mask[:, P:].sum(-1).tolist()


def cost(rows: Sequence[int], prompts: Sequence[int], responses: Sequence[int], packed: bool) -> int:
    """Tokens a forward over `rows` pays for (module docstring)."""
    if not rows:
        return 0
    if packed:
        return sum(prompts[i] + responses[i] for i in rows)
    return len(rows) * (max(prompts[i] for i in rows) + max(responses[i] for i in rows))


def by_budget(prompts: Sequence[int], responses: Sequence[int], budget: int, packed: bool) -> list[list[int]]:
    """Row indices per micro-batch: rows in length order, each micro-batch filled up to
    `budget` tokens (a row longer than the budget goes alone; the config check prevents it)."""
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i] + responses[i], i))
    micros: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and cost(cur + [i], prompts, responses, packed) > budget:
            micros.append(cur)
            cur = []
        cur.append(i)
    if cur:
        micros.append(cur)
    return micros


def split_to(micros: list[list[int]], count: int, prompts: Sequence[int], responses: Sequence[int],
             packed: bool) -> list[list[int]]:
    """`count` micro-batches: halve the costliest splittable one until there are enough
    (a rank with fewer forwards than the others). Needs at least `count` rows."""
    micros = [list(m) for m in micros]
    while len(micros) < count:
        splittable = [k for k, m in enumerate(micros) if len(m) > 1]
        if not splittable:
            raise ValueError(f"{sum(map(len, micros))} rows cannot make {count} micro-batches")
        k = max(splittable, key=lambda k: cost(micros[k], prompts, responses, packed))
        m = micros.pop(k)
        micros[k:k] = [m[:len(m) // 2], m[len(m) // 2:]]
    return micros


def max_over_ranks(x: int) -> int:
    """The largest `x` of all ranks of this process's world (every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.long)  # a CPU tensor: gloo on CPU, the gloo half of cpu:gloo,cuda:nccl
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def token_micro_batches(attention_mask: torch.Tensor, response_width: int, budget: int,
                        packed: bool) -> list[list[int]]:
    """Row indices per micro-batch under `budget`, the same number of them on every rank."""
    prompts, responses = row_lengths(attention_mask, response_width)
    micros = by_budget(prompts, responses, budget, packed)
    return split_to(micros, max_over_ranks(len(micros)), prompts, responses, packed)
