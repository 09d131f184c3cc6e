"""Sequence layout shared by the workers.

Every row is `[prompt, left-padded to a fixed width | response, right-padded to a fixed
width]`. Fixed widths let batches from different ranks concatenate; `trim` cuts the columns
that are padding in every row of a micro-batch before the forward pass, so short batches
cost what they contain, and `pad_right` restores the fixed width of per-token outputs.

Two masks over the response columns, which differ for multi-turn rollouts:
- `attention_mask[:, P:]`: every real token of the trajectory (model turns AND the tool
  results / template tokens the agent loop inserted). The model sees all of them.
- `response_mask`: the loss mask: only tokens the policy sampled (may have holes where the
  loop inserted context; rollout correction may also zero tokens). Losses, advantages and
  metrics of "generated tokens" use it; the sequence extent never does.
"""

from __future__ import annotations

import torch

from verlcli.data.batch import Batch


def build_rows(prompt_ids: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
               pad_id: int, prompt_width: int, response_width: int,
               loss_masks: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Tensors for generated rows: prompts, responses, masks, position ids, rollout log-probs.

    `loss_masks` (multi-turn): per response token, 1 where the policy sampled it, 0 where the
    agent loop inserted it (tool results, template tokens); None = every token was sampled."""
    B = len(prompt_ids)
    prompts = torch.full((B, prompt_width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, prompt_width), dtype=torch.long)
    resp = torch.full((B, response_width), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((B, response_width), dtype=torch.long)
    rollout_lp = torch.zeros((B, response_width), dtype=torch.float32)
    extent = torch.zeros((B, response_width), dtype=torch.long)  # every real response token
    for i, (p, r, lp) in enumerate(zip(prompt_ids, responses, logprobs)):
        p = p[-prompt_width:]
        r = r[:response_width]
        if p:
            prompts[i, prompt_width - len(p):] = torch.tensor(p)
            prompt_mask[i, prompt_width - len(p):] = 1
        if r:
            resp[i, : len(r)] = torch.tensor(r)
            extent[i, : len(r)] = 1
            resp_mask[i, : len(r)] = 1 if loss_masks is None else torch.tensor(loss_masks[i][: len(r)])
            # Inserted tokens carry log-prob 0: no sampling distribution stands behind them.
            rollout_lp[i, : len(r)] = torch.tensor(lp[: len(r)], dtype=torch.float32) * resp_mask[i, : len(r)]
    attention_mask = torch.cat([prompt_mask, extent], dim=1)
    return {
        "prompts": prompts,
        "responses": resp,
        "response_mask": resp_mask,
        "input_ids": torch.cat([prompts, resp], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask),
        "rollout_log_probs": rollout_lp,
    }


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def trim(micro: Batch) -> tuple[dict[str, torch.Tensor], int]:
    """Model inputs of a micro-batch without all-padding columns. Returns (inputs, R')."""
    am = micro["attention_mask"]
    R = micro["responses"].shape[1]
    P = am.shape[1] - R
    prompt_valid = am[:, :P].any(dim=0).nonzero()
    left = int(prompt_valid[0]) if len(prompt_valid) else P - 1
    resp_valid = am[:, P:].any(dim=0).nonzero()  # extent: all real tokens, not the loss mask
    r_keep = int(resp_valid[-1]) + 1 if len(resp_valid) else 1
    end = P + r_keep
    inputs = {k: micro[k][:, left:end] for k in ("input_ids", "attention_mask", "position_ids")}
    return inputs, r_keep


def pad_right(x: torch.Tensor, width: int, value: float = 0.0) -> torch.Tensor:
    if x.shape[1] >= width:
        return x[:, :width]
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def cut(x: torch.Tensor, r_keep: int) -> torch.Tensor:
    """A fixed-width per-response-token tensor cut to the trimmed width."""
    return x[:, :r_keep]
