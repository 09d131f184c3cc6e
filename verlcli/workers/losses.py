"""Micro-batch losses for the actor and the critic, built from the algorithms registry.

Losses are normalized by the GLOBAL token/sequence count of the mini-batch (all ranks, all
micro-batches), so summing micro-batch gradients gives the exact mini-batch mean however
the batch is split (see verlcli.algorithms.aggregation).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from verlcli.algorithms import POLICY_LOSSES, PolicyLossConfig, agg_loss, kl_penalty, value_loss
from verlcli.workers import seq


def actor_micro_loss(engine, micro, cfg, g_tokens: int, g_seqs: int):
    a = cfg.actor
    inputs, r = seq.trim(micro)
    temperature = micro.meta.get("temperature", 1.0)
    # On-policy (one optimizer step per RL step): the driver skips the separate old-log-prob
    # pass; this forward IS the old policy, so old = detached new (ratio exactly 1), and the
    # entropy and rollout-gap metrics come from here.
    on_policy = "old_log_probs" not in micro
    logp, entropy = engine.log_probs(**inputs, response_len=r, temperature=temperature,
                                     with_entropy=bool(a.entropy_coeff) or on_policy)
    mask = seq.cut(micro["response_mask"], r).to(logp.dtype)
    old = logp.detach() if on_policy else seq.cut(micro["old_log_probs"], r)
    extra = {}
    if on_policy:
        denom = mask.sum().clamp(min=1)
        extra["entropy"] = float((entropy.detach() * mask).sum() / denom)
        gap = (seq.cut(micro["rollout_log_probs"], r) - old).abs() * mask
        extra["rollout/logprob_gap_mean"] = float(gap.sum() / denom)
        extra["rollout/logprob_gap_max"] = float(gap.max())
    rc = cfg.algorithm.rollout_correction
    # Bypass mode: the driver set old = rollout log-probs; the bypass loss weighs/masks in here.
    loss_fn = POLICY_LOSSES.get("bypass_mode" if rc.bypass_mode else a.policy_loss, "actor.policy_loss")
    agg = dict(loss_agg_mode=a.loss_agg_mode, global_tokens=g_tokens, global_seqs=g_seqs)
    weights = seq.cut(micro["rollout_is_weights"], r) if "rollout_is_weights" in micro else None
    pg_loss, m = loss_fn(old, logp, seq.cut(micro["advantages"], r), mask,
                         cfg=policy_loss_config(cfg), rollout_is_weights=weights, **agg)
    loss = pg_loss
    metrics = {**{k: float(v) for k, v in m.items()}, **extra}
    metrics["pg_loss"] = float(pg_loss.detach())
    if a.entropy_coeff:  # entropy bonus (else the entropy metric comes without grad)
        ent = agg_loss(entropy, mask, **agg)
        loss = loss - a.entropy_coeff * ent
    if a.use_kl_loss:
        kl = kl_penalty(logp, seq.cut(micro["ref_log_probs"], r), a.kl_loss_type)
        kl_loss = agg_loss(kl, mask, **agg)
        loss = loss + a.kl_loss_coef * kl_loss
        metrics["kl_loss"] = float(kl_loss.detach())
    # Per-micro-batch values are fractions of the global mean: summed later, not averaged.
    return loss, {f"sum:{k}" if k in ("pg_loss", "kl_loss") else k: v for k, v in metrics.items()}


def policy_loss_config(cfg) -> PolicyLossConfig:
    """The policy-loss knobs of the run config (actor.* and algorithm.rollout_correction.*)."""
    a, rc = cfg.actor, cfg.algorithm.rollout_correction
    return PolicyLossConfig(
        clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high, clip_ratio_c=a.clip_ratio_c,
        clip_cov_ratio=a.clip_cov_ratio, clip_cov_lb=a.clip_cov_lb, clip_cov_ub=a.clip_cov_ub,
        kl_cov_ratio=a.kl_cov_ratio, ppo_kl_coef=a.ppo_kl_coef, tau_pos=a.tau_pos, tau_neg=a.tau_neg,
        loss_scale_factor=cfg.data.max_response_tokens, bypass_loss_type=rc.loss_type,
        rollout_is=rc.rollout_is, rollout_is_threshold=rc.rollout_is_threshold,
        rollout_is_batch_normalize=rc.rollout_is_batch_normalize, rollout_rs=rc.rollout_rs,
        rollout_rs_threshold=rc.rollout_rs_threshold,
    )


def log_probs_and_sum_pi_squared(engine, inputs, r: int, temperature: float):
    """(log-probs, entropy, Σ_v π(v)²) `[b, r]` for the optimal token baseline, from one
    full-logits forward (no grad)."""
    from verlcli.algorithms import entropy_from_logits, logprobs_from_logits

    logits = engine.forward_logits(**inputs)[:, -r - 1:-1].float() / temperature
    labels = inputs["input_ids"][:, -r:].to(logits.device)
    s2 = torch.softmax(logits, dim=-1).pow(2).sum(-1)
    return logprobs_from_logits(logits, labels), entropy_from_logits(logits), s2


def critic_micro_loss(engine, micro, cfg, g_tokens: int, g_seqs: int):
    c = cfg.critic
    inputs, r = seq.trim(micro)
    vpreds = engine.values(**inputs, response_len=r)
    mask = seq.cut(micro["response_mask"], r).to(vpreds.dtype)
    loss, m = value_loss(vpreds, seq.cut(micro["values"], r), seq.cut(micro["returns"], r), mask,
                         c.cliprange_value, c.loss_agg_mode, global_tokens=g_tokens, global_seqs=g_seqs,
                         loss_scale_factor=cfg.data.max_response_tokens)
    metrics = {k: float(v) for k, v in m.items()}
    metrics["sum:vf_loss"] = float(loss.detach())
    return loss, metrics


def mean_metrics(items: list[dict]) -> dict:
    """Average per-micro/step metrics; keys prefixed 'sum:' are summed per optimizer step."""
    sums, counts = defaultdict(float), defaultdict(int)
    steps = max(sum(1 for m in items if "grad_norm" in m), 1)
    for m in items:
        for k, v in m.items():
            if v is None:
                continue
            v = float(v.item() if isinstance(v, torch.Tensor) else v)
            sums[k] += v
            counts[k] += 1
    out = {}
    for k, total in sums.items():
        if k.startswith("sum:"):
            out[k[4:]] = total / steps
        else:
            out[k] = total / counts[k]
    return out
