"""Full weights out of a sharded engine, one tensor at a time, grouped in bounded buckets.

What every backend's `weight_buckets` shares (see `engine/base.py`): the order and names of
what is streamed, the LoRA merge per module, the tied-weight aliases and the bucketing.
A backend supplies only `fetch(name, dtype)`: the full tensor behind one of its state-dict
names, gathered from the shards (a collective, so every rank walks the same names in the same
order) and cast to `dtype` (None: as stored). Casting the SHARD before gathering halves the
bytes on the wire and never materializes the full fp32 tensor; it is exact (a cast is
elementwise). LoRA modules are gathered as stored, merged in fp32, then cast. At any moment
a rank holds at most one bucket plus the tensor (or LoRA module) being gathered.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from verlcli.engine.base import NamedTensors

PEFT_PREFIX = "base_model.model."
_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.",
               ".lora_magnitude_vector.")


def hf_name(name: str) -> str:
    """peft state-dict name → the Hugging Face name of the merged weight."""
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")


def _is_adapter(name: str) -> bool:
    return any(part in name for part in _LORA_PARTS)


def _alias_plan(names: Iterable[str], tied_aliases) -> tuple[dict[str, list[str]], set[str]]:
    """(streamed name → the other names it goes out under, names not fetched at all).

    A tied parameter is gathered once and sent under every name: a rollout engine with tied
    embeddings keeps its old output layer unless `lm_head.weight` arrives too."""
    present = {hf_name(n) for n in names}
    extra: dict[str, list[str]] = {}
    skip: set[str] = set()
    for kept, alias in tied_aliases:
        if kept in present:
            extra.setdefault(kept, []).append(alias)
            skip.add(alias)
        elif alias in present:
            extra.setdefault(alias, []).append(kept)
    return extra, skip


def stream_weights(names: list[str], fetch: Callable[[str, torch.dtype | None], torch.Tensor],
                   bucket_bytes: int,
                   dtype: torch.dtype | None, lora_scale: float | None,
                   tied_aliases=(), adapter: str = "default") -> Iterator[NamedTensors]:
    """Yield buckets of (HF name, full tensor cast to `dtype`) of at most `bucket_bytes`
    (a single larger tensor is a bucket of its own). With `lora_scale`, each adapted
    module's `base_layer.weight` goes out as W + scale · B·A (computed in fp32)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    extra, skip = _alias_plan(names, tied_aliases)
    bucket: NamedTensors = []
    size = merged = 0
    for name in names:
        out = hf_name(name)
        if _is_adapter(name) or out in skip:
            continue
        if lora_scale is not None and name.endswith(".base_layer.weight"):
            module = name[: -len(".base_layer.weight")]
            base = fetch(name, None)
            a = fetch(f"{module}.lora_A.{adapter}.weight", None).float()
            b = fetch(f"{module}.lora_B.{adapter}.weight", None).float()
            tensor = (base.float() + lora_scale * (b @ a)).to(dtype or base.dtype)
            del base, a, b
            merged += 1
        else:
            tensor = fetch(name, dtype)
        tensor = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((out, tensor))
        bucket.extend((alias, tensor) for alias in extra.get(out, ()))
        size += nbytes
        del tensor
    if bucket:
        yield bucket
    if lora_scale is not None and merged == 0:
        # A "merge" that silently equals the base model is the failure to prevent.
        raise ValueError("LoRA is on but no adapted module ('.base_layer.weight') was found")
