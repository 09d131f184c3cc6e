"""Rollout correction: importance weights and outlier masks for the gap between the rollout
engine's log-probs (vLLM, often bf16) and the trainer's, as verl's `rollout_corr_helper`.

log ρ = log π_train − log π_rollout per token. Everything here is detached (weights change
the measure, not the objective) and log ratios are clamped to [−20, 20] before `exp`.

- IS weights (`rollout_is`): "token": ρ_t; "sequence": Π_t ρ_t = exp(Σ log ρ_t), the same
  for every token of the response. Truncated above at `threshold` (TIS), 0 on padding.
  `batch_normalize` divides by their mean (over tokens, or over sequences for "sequence")
  after truncation, so they average 1.
- Rejection (`rollout_rs`, comma-separated; a token survives only if every option passes),
  with k1 = −log ρ, k2 = ½(log ρ)², k3 = ρ − 1 − log ρ per token:
  `token_k1|k2|k3`: per token; `seq_sum_k*`, `seq_mean_k*`: sum / mean over the response;
  `seq_max_k2|k3`: the response's largest token value. The threshold spec is one value for
  all options or one per option (comma-separated). k1 options take "lower_upper" as bounds
  on the ratio ρ (or on exp(−stat) for the sequence forms): kept when lower ≤ ρ ≤ upper,
  i.e. −log(upper) ≤ k1 ≤ −log(lower); a single value u means [1/u, u]. verl compared k1
  with [log(lower), log(upper)], which inverts non-reciprocal bounds (verl-project/verl
  PR #6377 fixes it); here the bounds mean what they say. The other options take one upper
  bound (kept when value ≤ u). A rejected token gets mask 0.
- Metrics (prefix `rollout_corr/`): weight mean/max/min/std, fraction above the cap and
  below 1/cap (measured before truncation), effective sample size; masked fractions; and the
  gap itself: kl = mean(log π_rollout − log π_train), k3_kl, chi2_token = E[ρ²] − 1,
  chi2_seq = E[(Πρ)²] − 1, per-sequence perplexities.
"""

from __future__ import annotations

import math

import torch

from verlcli.algorithms.aggregation import masked_mean
from verlcli.algorithms.catalog import check_rejection
from verlcli.errors import UserError

BOUND = 20.0
IS_LEVELS = ("token", "sequence")


def _seq_sum(x, mask):
    return (x * mask).sum(-1)


def _fraction(cond, mask, level) -> float:
    if level == "token":
        return float(masked_mean(cond.float(), mask))
    seqs = mask.sum(-1) > 0
    return float(cond[:, 0][seqs].float().mean())


def is_weights(log_ratio, mask, level="token", threshold=2.0, batch_normalize=False):
    """(truncated IS weights [B, T], metrics) — see the module docstring."""
    if level not in IS_LEVELS:
        raise UserError(f"unknown rollout_is level {level!r}",
                        fix="set algorithm.rollout_correction.rollout_is to token or sequence (or null)")
    mask = mask.float()
    log_ratio = log_ratio.detach().float()
    if level == "token":
        log_w = log_ratio.clamp(-BOUND, BOUND)
    else:
        log_w = _seq_sum(log_ratio, mask).clamp(-BOUND, BOUND).unsqueeze(-1).expand_as(log_ratio)
    raw = log_w.exp() * mask
    w = raw.clamp(max=threshold)
    valid = mask.bool()
    if not valid.any():  # nothing to weigh (an all-empty micro-batch)
        return w.detach(), {}
    clamped = w.clamp(min=1.0 / threshold)  # verl's std and ESS use weights clamped both sides
    mean_clamped = masked_mean(clamped, mask)
    metrics = {
        "rollout_is_mean": float(masked_mean(w, mask)),
        "rollout_is_max": float(raw[valid].max()),
        "rollout_is_min": float(raw[valid].min()),
        # over tokens, or over responses for "sequence" (verl)
        "rollout_is_ratio_fraction_high": _fraction(log_w > math.log(threshold), mask, level),
        "rollout_is_ratio_fraction_low": _fraction(log_w < -math.log(threshold), mask, level),
        "rollout_is_std": float((masked_mean(clamped ** 2, mask) - mean_clamped ** 2).clamp(min=0).sqrt()),
        "rollout_is_eff_sample_size": float(1.0 / masked_mean((clamped / (mean_clamped + 1e-8)) ** 2, mask)),
    }
    if batch_normalize:
        if level == "token":
            mean = masked_mean(w, mask)
        else:
            seqs = mask.sum(-1) > 0
            mean = (_seq_sum(w, mask) / mask.sum(-1).clamp(min=1))[seqs].mean()
        factor = float(mean) if float(mean) > 1e-8 else 1.0
        w = w / factor
        metrics["rollout_is_batch_norm_factor"] = factor
    return w.detach(), metrics


