"""Batch: the one type that moves between the driver and the workers.

Named tensors that share dim 0, non-tensor columns (numpy object arrays of the same length)
and free-form metadata. Worker groups split a Batch across data-parallel ranks and concat the
results; the trainer repeats prompts n times and pads to a divisor so every rank gets the
same number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    non_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.non_tensors = {k: _as_object_array(v) for k, v in self.non_tensors.items()}
        self._check()

    # ------------------------------------------------------------ basics
    def __len__(self) -> int:
        for v in self.tensors.values():
            return v.shape[0]
        for v in self.non_tensors.values():
            return len(v)
        return 0

    def _check(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.tensors.items()}
        sizes.update({k: len(v) for k, v in self.non_tensors.items()})
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch columns disagree on dim 0: {sizes}")

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.non_tensors

    def __getitem__(self, key: str):
        if key in self.tensors:
            return self.tensors[key]
        if key in self.non_tensors:
            return self.non_tensors[key]
        raise KeyError(f"Batch has no column '{key}' (has {sorted(self.keys())})")

    def __setitem__(self, key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            self.non_tensors.pop(key, None)
            self.tensors[key] = value
        else:
            self.tensors.pop(key, None)
            self.non_tensors[key] = _as_object_array(value)
        self._check()

    def keys(self) -> list[str]:
        return list(self.tensors) + list(self.non_tensors)

    def select(self, keys: Iterable[str]) -> "Batch":
        keys = list(keys)
        return Batch(
            {k: v for k, v in self.tensors.items() if k in keys},
            {k: v for k, v in self.non_tensors.items() if k in keys},
            dict(self.meta),
        )

    def union(self, other: "Batch") -> "Batch":
        """Columns of both (other wins on clashes); lengths must match."""
        if len(self) and len(other) and len(self) != len(other):
            raise ValueError(f"cannot union batches of {len(self)} and {len(other)} rows")
        return Batch({**self.tensors, **other.tensors}, {**self.non_tensors, **other.non_tensors}, {**self.meta, **other.meta})

    def index(self, idx) -> "Batch":
        """Rows by slice, list of ints, or boolean mask."""
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        if isinstance(idx, np.ndarray) and idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        t_idx = idx if isinstance(idx, slice) else torch.as_tensor(np.asarray(idx), dtype=torch.long)
        n_idx = idx if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
        return Batch(
            {k: v[t_idx] for k, v in self.tensors.items()},
            {k: v[n_idx] for k, v in self.non_tensors.items()},
            dict(self.meta),
        )

    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, self.non_tensors, self.meta)

    # ------------------------------------------------------------ split / concat / repeat / pad
    def split(self, chunks: int) -> list["Batch"]:
        """Equal contiguous chunks; len must be divisible (use pad_to_divisor first)."""
        n = len(self)
        if n % chunks:
            raise ValueError(f"cannot split {n} rows into {chunks} equal chunks; pad_to_divisor({chunks}) first")
        size = n // chunks
        return [self.index(slice(i * size, (i + 1) * size)) for i in range(chunks)]

    def chunks_of(self, size: int) -> list["Batch"]:
        """Contiguous pieces of at most `size` rows (the last may be shorter)."""
        return [self.index(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def concat(batches: Sequence["Batch"]) -> "Batch":
        batches = [b for b in batches if b is not None]
        if not batches:
            return Batch()
        first = batches[0]
        tensors = {k: torch.cat([b.tensors[k] for b in batches]) for k in first.tensors}
        non = {k: np.concatenate([b.non_tensors[k] for b in batches]) for k in first.non_tensors}
        meta = {}
        for b in batches:
            meta.update(b.meta)
        return Batch(tensors, non, meta)

    def repeat(self, n: int, interleave: bool = True) -> "Batch":
        """interleave: a a b b (each row n times in place); else a b a b."""
        if interleave:
            t = {k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()}
            nt = {k: np.repeat(v, n, axis=0) for k, v in self.non_tensors.items()}
        else:
            t = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.tensors.items()}
            nt = {k: np.concatenate([v] * n) for k, v in self.non_tensors.items()}
        return Batch(t, nt, dict(self.meta))

    def pad_to_divisor(self, divisor: int) -> tuple["Batch", int]:
        """Append copies of the first rows so len % divisor == 0. Returns (batch, pad_count)."""
        n = len(self)
        pad = (-n) % divisor
        if pad == 0 or n == 0:
            return self, 0
        idx = [i % n for i in range(pad)]
        return Batch.concat([self, self.index(idx)]), pad

    def unpad(self, pad: int) -> "Batch":
        return self if pad == 0 else self.index(slice(0, len(self) - pad))


def _as_object_array(v) -> np.ndarray:
    if isinstance(v, np.ndarray) and v.dtype == object:
        return v
    arr = np.empty(len(v), dtype=object)
    for i, x in enumerate(v):
        arr[i] = x
    return arr
