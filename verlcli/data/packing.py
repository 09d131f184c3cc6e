"""SFT micro-batches: right-padded rows, or several samples packed into one row.

Both layouts give the model the same per-sample computation, so the loss is the same
(tests/unit/test_packing.py checks this in fp32):

- unpacked: one sample per row, right-padded; a 2D attention mask marks the real tokens.
- packed: samples are placed into rows of at most `capacity` tokens (first-fit decreasing);
  position ids restart at 0 for every sample, and no sample attends to another.

How packed rows are kept apart (transformers 5, checked on 5.19 with Qwen2):
- Position ids alone: with `attention_mask=None` AND `use_cache=False`, transformers builds the
  block-diagonal causal mask itself (`masking_utils.find_packed_sequence_indices` starts a new
  sample wherever the position does not go up by exactly 1); flash-attention uses the same
  position ids for its varlen path. Two traps: a 2D mask of ones turns the detection off, and so
  does a KV cache — a model's default `use_cache=True` creates an empty one — and then samples
  silently attend to each other.
- An explicit 4D mask `[rows, 1, L, L]` is used as given. It must be ADDITIVE (0 / most
  negative value), built in the compute dtype of the attention scores: sdpa also takes a bool
  mask, but eager adds a bool mask to the scores (silently wrong). `block_causal_mask` builds
  it; it is what `SFTWorker` passes, because the engine's forward takes a mask tensor. Same
  cost as the position-id path under sdpa (which materializes the same mask); only
  flash-attention's varlen path would avoid it, and it takes no 4D mask.
`build_micro_batch` leaves `attention_mask=None` for packed rows; the caller picks.

Targets are shifted per sample before packing: token t predicts token t+1 of the SAME
sample, and the last token of every sample predicts nothing. So no loss term ever crosses
a sample boundary, whatever the loss mask of the next sample says.
"""

from __future__ import annotations

from typing import Sequence

import torch


def shifted_targets(input_ids: Sequence[int], loss_mask: Sequence[int], pad_id: int) -> tuple[list[int], list[int]]:
    """Per position t: the token to predict (input_ids[t+1]) and whether it counts (loss_mask[t+1])."""
    targets = list(input_ids[1:]) + [pad_id]
    weights = [1 if m else 0 for m in loss_mask[1:]] + [0]
    return targets, weights


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of samples per row, first-fit decreasing; every row holds at most `capacity` tokens.

    Deterministic (ties keep input order), so every run and every resume packs the same way.
    """
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, over the row capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(r) for r in rows]  # input order inside a row: easier to read and debug


def build_micro_batch(samples: Sequence[dict], pad_id: int, packing: bool, capacity: int) -> dict:
    """Model inputs + targets for a list of {"input_ids", "loss_mask"} samples.

    Returns input_ids, position_ids, attention_mask (None when packed), targets and
    target_mask ([rows, width] tensors), and the counts `tokens` (real tokens) and `slots`
    (rows × width) for the padding-efficiency metric.
    """
    if not samples:
        raise ValueError("build_micro_batch needs at least one sample")
    lengths = [len(s["input_ids"]) for s in samples]
    rows = pack_rows(lengths, capacity) if packing else [[i] for i in range(len(samples))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    attn = torch.zeros(shape, dtype=torch.long)
    tgt = torch.full(shape, pad_id, dtype=torch.long)
    tmask = torch.zeros(shape, dtype=torch.float32)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = samples[i], lengths[i]
            targets, weights = shifted_targets(s["input_ids"], s["loss_mask"], pad_id)
            ids[r, at:at + n] = torch.as_tensor(list(s["input_ids"]), dtype=torch.long)
            pos[r, at:at + n] = torch.arange(n)
            attn[r, at:at + n] = 1
            tgt[r, at:at + n] = torch.as_tensor(targets, dtype=torch.long)
            tmask[r, at:at + n] = torch.as_tensor(weights, dtype=torch.float32)
            at += n
        # Padding gets its own positions from 0: a new "sample" to the packed-mask detection,
        # so real tokens never see it (they could not anyway: it comes after them).
        pos[r, at:] = torch.arange(width - at)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "attention_mask": None if packing else attn,
        "targets": tgt,
        "target_mask": tmask,
        "tokens": int(sum(lengths)),
        "slots": int(len(rows) * width),
    }


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] sample index inside each row: a new sample starts where position does not go up by 1."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, L, L] additive mask: 0 where the query may see the key (same sample, not later),
    else the most negative value of `dtype` (pass the compute dtype, e.g. bf16)."""
    seg = segment_ids(position_ids)
    L = seg.shape[1]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=seg.device))
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
