"""The critic's loss: clipped value regression, as in PPO / verl."""

from __future__ import annotations

import torch

from verlcli.algorithms.aggregation import agg_loss, masked_mean


def value_loss(vpreds: torch.Tensor, values: torch.Tensor, returns: torch.Tensor,
               response_mask: torch.Tensor, cliprange_value: float | None,
               loss_agg_mode: str = "token-mean", global_tokens: int | None = None,
               global_seqs: int | None = None, loss_scale_factor: int | None = None,
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 · agg(max((V − R)², (V_clip − R)²)) with V_clip = clip(V, V_old − c, V_old + c).

    `vpreds` V: the critic's new predictions (with gradient); `values` V_old: its
    predictions at rollout time; `returns` R: the targets (GAE returns). Taking the max is
    pessimistic: the clip only ever increases the loss, so the critic cannot move far
    from V_old in one update by exploiting the clip. `cliprange_value=None` disables the
    clip. The 0.5 is outside the aggregation, as in verl. `loss_scale_factor` is the
    constant divisor of `seq-mean-token-sum-norm` (the configured max response length): without
    it that mode divides by the micro-batch's width, and the loss depends on the split.

    Metrics: `vf_clipfrac`, the fraction of valid tokens where the clipped term was
    strictly larger (the clip bound the update).
    """
    if cliprange_value is None:
        clipped_pred = vpreds
    else:
        clipped_pred = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    unclipped_loss = (vpreds - returns) ** 2
    clipped_loss = (clipped_pred - returns) ** 2
    per_token = torch.maximum(unclipped_loss, clipped_loss)
    loss = 0.5 * agg_loss(per_token, response_mask, loss_agg_mode, global_tokens, global_seqs,
                          loss_scale_factor=loss_scale_factor)
    clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), response_mask)
    return loss, {"vf_clipfrac": float(clipfrac)}
