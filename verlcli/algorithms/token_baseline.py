"""Optimal token baseline (OTB): a per-token baseline for outcome rewards, as verl's
`optimal_token_baseline` and `tir_optimal_token_baseline` estimators.

For the responses of one prompt (a group) and every position t, the baseline is

    B_t = Σ_i G_{i,t}·W_{i,t} / (Σ_i W_{i,t} + ε),   A_{i,t} = G_{i,t} − B_t

with G the undiscounted reward-to-go and W_{i,t} = Σ_{j≤t} w_{i,j} the cumulative
"path variance" of response i, w_j = 1 − 2·π(y_j) + Σ_v π(v)² (the squared norm of the
score function of the softmax at that token; `sum_pi_squared` is Σ_v π(v)², computed by
the old-policy forward). With rollout importance weights ρ, w_j is scaled by ρ_j².
A group of one response gets no baseline (A = G).

`optimal_token_baseline` aligns responses by absolute position (masked positions add
nothing); `tir_optimal_token_baseline` (tool-integrated, multi-turn) first packs each
response's valid tokens to the left, so tokens masked in the middle (tool outputs) do not
shift the alignment, then scatters the advantages back. `handle_zero_tail` (default off for
OTB and on for TIR, as verl): when exactly one response is the longest of its group, the
baseline on its tail beyond the second-longest is 0 (there is nobody to compare with).
Σπ² is computed here from the temperature-scaled logits of the old-policy forward
(verlcli.workers.losses); in verl it only reached the estimator from the FSDP/Megatron
engines after verl-project/verl PR #6153.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from verlcli.algorithms.catalog import ADV_ESTIMATORS


def _inputs(token_level_rewards, response_mask, old_log_probs, sum_pi_squared, rollout_is_weights):
    if old_log_probs is None or sum_pi_squared is None:
        raise ValueError("the optimal token baseline needs `old_log_probs` and `sum_pi_squared`")
    mask = response_mask.detach().float()
    rewards = token_level_rewards.detach().float() * mask
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * old_log_probs.detach().float().exp() + sum_pi_squared.detach().float()
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.detach().float() ** 2
    return mask, returns, (w * mask).cumsum(-1)


def _groups(index, keep) -> list[list[int]]:
    keys = index.tolist() if hasattr(index, "tolist") else list(index)
    groups = defaultdict(list)
    for i, k in enumerate(keys):
        if keep[i]:
            groups[k].append(i)
    return list(groups.values())


def _zero_tail(baselines, members, lengths):
    """Baseline 0 past the second-longest response, on the single longest one."""
    lens = [int(lengths[i]) for i in members]
    ordered = sorted(lens)
    longest, second = ordered[-1], ordered[-2]
    if lens.count(longest) == 1 and longest > second:
        baselines[members[lens.index(longest)], second:] = 0.0


def _group_baselines(returns, w_cum, mask, index, lengths, handle_zero_tail, epsilon):
    baselines = torch.zeros_like(returns)
    for members in _groups(index, [True] * returns.shape[0] if mask is not None else lengths > 0):
        if len(members) < 2:
            continue
        idx = torch.tensor(members)
        m = mask[idx] if mask is not None else 1.0
        num = (returns[idx] * w_cum[idx] * m).sum(0)
        den = (w_cum[idx] * m).sum(0) + epsilon
        baselines[idx] = (num / den).unsqueeze(0).expand(len(members), -1)
        if handle_zero_tail:
            _zero_tail(baselines, members, lengths)
    return baselines


@ADV_ESTIMATORS.register("optimal_token_baseline")
def optimal_token_baseline(token_level_rewards, response_mask, index=None, old_log_probs=None,
                           sum_pi_squared=None, rollout_is_weights=None, handle_zero_tail=False,
                           epsilon=1e-8, **kwargs):
    """OTB by absolute position (module docstring). returns = reward-to-go G."""
    mask, returns, w_cum = _inputs(token_level_rewards, response_mask, old_log_probs,
                                   sum_pi_squared, rollout_is_weights)
    lengths = mask.sum(-1)
    baselines = _group_baselines(returns, w_cum, mask, index, lengths, handle_zero_tail, epsilon)
    return (returns - baselines) * mask, returns


@ADV_ESTIMATORS.register("tir_optimal_token_baseline")
def tir_optimal_token_baseline(token_level_rewards, response_mask, index=None, old_log_probs=None,
                               sum_pi_squared=None, rollout_is_weights=None, handle_zero_tail=True,
                               epsilon=1e-8, **kwargs):
    """OTB on each response's valid tokens packed to the left (module docstring); responses
    with no valid token are left out of their group. returns = reward-to-go G (unpacked)."""
    mask, returns, w_cum = _inputs(token_level_rewards, response_mask, old_log_probs,
                                   sum_pi_squared, rollout_is_weights)
    lengths = mask.sum(-1).long()
    width = int(lengths.max()) if lengths.numel() else 0
    packed_r = returns.new_zeros(returns.shape[0], width)
    packed_w = torch.zeros_like(packed_r)
    valid = mask.bool()
    for i in range(returns.shape[0]):
        packed_r[i, : lengths[i]] = returns[i, valid[i]]
        packed_w[i, : lengths[i]] = w_cum[i, valid[i]]
    baselines = _group_baselines(packed_r, packed_w, None, index, lengths, handle_zero_tail, epsilon)
    packed_adv = packed_r - baselines
    adv = torch.zeros_like(returns)
    for i in range(returns.shape[0]):
        adv[i, valid[i]] = packed_adv[i, : lengths[i]]
    return adv * mask, returns
