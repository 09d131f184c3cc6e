"""How a worker-group method call is split across ranks and how the answers come back.

A worker class marks its methods with `@register(dispatch=...)`; the group reads the mark and
turns one driver call into one call per rank:

- ``dp``    the first positional argument (or ``batch=``) is a `Batch`: pad it to a multiple of
            the world size, split it into equal contiguous chunks, rank r gets chunk r. Batch
            results are concatenated in rank order and the padding rows are dropped, so the
            driver gets back exactly one output row per input row, in order. A batch with an
            `attention_mask` is first reordered so the chunks hold about the same number of
            tokens (balance.py; `meta["dp_blocks"]` = contiguous mini-batches balanced one by
            one); the results are put back in the caller's row order. Other results
            (metrics dicts, None, ...) come back as a list, one per rank.
            When the training engine's data-parallel slices span several ranks (Megatron
            tensor parallelism: the group's `dp_group_size` consecutive ranks share one
            slice), those ranks get the same chunk and only the first of them answers.
- ``replica`` like ``dp``, but over rollout replicas: the group's `replica_size` ranks in a row
            (one tensor-parallel engine) all get the same chunk, and only the first rank of
            each replica answers. With `replica_size` 1 it is ``dp``.
- ``all``   every rank gets the same arguments; the list of results comes back.
- ``rank0`` every rank gets the same arguments (SPMD code must run collectives on all ranks);
            only rank 0's result comes back.

`collect=` overrides how the results come back: ``"list"``, ``"rank0"``, ``"concat"`` or a
callable taking the list of per-rank results.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from verlcli.data.batch import Batch
from verlcli.distributed.balance import dp_order, imbalance

DISPATCH_MODES = ("dp", "replica", "all", "rank0")
COLLECT_MODES = ("list", "rank0", "concat")
_ATTR = "__verl_dispatch__"


@dataclass(frozen=True)
class DispatchSpec:
    mode: str = "dp"
    collect: str | Callable[[list], Any] | None = None  # None: the mode's default


@dataclass(frozen=True)
class CallPlan:
    """What the split did, so collecting can undo it (padding rows to drop)."""

    mode: str
    world: int
    pad: int = 0
    padded_rows: int = 0
    replica: int = 1  # ranks per replica: results are taken from every replica-th rank
    order: tuple[int, ...] | None = None  # the padded rows in the order they were sent


def register(fn: Callable | None = None, *, dispatch: str = "dp", collect=None):
    """Mark a worker method for dispatch by its group. Usable as `@register` or `@register(...)`."""
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"register(dispatch={dispatch!r}): must be one of {DISPATCH_MODES}")
    if collect is not None and not callable(collect) and collect not in COLLECT_MODES:
        raise ValueError(f"register(collect={collect!r}): must be a callable or one of {COLLECT_MODES}")
    spec = DispatchSpec(dispatch, collect)

    def mark(f: Callable) -> Callable:
        setattr(f, _ATTR, spec)
        return f

    return mark(fn) if fn is not None else mark


def registered_methods(cls: type) -> dict[str, DispatchSpec]:
    """Every registered method of `cls`, by name.

    Walks the MRO from the base down, so a subclass that overrides a registered method without
    repeating the decorator keeps the base's dispatch contract (a silent switch to "no dispatch"
    would make the method vanish from the group).
    """
    specs: dict[str, DispatchSpec] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            spec = getattr(attr, _ATTR, None)
            if isinstance(spec, DispatchSpec):
                specs[name] = spec
    return specs


def split_call(spec: DispatchSpec, world: int, args: tuple, kwargs: dict, method: str,
               replica: int = 1):
    """One (args, kwargs) per rank, plus the plan `collect_results` needs. `replica`: ranks
    that share one chunk (the group's replica_size in ``replica`` mode, dp_group_size in
    ``dp`` mode)."""
    if spec.mode not in ("dp", "replica"):
        return [(args, kwargs)] * world, CallPlan(spec.mode, world)
    if replica < 1 or world % replica:
        raise ValueError(f"{method}(): {world} ranks cannot form replicas of {replica}")
    batch, put_back = _find_batch(args, kwargs, method)
    groups = world // replica
    padded, pad = batch.pad_to_divisor(groups)
    order = balanced_order(padded, groups) if spec.mode == "dp" else None
    if order is not None:
        padded = padded.index(list(order))
    chunks = [put_back(chunk) for chunk in padded.split(groups)]
    per_rank = [chunks[r // replica] for r in range(world)]  # a replica's ranks: one chunk
    return per_rank, CallPlan("dp", world, pad, len(padded), replica, order)


def balanced_order(batch: Batch, groups: int) -> tuple[int, ...] | None:
    """The token-balanced row order for `groups` data-parallel chunks, or None (one chunk,
    or no attention mask to count tokens by)."""
    mask = batch.tensors.get("attention_mask")
    if groups < 2 or mask is None:
        return None
    costs = tuple(mask.sum(-1).tolist())  # real tokens: what a packed forward pays for
    return _cached_order(costs, groups, int(batch.meta.get("dp_blocks", 1)))


@functools.lru_cache(maxsize=8)
def _cached_order(costs: tuple, groups: int, blocks: int) -> tuple[int, ...]:
    # The driver asks twice per update (balance_metrics, then the dispatch itself).
    return tuple(dp_order(costs, groups, blocks))


def dp_group_size(coords: list, group: str = "workers") -> int:
    """Ranks per data-parallel slice from every rank's (dp_rank, dp_size), in rank order.
    Only consecutive blocks are valid (rank r → slice r // k), as megatron orders them."""
    coords = [tuple(c) for c in coords]
    world, dp_size = len(coords), coords[0][1]
    k = world // dp_size if dp_size and world % dp_size == 0 else 0
    if not k or any(c != (r // k, dp_size) for r, c in enumerate(coords)):
        raise ValueError(f"group '{group}': workers report data-parallel coordinates {coords}, "
                         "not consecutive blocks of equal size")
    return k


def _find_batch(args: tuple, kwargs: dict, method: str):
    if args and isinstance(args[0], Batch):
        return args[0], lambda chunk: ((chunk, *args[1:]), kwargs)
    if not args and isinstance(kwargs.get("batch"), Batch):
        return kwargs["batch"], lambda chunk: (args, {**kwargs, "batch": chunk})
    got = type(args[0]).__name__ if args else "no positional argument"
    raise TypeError(
        f"{method}() is registered with dispatch='dp', so its first argument must be a Batch "
        f"(got {got}); register it with dispatch='all' or 'rank0' to pass other arguments"
    )


def collect_results(spec: DispatchSpec, plan: CallPlan, results: list, method: str):
    """Turn the per-rank results (in rank order) into what the driver gets back."""
    collect = spec.collect
    results = results[::plan.replica]  # one answer per replica (its ranks agree)
    if callable(collect):
        return collect(results)
    if collect == "list":
        return list(results)
    if collect == "rank0" or (collect is None and plan.mode == "rank0"):
        return results[0]
    if collect == "concat" or (collect is None and plan.mode == "dp"):
        if results and all(isinstance(r, Batch) for r in results):
            return _concat_unpad(results, plan, method)
        if collect == "concat":
            kinds = sorted({type(r).__name__ for r in results})
            raise TypeError(f"{method}(): collect='concat' needs a Batch from every rank, got {kinds}")
    return list(results)


def _concat_unpad(results: list[Batch], plan: CallPlan, method: str) -> Batch:
    out = Batch.concat(results)
    if plan.order is not None:
        out = out.index(_inverse(plan.order, len(out), method))
    if plan.mode != "dp" or plan.pad == 0:
        return out
    # The padding rows are the last `pad` input rows (pad_to_divisor appends them and split is
    # contiguous). A method may return k rows per input row (e.g. n samples per prompt, each
    # prompt's samples kept together); then the last k * pad output rows are padding.
    rows = len(out)
    if rows % plan.padded_rows:
        raise ValueError(
            f"{method}(): the ranks returned {rows} rows for {plan.padded_rows} input rows "
            f"(incl. {plan.pad} padding rows), not a whole multiple, so the padding cannot be "
            "removed; return k rows per input row, or send a batch divisible by the world size"
        )
    return out.unpad(plan.pad * (rows // plan.padded_rows))


def with_blocks(batch: Batch, blocks: int) -> Batch:
    """The same rows (no copy), marked as `blocks` contiguous mini-batches for the balanced split."""
    return Batch(batch.tensors, batch.non_tensors, {**batch.meta, "dp_blocks": int(blocks)})


def balance_metrics(batch: Batch, groups: int) -> dict:
    """Tokens per data-parallel rank, max / mean (1 = even), of the split a `dp` call of this
    batch gets, and of plain contiguous chunks for comparison."""
    padded, _ = batch.pad_to_divisor(groups)
    order = balanced_order(padded, groups)
    if order is None:
        return {}
    costs = padded["attention_mask"].sum(-1).tolist()
    return {"perf/dp_token_imbalance": imbalance(costs, groups, order),
            "perf/dp_token_imbalance_contiguous": imbalance(costs, groups)}


def _inverse(order: tuple[int, ...], rows: int, method: str) -> list[int]:
    """Output positions that put the results of reordered rows back in input order (k output
    rows per input row, kept together, as for unpadding)."""
    if rows % len(order):
        raise ValueError(f"{method}(): the ranks returned {rows} rows for {len(order)} input rows, "
                         "not a whole multiple, so they cannot be put back in order")
    k = rows // len(order)
    where = [0] * len(order)
    for sent, original in enumerate(order):
        where[original] = sent
    return [where[i] * k + t for i in range(len(order)) for t in range(k)]
