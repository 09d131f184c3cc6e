"""Policy losses, selected by `actor.policy_loss`.

One signature for all:

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
       cfg: PolicyLossConfig | None = None, global_tokens=None, global_seqs=None,
       rollout_log_prob=None, rollout_is_weights=None) -> (loss scalar, metrics)

All tensors are `[B, T]`; `log_prob` carries the gradient, the rest are constants.
`global_tokens` / `global_seqs` go to `agg_loss` (see aggregation.py: with them, the
micro-batch losses SUM to the mini-batch loss). Metrics, Python floats, local means over
the valid tokens of this micro-batch:

- `ppo_kl`: approximate KL(old ‖ new) = mean(old_log_prob − log_prob) (k1, as verl).
- `pg_clipfrac`: fraction of tokens where the clipped term was the one used
  (`vanilla`: ratio above 1+ε_high with A > 0 *or* below 1−ε_low with A < 0 — verl's
  definition; per-loss meaning in each docstring).
- `pg_clipfrac_lower`: fraction of tokens hit by the dual clip (A < 0 and the loss capped
  at −A·c); 0 for losses without a lower clip.

Numerical safety: the log importance ratio log π − log π_old is clamped to [−20, 20]
before `exp`, so extreme log-probs give finite losses (gradients through clamped entries
are 0). With `rollout_log_prob` and `cfg.tis_imp_ratio_cap > 0`, each token's loss is
multiplied by the truncated importance weight min(π_old / π_rollout, cap) — the
correction for a rollout engine whose log-probs differ from the trainer's (verl's TIS).
`rollout_is_weights` (`[B, T]`, detached, from verlcli.algorithms.rollout_correction)
multiply each token's loss the same way — verl's rollout correction (`geo_mean` folds them
into one weight per sequence, their geometric mean).

`clip_ratio_low` may exceed 1: the lower bound 1 − ε_low is then ≤ 0 and never binds, which is
how the CISPO paper switches that side off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verlcli.algorithms.aggregation import agg_loss, masked_mean, masked_sum
from verlcli.algorithms.catalog import POLICY_LOSSES
from verlcli.errors import UserError

LOG_RATIO_CLAMP = 20.0


@dataclass
class PolicyLossConfig:
    """Knobs of the policy losses (defaults as verl's)."""

    clip_ratio_low: float = 0.2  # ε_low: ratio clipped below at 1 − ε_low
    clip_ratio_high: float = 0.2  # ε_high: above at 1 + ε_high (DAPO clip-higher: 0.28)
    clip_ratio_c: float = 3.0  # dual-clip bound for negative advantages; must be > 1
    clip_cov_ratio: float = 0.0002  # clip_cov: fraction of tokens whose gradient is cut
    clip_cov_lb: float = 1.0  # clip_cov: covariance window for candidates
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002  # kl_cov: fraction of tokens given the KL penalty
    ppo_kl_coef: float = 0.1  # kl_cov: weight of |log ratio| on those tokens
    tau_pos: float = 1.0  # sapo: gate temperature for positive advantages
    tau_neg: float = 1.05  # sapo: for the others
    tis_imp_ratio_cap: float = 0.0  # truncated IS against rollout log-probs; 0 = off
    loss_scale_factor: int | None = None  # L of seq-mean-token-sum-norm (max response len)
    # bypass_mode (old log-probs = the rollout's): the loss and its rollout correction
    bypass_loss_type: str = "ppo_clip"  # ppo_clip or reinforce
    rollout_is: str | None = None  # token, sequence or None
    rollout_is_threshold: float = 2.0
    rollout_is_batch_normalize: bool = False
    rollout_rs: str | None = None
    rollout_rs_threshold: str | float | None = None

    def __post_init__(self):
        if self.clip_ratio_c <= 1.0:
            raise UserError(
                f"actor.clip_ratio_c is {self.clip_ratio_c}; the dual-clip bound must be > 1",
                fix="set actor.clip_ratio_c=3.0 (the usual value)",
            )
        for key in ("clip_ratio_low", "clip_ratio_high"):
            value = getattr(self, key)
            if value < 0.0:  # above 1 is fine for the low side: no lower bound (CISPO)
                raise UserError(
                    f"actor.{key} is {value}; it must be >= 0",
                    fix=f"set actor.{key}=0.2 (0.28 for clip_ratio_high gives DAPO clip-higher)",
                )
        if self.bypass_loss_type not in ("ppo_clip", "reinforce"):
            raise UserError(
                f"algorithm.rollout_correction.loss_type is {self.bypass_loss_type!r}",
                fix="set algorithm.rollout_correction.loss_type to ppo_clip or reinforce",
            )


# ---------------------------------------------------------------- shared pieces


def _log_ratio(log_prob, old_log_prob):
    return (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _frac(condition: torch.Tensor, mask: torch.Tensor) -> float:
    return float(masked_mean(condition.float(), mask))


def _finish(pg_losses, mask, loss_agg_mode, cfg, global_tokens, global_seqs, old_log_prob,
            rollout_log_prob, log_ratio, clipfrac=0.0, clipfrac_lower=0.0, rollout_is_weights=None):
    """Truncated IS, rollout-correction weights, aggregation and the metrics every loss
    reports."""
    if rollout_log_prob is not None and cfg.tis_imp_ratio_cap > 0:
        behaviour = (old_log_prob - rollout_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        pg_losses = pg_losses * behaviour.exp().clamp(max=cfg.tis_imp_ratio_cap).detach()
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights.detach()
    loss = agg_loss(pg_losses, mask, loss_agg_mode, global_tokens, global_seqs,
                    loss_scale_factor=cfg.loss_scale_factor)
    metrics = {
        "pg_clipfrac": float(clipfrac),
        "pg_clipfrac_lower": float(clipfrac_lower),
        "ppo_kl": float(masked_mean(-log_ratio.detach(), mask)),
    }
    return loss, metrics


def _clipped_surrogate(advantages, ratio, cfg):
    """(unclipped term, clipped term, elementwise max) of the PPO surrogate, as losses."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    return unclipped, clipped, torch.maximum(unclipped, clipped)


# ---------------------------------------------------------------- losses


@POLICY_LOSSES.register("vanilla")
def vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
            cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
            rollout_is_weights=None):
    """PPO clipped surrogate with separate bounds and dual clip.

    r = exp(log π − log π_old); per token
        L = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high))          (PPO; ε_high > ε_low is
                                                                DAPO's clip-higher)
        L = min(L, −A·c)  where A < 0                          (dual clip, c = clip_ratio_c)
    The dual clip bounds the loss of a negative-advantage token whose ratio has exploded.
    """
    cfg = cfg or PolicyLossConfig()
    mask = response_mask.bool()
    log_ratio = _log_ratio(log_prob, old_log_prob)
    unclipped, clipped, pg = _clipped_surrogate(advantages, log_ratio.exp(), cfg)
    dual = -advantages * cfg.clip_ratio_c
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(pg, dual), pg)
    return _finish(
        pg_losses, mask, loss_agg_mode, cfg, global_tokens, global_seqs, old_log_prob,
        rollout_log_prob, log_ratio,
        clipfrac=_frac(clipped > unclipped, mask),
        clipfrac_lower=_frac((pg > dual) & negative, mask),
        rollout_is_weights=rollout_is_weights,
    )


@POLICY_LOSSES.register("gspo")
def gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
         cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
            rollout_is_weights=None):
    """GSPO: one importance ratio per sequence, the geometric mean of its token ratios,
    s_i = exp(mean_t(log π − log π_old)), used as s_i·π/sg(π) per token so that the
    gradient flows through every token. Clipped like PPO (no dual clip).

    Always aggregated with `seq-mean-token-mean`, whatever `loss_agg_mode` says (as in
    verl: the objective is defined per sequence) — so pass `global_seqs` for split
    invariance. The log ratio is clamped to [−20, 20] like every loss here (verl's GSPO
    clamps only above, at 10; the clipped loss is the same in all non-overflow cases).
    `pg_clipfrac`: tokens where the clipped term was used; `pg_clipfrac_lower` = 0.
    """
    cfg = cfg or PolicyLossConfig()
    mask = response_mask.bool()
    log_ratio = log_prob - old_log_prob
    lengths = mask.sum(dim=-1).clamp(min=1)
    seq_log_ratio = masked_sum(log_ratio, mask, dim=-1) / lengths
    token_log_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    unclipped, clipped, pg_losses = _clipped_surrogate(advantages, ratio, cfg)
    return _finish(
        pg_losses, mask, "seq-mean-token-mean", cfg, global_tokens, global_seqs, old_log_prob,
        rollout_log_prob, _log_ratio(log_prob, old_log_prob),
        clipfrac=_frac(clipped > unclipped, mask),
        rollout_is_weights=rollout_is_weights,
    )


@POLICY_LOSSES.register("cispo")
def cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
          cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
            rollout_is_weights=None):
    """CISPO (MiniMax-M1): L = −sg(clip(r, 1−ε_low, 1+ε_high))·A·log π. The importance
    weight is clipped and detached instead of the update, so no token loses its
    gradient. `pg_clipfrac`: tokens whose weight was clipped on either side (verl);
    `pg_clipfrac_lower` = 0. The paper sets ε_low large (no lower bound: any
    actor.clip_ratio_low >= 1 does that here) and tunes ε_high."""
    cfg = cfg or PolicyLossConfig()
    mask = response_mask.bool()
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    weight = ratio.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high).detach()
    pg_losses = -weight * advantages * log_prob
    return _finish(
        pg_losses, mask, loss_agg_mode, cfg, global_tokens, global_seqs, old_log_prob,
        rollout_log_prob, log_ratio, clipfrac=_frac(weight != ratio.detach(), mask),
        rollout_is_weights=rollout_is_weights,
    )


@POLICY_LOSSES.register("gpg")
def gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
        cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
            rollout_is_weights=None):
    """GPG: plain policy gradient L = −A·log π, no ratio, no clipping (pair it with the
    `gpg` advantage estimator). Both clip fractions are 0."""
    cfg = cfg or PolicyLossConfig()
    mask = response_mask.bool()
    return _finish(
        -advantages * log_prob, mask, loss_agg_mode, cfg, global_tokens, global_seqs,
        old_log_prob, rollout_log_prob, _log_ratio(log_prob, old_log_prob),
        rollout_is_weights=rollout_is_weights,
    )


def _centered_product(advantages, log_prob, mask):
    """(A − mean A)·(log π − mean log π) over valid tokens: each token's contribution to
    the covariance that drives entropy collapse (Cui et al., 2025)."""
    adv = advantages.detach()
    lp = log_prob.detach()
    return (adv - masked_mean(adv, mask)) * (lp - masked_mean(lp, mask))


@POLICY_LOSSES.register("clip_cov")
def clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
             cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
            rollout_is_weights=None):
    """Clip-Cov: the PPO clipped loss (no dual clip), except that up to
    max(1, ⌊clip_cov_ratio · #valid⌋) tokens, drawn at random (global torch RNG, as verl)
    among the valid tokens not already clipped by PPO whose covariance term lies strictly
    between clip_cov_lb and clip_cov_ub, get their loss (and gradient) set to 0.
    `pg_clipfrac`: fraction of tokens cut that way; `pg_clipfrac_lower` = 0."""
    cfg = cfg or PolicyLossConfig()
    mask = response_mask.bool()
    log_ratio = _log_ratio(log_prob, old_log_prob)
    unclipped, clipped, pg = _clipped_surrogate(advantages, log_ratio.exp(), cfg)
    cov = _centered_product(advantages, log_prob, mask)
    candidates = mask & ~(clipped > unclipped) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    flat = candidates.flatten().nonzero().squeeze(-1)
    n_cut = max(int(cfg.clip_cov_ratio * int(mask.sum())), 1)
    chosen = flat[torch.randperm(flat.numel(), device=flat.device)[:n_cut]]
    keep = torch.ones(mask.numel(), dtype=pg.dtype, device=pg.device)
    keep[chosen] = 0
    keep = keep.view_as(pg)
    return _finish(
        pg * keep, mask, loss_agg_mode, cfg, global_tokens, global_seqs, old_log_prob,
        rollout_log_prob, log_ratio, clipfrac=_frac(keep == 0, mask),
        rollout_is_weights=rollout_is_weights,
    )


@POLICY_LOSSES.register("kl_cov")
def kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
           cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
            rollout_is_weights=None):
    """KL-Cov: the UNCLIPPED surrogate −A·r, plus ppo_kl_coef·|log r| on the
    max(1, ⌊kl_cov_ratio · #valid⌋) valid tokens with the largest covariance term.
    `pg_clipfrac` reports the fraction of tokens given the penalty (verl reports 0 and
    puts mean |log r| in its ppo_kl; here ppo_kl keeps its usual meaning)."""
    cfg = cfg or PolicyLossConfig()
    mask = response_mask.bool()
    log_ratio = _log_ratio(log_prob, old_log_prob)
    pg = -advantages * log_ratio.exp()
    cov = _centered_product(advantages, log_prob, mask).flatten()
    valid = mask.flatten().nonzero().squeeze(-1)
    penalised = torch.zeros(mask.numel(), dtype=torch.bool, device=pg.device)
    if valid.numel() > 0:
        k = max(1, int(valid.numel() * cfg.kl_cov_ratio))
        penalised[valid[cov[valid].topk(k).indices]] = True
    penalised = penalised.view_as(mask)
    pg_losses = torch.where(penalised, pg + cfg.ppo_kl_coef * log_ratio.abs(), pg)
    return _finish(
        pg_losses, mask, loss_agg_mode, cfg, global_tokens, global_seqs, old_log_prob,
        rollout_log_prob, log_ratio, clipfrac=_frac(penalised, mask),
        rollout_is_weights=rollout_is_weights,
    )


@POLICY_LOSSES.register("sapo")
def sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
         cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
         rollout_is_weights=None):
    """SAPO (soft adaptive policy optimization, arXiv 2511.20347): a smooth gate replaces
    the hard clip, L = −f(r)·A with f(r) = σ(τ·(r − 1))·4/τ, τ = tau_pos where A > 0 and
    tau_neg elsewhere (verl defaults 1.0 and 1.05). f(1) = 2/τ and f'(1) = 1, so near the
    old policy the gradient equals PPO's; far from it the gate saturates and the gradient
    fades instead of being cut. Always aggregated `seq-mean-token-mean` (verl), whatever
    `loss_agg_mode` says. Both clip fractions are 0."""
    cfg = cfg or PolicyLossConfig()
    mask = response_mask.bool()
    log_ratio = _log_ratio(log_prob, old_log_prob)
    tau = torch.where(advantages > 0, torch.full_like(advantages, cfg.tau_pos),
                      torch.full_like(advantages, cfg.tau_neg))
    gates = torch.sigmoid(tau * (log_ratio.exp() - 1.0)) * (4.0 / tau)
    return _finish(
        -gates * advantages, mask, "seq-mean-token-mean", cfg, global_tokens, global_seqs,
        old_log_prob, rollout_log_prob, log_ratio, rollout_is_weights=rollout_is_weights,
    )


@POLICY_LOSSES.register("geo_mean")
def geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
             cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
             rollout_is_weights=None):
    """GMPO (geometric-mean policy optimization, arXiv 2507.20673), verl's `geo_mean`.

    Per token the log ratio x = log π − log π_old is clipped on the side that matters,
    sgn(A)·min(sgn(A)·x, sgn(A)·clip(x, −ε_low, ε_high)); the sequence ratio is the
    geometric mean exp(mean_t x_clipped) and the sequence advantage the mean of A over its
    tokens; L_i = −Ā_i·ratio_i. The loss is the mean over sequences: Σ_i L_i / global_seqs
    (verl takes `torch.mean` over the micro-batch rows, which equals this when the
    micro-batch is the mini-batch and no row is empty; here it is split-invariant).
    `loss_agg_mode` is not used. Rollout IS weights enter as their per-sequence geometric
    mean (verl). The mean log ratio is clamped to ±20 (verl leaves the clamp commented
    out). `pg_clipfrac`: tokens with A > 0 whose log ratio was clipped;
    `pg_clipfrac_lower`: the same with A < 0.
    """
    cfg = cfg or PolicyLossConfig()
    mask = response_mask.bool()
    fmask = mask.to(log_prob.dtype)
    x = log_prob - old_log_prob
    sign = torch.sign(advantages)
    x_clip = x.clamp(-cfg.clip_ratio_low, cfg.clip_ratio_high)
    x_min = sign * torch.minimum(sign * x, sign * x_clip)
    lengths = fmask.sum(-1)
    seq_log_ratio = (x_min * fmask).sum(-1) / (lengths + 1e-8)
    seq_adv = (advantages * fmask).sum(-1) / (lengths + 1e-8)
    losses = -seq_adv * seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    if rollout_is_weights is not None:
        log_w = (torch.log(rollout_is_weights.detach() + 1e-10) * fmask).sum(-1)
        losses = losses * (log_w / (lengths + 1e-8)).exp()
    seqs = global_seqs if global_seqs is not None else max(len(losses), 1)
    clipped = x != x_clip
    metrics = {
        "pg_clipfrac": _frac(clipped & (advantages > 0), mask),
        "pg_clipfrac_lower": _frac(clipped & (advantages < 0), mask),
        "ppo_kl": float(masked_mean(-x.detach(), mask)),
    }
    return losses.sum() / seqs, metrics


@POLICY_LOSSES.register("bypass_mode")
def bypass_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                cfg=None, global_tokens=None, global_seqs=None, rollout_log_prob=None,
                rollout_is_weights=None):
    """verl's bypass mode: the rollout engine's log-probs serve as the old policy (no
    separate old-log-prob pass), so `old_log_prob` here IS π_rollout. The IS weights and
    rejection mask of `cfg.rollout_is*` / `cfg.rollout_rs*` are computed in here from the
    CURRENT policy, w = min(π_θ / π_rollout, cap), detached (see rollout_correction.py).
    Then by `cfg.bypass_loss_type`:

    - `ppo_clip`: the `vanilla` loss with π_old = π_rollout. The weights are NOT applied —
      the PPO ratio already is π_θ / π_rollout (verl: applying them would double-count).
    - `reinforce`: L = −w·A·log π_θ (no ratio, no clip; w = 1 without `rollout_is`);
      `ppo_kl` = mean(log π_rollout − log π_θ); both clip fractions 0.

    Rejected tokens drop out of the loss (mask 0); the aggregation's global token count
    stays the one the trainer passed (as verl's). Metrics add `rollout_corr/*`. The
    `rollout_is_weights` argument is ignored (computed here).
    """
    from verlcli.algorithms.rollout_correction import rollout_correction

    cfg = cfg or PolicyLossConfig()
    weights, mask, rc_metrics = rollout_correction(
        log_prob, old_log_prob, response_mask, cfg.rollout_is, cfg.rollout_is_threshold,
        cfg.rollout_is_batch_normalize, cfg.rollout_rs, cfg.rollout_rs_threshold)
    if cfg.bypass_loss_type == "reinforce":
        bmask = mask.bool()
        pg = -advantages * log_prob
        loss = agg_loss(pg * weights if weights is not None else pg, bmask, loss_agg_mode,
                        global_tokens, global_seqs, loss_scale_factor=cfg.loss_scale_factor)
        metrics = {"pg_clipfrac": 0.0, "pg_clipfrac_lower": 0.0,
                   "ppo_kl": float(masked_mean((old_log_prob - log_prob).detach(), bmask))}
    else:
        loss, metrics = vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode, cfg,
                                global_tokens, global_seqs)
    return loss, {**metrics, **rc_metrics}