def rejection_mask(log_ratio, mask, options: str, threshold):
    """(mask with rejected tokens set to 0, metrics) — see the module docstring."""
    names, limits = check_rejection(options, threshold)
    fmask = mask.float()
    valid = fmask.bool()
    lr = log_ratio.detach().float().clamp(-BOUND, BOUND)
    per_token = {"k1": -lr, "k2": 0.5 * lr ** 2, "k3": lr.exp() - 1 - lr}
    keep = torch.ones_like(fmask, dtype=torch.bool)
    metrics = {}
    for name in names:
        kind, k = name.rsplit("_", 1)
        stat = per_token[k]
        if kind == "seq_sum":
            stat = _seq_sum(stat, fmask).unsqueeze(-1).expand_as(lr)
        elif kind == "seq_mean":
            stat = (_seq_sum(stat, fmask) / fmask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(lr)
        elif kind == "seq_max":
            top = stat.masked_fill(~valid, float("-inf")).max(-1).values
            stat = torch.where(torch.isinf(top), torch.zeros_like(top), top).unsqueeze(-1).expand_as(lr)
        low, high = limits[name]
        if low is None:
            ok = stat <= high
        else:  # k1 = -log ρ: ρ in [low, high] <=> k1 in [-log high, -log low]
            ok = (stat >= -math.log(high)) & (stat <= -math.log(low))
        keep &= ok
        metrics[f"rollout_rs_{name}_mean"] = float(masked_mean(stat, fmask))
        metrics[f"rollout_rs_{name}_masked_fraction"] = float(masked_mean((~ok).float(), fmask))
    metrics["rollout_rs_masked_fraction"] = float(masked_mean((~keep).float(), fmask))
    seqs = valid.any(-1)
    hit = (~keep & valid).any(-1)[seqs].float()
    metrics["rollout_rs_seq_masked_fraction"] = float(hit.mean()) if seqs.any() else 0.0
    return (fmask * keep).to(mask.dtype), metrics


def offpolicy_metrics(log_prob, rollout_log_prob, mask) -> dict[str, float]:
    """How far the trainer's log-probs are from the rollout engine's (verl's names)."""
    fmask = mask.float()
    if not fmask.bool().any():
        return {}
    lp, rlp = log_prob.detach().float(), rollout_log_prob.detach().float()
    lengths = fmask.sum(-1).clamp(min=1)
    seqs = fmask.sum(-1) > 0
    mean_lp, mean_rlp = _seq_sum(lp, fmask) / lengths, _seq_sum(rlp, fmask) / lengths
    log_ratio = (lp - rlp).clamp(-BOUND, BOUND)  # verl leaves k3's exp unclamped (inf on outliers)
    return {
        "kl": float(masked_mean(rlp - lp, fmask)),
        "k3_kl": float(masked_mean(log_ratio.exp() - log_ratio - 1, fmask)),
        "training_ppl": float((-mean_lp[seqs]).exp().mean()),
        "rollout_ppl": float((-mean_rlp[seqs]).exp().mean()),
        "log_ppl_diff": float((mean_rlp - mean_lp)[seqs].mean()),
        "chi2_token": float(masked_mean((2 * log_ratio).exp(), fmask) - 1),
        "chi2_seq": float((2 * _seq_sum(lp - rlp, fmask)[seqs].clamp(-BOUND, BOUND)).exp().mean() - 1),
    }


def rollout_correction(log_prob, rollout_log_prob, mask, rollout_is=None, threshold=2.0,
                       batch_normalize=False, rollout_rs=None, rs_threshold=None):
    """(IS weights or None, mask after rejection, metrics prefixed `rollout_corr/`).
    `log_prob`: the training policy's (old) log-probs; `rollout_log_prob`: the engine's."""
    log_ratio = log_prob.detach().float() - rollout_log_prob.detach().float()
    metrics = offpolicy_metrics(log_prob, rollout_log_prob, mask)  # on the mask before rejection
    weights = None
    if rollout_is is not None:
        weights, m = is_weights(log_ratio, mask, rollout_is, threshold, batch_normalize)
        metrics.update(m)
    if rollout_rs is not None:
        mask, m = rejection_mask(log_ratio, mask, rollout_rs, rs_threshold)
        metrics.update(m)
    return weights, mask, {f"rollout_corr/{k}": v for k, v in metrics.items()}
