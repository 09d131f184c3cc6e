"""Balanced data-parallel split: every rank gets about the same number of tokens.

A `dp` call that splits rows into contiguous chunks gives one rank the long responses and
another the short ones; the short rank then waits at every collective. Here the rows are
partitioned into equal-SIZED parts (every rank must get the same number of rows: the worker
derives its mini-batch size from its row count, and FSDP needs the same number of forwards
on every rank) whose token sums are as equal as the Karmarkar–Karp largest-differencing
heuristic makes them (the equal-size variant verl's `get_seqlen_balanced_partitions` uses too).

Rows stay in their original relative order inside each part, so a worker that cuts its
chunk into contiguous mini-batches still sees an ordinary mix of rows. `blocks` > 1 keeps
contiguous blocks of the batch apart (mini-batches: one optimizer step each) and balances
each block on its own, so every optimizer step is balanced, not just their sum.
"""

from __future__ import annotations

import heapq
from typing import Sequence


def balanced_partition(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Indices of `costs` in `parts` parts of equal size (len(costs) % parts == 0) with
    near-equal sums. Each part's indices are ascending. Deterministic."""
    n = len(costs)
    if parts < 1 or n % parts:
        raise ValueError(f"cannot split {n} rows into {parts} equal parts")
    if parts == 1:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: (-costs[i], i))
    # A state is `parts` partial parts. Start: each run of `parts` consecutive rows (in cost
    # order) gives one row to every part, so every merge keeps the sizes equal.
    heap = []
    for s in range(0, n, parts):
        members = [[i] for i in order[s:s + parts]]
        sums = [float(costs[i]) for i in order[s:s + parts]]
        heapq.heappush(heap, _state(sums, members, s))
    while len(heap) > 1:
        _, _, a_sums, a_members = heapq.heappop(heap)
        _, tie, b_sums, b_members = heapq.heappop(heap)
        # Largest differencing: the heaviest part of one state takes the lightest of the other.
        ia = sorted(range(parts), key=lambda k: a_sums[k])
        ib = sorted(range(parts), key=lambda k: -b_sums[k])
        sums = [a_sums[x] + b_sums[y] for x, y in zip(ia, ib)]
        members = [a_members[x] + b_members[y] for x, y in zip(ia, ib)]
        heapq.heappush(heap, _state(sums, members, tie))
    return [sorted(m) for m in heap[0][3]]


def _state(sums: list[float], members: list[list[int]], tie: int):
    # heapq is a min-heap: the state with the largest spread comes out first.
    return (-(max(sums) - min(sums)), tie, sums, members)


def dp_order(costs: Sequence[float], parts: int, blocks: int = 1) -> list[int]:
    """A row order such that cutting it into `parts` equal contiguous chunks gives balanced
    chunks; within each chunk, block b's rows come before block b+1's (see module doc).
    Falls back to one block when the blocks cannot be split evenly."""
    costs = [float(c) for c in costs]
    n = len(costs)
    if blocks < 1 or n % (parts * blocks):
        blocks = 1
    size = n // blocks
    per_rank: list[list[int]] = [[] for _ in range(parts)]
    for b in range(blocks):
        lo = b * size
        for r, part in enumerate(balanced_partition(costs[lo:lo + size], parts)):
            per_rank[r] += [lo + i for i in part]
    return [i for rows in per_rank for i in rows]


def imbalance(costs: Sequence[float], parts: int, order: Sequence[int] | None = None) -> float:
    """max / mean of the per-rank cost when `order` (default: as given) is cut into `parts`
    equal contiguous chunks. 1.0 is perfect."""
    idx = list(order) if order is not None else list(range(len(costs)))
    size = len(idx) // parts
    loads = [sum(float(costs[i]) for i in idx[r * size:(r + 1) * size]) for r in range(parts)]
    mean = sum(loads) / parts
    return max(loads) / mean if mean else 1.0
