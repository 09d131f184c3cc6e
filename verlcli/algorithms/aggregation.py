"""Masked reductions and loss aggregation.

Every loss in this package is first a `[B, T]` matrix of per-token terms; `agg_loss` turns
it into the scalar that is back-propagated. What the scalar normalizes by is a real
algorithmic choice (it decides how much a long response weighs against a short one), so
each mode is written down here and pinned by tests.

Split invariance. A mini-batch is cut into micro-batches (gradient accumulation) and
spread over data-parallel ranks. If every micro-batch normalized by its *own* token count,
the result would depend on how the batch was cut (a micro-batch of 3 tokens and one of 300
would weigh the same). So the trainer counts, once per mini-batch, the valid tokens
(`global_tokens`) and non-empty sequences (`global_seqs`) over all micro-batches and all
ranks (`count_tokens_and_seqs` + an all-reduce), passes them in, and the micro-batch
losses then simply *add up* to the mini-batch mean. The engine must therefore SUM
gradients over micro-batches (plain accumulation) and over ranks (FSDP averages over
ranks, so it multiplies the loss by the data-parallel world size, as verl's `dp_size`
factor does).
"""

from __future__ import annotations

import torch

from verlcli.errors import UserError

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of `values` where `mask` is set. Uses `where`, not `values * mask`, so a NaN or
    inf sitting in a padded position cannot leak into the result."""
    zeros = torch.zeros((), dtype=values.dtype, device=values.device)
    picked = torch.where(mask.bool(), values, zeros)
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over valid entries. An all-masked input gives 0, not NaN (verl divides by zero
    there; a micro-batch made only of padding rows must not poison the metrics)."""
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the valid entries of the whole tensor.

    Same as verl's `masked_whiten`: mean over valid entries, variance with Bessel's
    correction (unbiased, n − 1), `eps = 1e-8` added to the variance inside the square
    root, mean not shifted back. Where verl raises (fewer than 2 valid entries) this
    returns zeros: with one sample there is no spread to normalize by, and "no signal"
    is the honest advantage. Masked positions are returned as 0.
    """
    m = mask.bool()
    n = m.sum()
    if n < 2:
        return torch.zeros_like(values)
    mean = masked_sum(values, m) / n
    centered = torch.where(m, values - mean, torch.zeros_like(values))
    var = (centered**2).sum() / (n - 1)
    return centered * torch.rsqrt(var + eps)


def count_tokens_and_seqs(mask: torch.Tensor) -> tuple[int, int]:
    """(valid tokens, sequences with at least one valid token) of a `[B, T]` mask — the
    two numbers the trainer sums over micro-batches and ranks to get `global_tokens` and
    `global_seqs`."""
    m = mask.bool()
    return int(m.sum()), int(m.any(dim=-1).sum())


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    global_tokens: int | None = None,
    global_seqs: int | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """Aggregate a `[B, T]` loss matrix into a scalar.

    Modes (S_i = Σ_t loss[i,t]·mask[i,t], n_i = Σ_t mask[i,t]; "sequences" are the rows
    with n_i > 0 — all-padding rows added to make the batch divisible do not count):

    - `token-mean`: Σ_i S_i / N_tokens. Every token weighs the same (verl's default).
    - `seq-mean-token-sum`: Σ_i S_i / N_seqs. Every sequence's *sum* weighs the same.
    - `seq-mean-token-mean`: Σ_i (S_i / n_i) / N_seqs. Every sequence weighs the same.
    - `seq-mean-token-sum-norm`: Σ_i (S_i / L) / N_seqs with a constant L
      (`loss_scale_factor`, default the padded width T) — Dr. GRPO's length-unbiased
      form. This follows current verl (mean over sequences of S_i / L); older verl
      returned Σ_i S_i / T without dividing by the number of sequences, which made the
      scale depend on the micro-batch size. Pass the rollout's max response length as
      `loss_scale_factor` so L is the same in every micro-batch; T varies with padding.

    N_tokens is `global_tokens` and N_seqs is `global_seqs` when given (the counts of the
    whole mini-batch over all micro-batches and ranks — see the module docstring: the
    micro-batch results then SUM to the mini-batch value); otherwise the local counts,
    clamped to at least 1 so an all-padding micro-batch gives 0 instead of NaN.
    """
    mask = loss_mask.bool()
    if loss_agg_mode == "token-mean":
        return masked_sum(loss_mat, mask) / _denominator(global_tokens, mask.sum())
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise UserError(
            f"unknown loss aggregation mode {loss_agg_mode!r} for actor.loss_agg_mode",
            fix=f"use one of: {', '.join(LOSS_AGG_MODES)}",
        )
    seq_sums = masked_sum(loss_mat, mask, dim=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_terms = seq_sums / mask.sum(dim=-1).clamp(min=1).to(seq_sums.dtype)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        scale = loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1]
        seq_terms = seq_sums / scale
    else:  # seq-mean-token-sum
        seq_terms = seq_sums
    return seq_terms.sum() / _denominator(global_seqs, mask.any(dim=-1).sum())


def _denominator(global_count: int | None, local_count: torch.Tensor):
    # The local count stays a tensor: turning it into a Python int would force a
    # device sync on every micro-batch.
    if global_count is not None:
        return max(int(global_count), 1)
    return local_count.clamp(min=1)
