"""DAPO's data-side tricks (Yu et al., 2025, arXiv:2503.14476).

- Dynamic sampling: a prompt whose responses all got the same reward has zero
  group-relative advantage, so it only dilutes the batch; drop such groups (the trainer
  then samples more prompts until the batch is full).
- Soft overlong punishment: responses that run into the last `buffer_len` tokens before
  the length limit get a penalty growing linearly to −penalty_factor at the limit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from verlcli.errors import UserError


def dynamic_sampling_filter(scores: torch.Tensor, index: Sequence) -> tuple[torch.Tensor, int]:
    """Keep-mask `[B]` (bool) over responses and the number of groups dropped.

    A group (responses sharing an `index` id) is dropped when it has at least two
    responses and all their scores are exactly equal. A group of ONE response is kept,
    as in verl (it keeps prompts with std > 0 or a single sample): there is nothing to
    compare it with, so the filter does not judge it.
    """
    keys = index.tolist() if hasattr(index, "tolist") else list(index)
    if len(keys) != scores.shape[0]:
        raise ValueError(f"index has {len(keys)} entries but scores has {scores.shape[0]}")
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    keep = torch.ones(len(keys), dtype=torch.bool, device=scores.device)
    dropped = 0
    values = scores.detach().flatten().tolist()
    for rows in members.values():
        if len(rows) > 1 and len({values[i] for i in rows}) == 1:
            keep[rows] = False
            dropped += 1
    return keep, dropped


def overlong_reward_penalty(response_lengths, max_response_len: int, buffer_len: int,
                            penalty_factor: float = 1.0) -> torch.Tensor:
    """Per-response reward to ADD to the score, `[B]`, ≤ 0.

    With L_exp = max_response_len − buffer_len and length |y|:
        penalty = min(0, −(|y| − L_exp) / buffer_len · penalty_factor)
    i.e. 0 up to L_exp, then linear down to −penalty_factor at |y| = max_response_len
    (the length limit itself, where the response was truncated). Same as verl's DAPO
    reward manager.
    """
    if not 0 < buffer_len <= max_response_len:
        raise UserError(
            f"overlong buffer length {buffer_len} must be > 0 and <= the max response "
            f"length {max_response_len}",
            fix="set the overlong buffer length to a fraction of rollout max response length, e.g. 1/4",
        )
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    expected = max_response_len - buffer_len
    return torch.clamp(-(lengths - expected) / buffer_len * penalty_factor, max=0.0)
