"""Advantage estimators, selected by `algorithm.adv_estimator`.

Every estimator has the same signature so the trainer calls them all alike:

    fn(token_level_rewards [B, T], response_mask [B, T], index (group id per response),
       values [B, T] | None = None, gamma=1.0, lam=1.0, norm_adv_by_std=True,
       reward_baselines [B] | None = None, epsilon=1e-6, **kwargs)
    -> (advantages [B, T], returns [B, T])

and ignores what it does not use. `index` holds one hashable group id per response (the
prompt's uid: responses to the same prompt form a group); a list, a numpy array or a
1-D tensor all work. Outcome estimators use the response score r_i = Σ_t rewards·mask and
broadcast their per-response advantage over the valid tokens. Outputs are float32 and 0 at
masked positions; nothing here needs gradients.

Conventions follow verl's `core_algos.py` and are noted per estimator, in particular what
happens to a group of one response (no baseline can be formed from it).
"""

from __future__ import annotations

from typing import Sequence

import torch

from verlcli.algorithms.aggregation import masked_whiten
from verlcli.algorithms.catalog import ADV_ESTIMATORS
from verlcli.errors import UserError


def needs_critic(name: str) -> bool:
    """True when the estimator needs a value model (critic), as its registration says."""
    return ADV_ESTIMATORS.needs(name).critic  # an unknown name fails here, with the names


def needs_baseline(name: str) -> bool:
    """True when the estimator needs `reward_baselines` (the reward of a greedy response
    to the same prompt), as its registration says."""
    return ADV_ESTIMATORS.needs(name).baseline


# ---------------------------------------------------------------- helpers


def _prepare(token_level_rewards: torch.Tensor, response_mask: torch.Tensor):
    rewards = token_level_rewards.detach().float()
    mask = response_mask.detach().to(rewards.device).float()
    return rewards, mask


def _scores(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (rewards * mask).sum(dim=-1)


def _group_ids(index: Sequence, batch_size: int, device) -> tuple[torch.Tensor, int]:
    """Map arbitrary hashable group ids to 0..G-1 (first-seen order)."""
    if index is None:
        raise ValueError("this advantage estimator needs `index` (one group id per response)")
    keys = index.tolist() if hasattr(index, "tolist") else list(index)
    if len(keys) != batch_size:
        raise ValueError(f"index has {len(keys)} entries but the batch has {batch_size} responses")
    first_seen: dict = {}
    ids = [first_seen.setdefault(k, len(first_seen)) for k in keys]
    return torch.tensor(ids, dtype=torch.long, device=device), len(first_seen)


def _group_stats(scores: torch.Tensor, gid: torch.Tensor, n_groups: int):
    """Per-response (group size, group mean, unbiased group std), gathered back to [B].
    The std of a group of one is NaN here; callers decide what a lone response means."""
    zeros = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, gid, torch.ones_like(scores))
    mean = zeros.index_add(0, gid, scores) / count
    # An all-equal group must centre to exactly 0: summing then dividing can leave a
    # 1e-8 residue (3 × 0.1), which GRPO's 1/(std + 1e-6) would blow up to ~0.01.
    high = zeros.scatter_reduce(0, gid, scores, "amax", include_self=False)
    low = zeros.scatter_reduce(0, gid, scores, "amin", include_self=False)
    mean = torch.where(high == low, high, mean)
    sq_dev = zeros.index_add(0, gid, (scores - mean[gid]) ** 2)
    std = (sq_dev / (count - 1)).sqrt()  # Bessel-corrected, like torch.std
    return count[gid], mean[gid], std[gid]


def _broadcast(per_response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_response.unsqueeze(-1) * mask


# ---------------------------------------------------------------- estimators


@ADV_ESTIMATORS.register("gae")
def gae(token_level_rewards, response_mask, index=None, values=None, gamma=1.0, lam=1.0,
        norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, **kwargs):
    """Generalized Advantage Estimation (PPO with a critic).

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1}, computed backwards over the
    valid tokens only: a masked position is transparent (the next value and the running
    A pass through it unchanged), as in current verl — so tokens masked in the middle of
    a response (multi-turn observations) are skipped, not treated as an episode end.
    V after the last valid token is 0.

    returns = A + V (before whitening; the critic's target). advantages = masked_whiten(A)
    over the valid tokens of the whole batch (unbiased variance, eps 1e-8, see
    `masked_whiten`). `norm_adv_by_std` is not used (verl always whitens GAE).
    """
    if values is None:
        raise ValueError("gae needs `values` from the critic")
    rewards, mask = _prepare(token_level_rewards, response_mask)
    values = values.detach().float().to(rewards.device)
    batch, length = rewards.shape
    next_value = torch.zeros(batch, device=rewards.device)
    running = torch.zeros(batch, device=rewards.device)
    adv = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        next_value = m * values[:, t] + (1 - m) * next_value
        running = m * step + (1 - m) * running
        adv[:, t] = running
    returns = (adv + values) * mask
    return masked_whiten(adv, mask), returns


@ADV_ESTIMATORS.register("grpo")
def grpo(token_level_rewards, response_mask, index=None, values=None, gamma=1.0, lam=1.0,
         norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, **kwargs):
    """GRPO: A_i = (r_i − mean_g) / (std_g + ε) with the group's unbiased std (n − 1,
    `torch.std`) and ε = 1e-6. `norm_adv_by_std=False` gives Dr. GRPO: A_i = r_i − mean_g.

    A group whose rewards are all equal gets A = 0 (0 / (0 + ε)). A group of ONE response
    follows verl: mean 0 and std 1, so A = r / (1 + ε) (or r for Dr. GRPO) — its raw
    reward, not 0. returns = advantages.
    """
    rewards, mask = _prepare(token_level_rewards, response_mask)
    scores = _scores(rewards, mask)
    gid, n_groups = _group_ids(index, scores.shape[0], scores.device)
    count, mean, std = _group_stats(scores, gid, n_groups)
    alone = count == 1
    mean = torch.where(alone, torch.zeros_like(mean), mean)
    std = torch.where(alone, torch.ones_like(std), std)
    adv = (scores - mean) / (std + epsilon) if norm_adv_by_std else scores - mean
    adv = _broadcast(adv, mask)
    return adv, adv


@ADV_ESTIMATORS.register("rloo")
def rloo(token_level_rewards, response_mask, index=None, values=None, gamma=1.0, lam=1.0,
         norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, **kwargs):
    """REINFORCE leave-one-out: A_i = r_i − mean of the OTHER responses of the group
    = n/(n−1)·(r_i − mean_g). A group of one keeps its raw reward (verl). Not normalized
    by std. returns = advantages."""
    rewards, mask = _prepare(token_level_rewards, response_mask)
    scores = _scores(rewards, mask)
    gid, n_groups = _group_ids(index, scores.shape[0], scores.device)
    count, mean, _ = _group_stats(scores, gid, n_groups)
    loo = count / (count - 1).clamp(min=1) * (scores - mean)
    adv = _broadcast(torch.where(count > 1, loo, scores), mask)
    return adv, adv


@ADV_ESTIMATORS.register("opo")
def opo(token_level_rewards, response_mask, index=None, values=None, gamma=1.0, lam=1.0,
        norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, **kwargs):
    """On-Policy RL with Optimal baseline: A_i = r_i − b_g with the length-weighted group
    mean b_g = Σ_j |y_j|·r_j / Σ_j |y_j| (|y| = valid tokens). A group of one has b = 0
    (verl). returns = advantages."""
    rewards, mask = _prepare(token_level_rewards, response_mask)
    scores = _scores(rewards, mask)
    lengths = mask.sum(dim=-1)
    gid, n_groups = _group_ids(index, scores.shape[0], scores.device)
    zeros = torch.zeros(n_groups, device=scores.device)
    weighted = zeros.index_add(0, gid, lengths * scores)
    total_len = zeros.index_add(0, gid, lengths).clamp(min=1)
    count = zeros.index_add(0, gid, torch.ones_like(scores))
    baseline = torch.where(count > 1, weighted / total_len, zeros)[gid]
    adv = _broadcast(scores - baseline, mask)
    return adv, adv


@ADV_ESTIMATORS.register("reinforce_plus_plus")
def reinforce_plus_plus(token_level_rewards, response_mask, index=None, values=None, gamma=1.0,
                        lam=1.0, norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6,
                        **kwargs):
    """REINFORCE++: discounted return-to-go G_t = r_t + γ·G_{t+1}, reset to 0 at every
    masked position (written for right padding, as in verl), then whitened over the
    valid tokens of the whole batch (`masked_whiten`). returns = G_t (unwhitened)."""
    rewards, mask = _prepare(token_level_rewards, response_mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    returns = returns * mask
    return masked_whiten(returns, mask), returns


@ADV_ESTIMATORS.register("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(token_level_rewards, response_mask, index=None, values=None,
                                 gamma=1.0, lam=1.0, norm_adv_by_std=True, reward_baselines=None,
                                 epsilon=1e-6, **kwargs):
    """REINFORCE++ with a group baseline: r_i − mean_g (a group of one has mean 0, verl),
    broadcast over the valid tokens, then whitened over all valid tokens of the batch
    (so long responses weigh more in the batch statistics, as in verl).
    returns = advantages."""
    rewards, mask = _prepare(token_level_rewards, response_mask)
    scores = _scores(rewards, mask)
    gid, n_groups = _group_ids(index, scores.shape[0], scores.device)
    count, mean, _ = _group_stats(scores, gid, n_groups)
    centered = scores - torch.where(count > 1, mean, torch.zeros_like(mean))
    adv = masked_whiten(_broadcast(centered, mask), mask)
    return adv, adv


@ADV_ESTIMATORS.register("remax")
def remax(token_level_rewards, response_mask, index=None, values=None, gamma=1.0, lam=1.0,
          norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, **kwargs):
    """ReMax: returns = undiscounted reward-to-go Σ_{s≥t} r_s (valid tokens), and
    A_t = returns_t − b where b (`reward_baselines`, [B]) is the reward of the greedy
    response to the same prompt."""
    if reward_baselines is None:
        raise ValueError("remax needs `reward_baselines` (reward of the greedy response)")
    rewards, mask = _prepare(token_level_rewards, response_mask)
    returns = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    baselines = reward_baselines.detach().float().to(rewards.device)
    return returns - baselines.unsqueeze(-1) * mask, returns


@ADV_ESTIMATORS.register("gpg")
def gpg(token_level_rewards, response_mask, index=None, values=None, gamma=1.0, lam=1.0,
        norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, f_norm=1.0, **kwargs):
    """Group Policy Gradient: A_i = α·(r_i − mean_g) / f_norm with α = B / #{i: r_i ≠ 0}
    (at least 1 in the denominator), boosting the signal when few responses are
    rewarded. No std normalization; a group of one has mean 0 (verl).
    returns = advantages."""
    rewards, mask = _prepare(token_level_rewards, response_mask)
    scores = _scores(rewards, mask)
    gid, n_groups = _group_ids(index, scores.shape[0], scores.device)
    count, mean, _ = _group_stats(scores, gid, n_groups)
    alpha = scores.shape[0] / (scores != 0).sum().clamp(min=1)
    centered = scores - torch.where(count > 1, mean, torch.zeros_like(mean))
    adv = _broadcast(alpha * centered / f_norm, mask)
    return adv, adv


@ADV_ESTIMATORS.register("grpo_passk")
def grpo_passk(token_level_rewards, response_mask, index=None, values=None, gamma=1.0, lam=1.0,
               norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, **kwargs):
    """Pass@k-style GRPO: only the best response of each group gets a non-zero
    advantage, r_max − r_second_max, divided by (unbiased group std + ε) when
    `norm_adv_by_std`. Ties for the best give 0. Needs at least 2 responses per group.
    returns = advantages."""
    rewards, mask = _prepare(token_level_rewards, response_mask)
    scores = _scores(rewards, mask)
    gid, n_groups = _group_ids(index, scores.shape[0], scores.device)
    adv = torch.zeros_like(scores)
    for g in range(n_groups):
        members = (gid == g).nonzero().squeeze(-1)
        if members.numel() < 2:
            raise UserError(
                "adv_estimator grpo_passk needs at least 2 responses per prompt",
                fix="set rollout.n to 2 or more",
            )
        group_scores = scores[members]
        top2, where = group_scores.topk(2)
        gap = top2[0] - top2[1]
        if norm_adv_by_std:
            gap = gap / (group_scores.std() + epsilon)
        adv[members[where[0]]] = gap
    adv = _broadcast(adv, mask)
    return adv, adv


@ADV_ESTIMATORS.register("grpo_vectorized")
def grpo_vectorized(token_level_rewards, response_mask, index=None, values=None, gamma=1.0,
                    lam=1.0, norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, **kwargs):
    """verl's `grpo_vectorized`: GRPO with verl's `group_mean_std` statistics, which differ
    from `grpo` in one place: the std is floored, std = sqrt(max(var, ε)) with the same
    ε = 1e-6 (so at least 1e-3), and then A = (r − mean) / (std + ε). A group whose reward
    spread is tiny (var < 1e-6) gets A = (r − mean)/(1e-3 + 1e-6), not the huge values of
    `grpo`. The variance is taken as (Σr² − (Σr)²/n)/(n − 1) like verl. A group of one:
    mean 0, std 1 (raw reward), as `grpo`. returns = advantages."""
    rewards, mask = _prepare(token_level_rewards, response_mask)
    scores = _scores(rewards, mask)
    gid, n_groups = _group_ids(index, scores.shape[0], scores.device)
    zeros = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, gid, torch.ones_like(scores))
    s1 = zeros.index_add(0, gid, scores)
    s2 = zeros.index_add(0, gid, scores * scores)
    var = (s2 - s1 * s1 / count) / (count - 1).clamp(min=1)
    std = var.clamp(min=epsilon).sqrt()
    alone = count <= 1
    mean = torch.where(alone, zeros, s1 / count)[gid]
    std = torch.where(alone, torch.ones_like(std), std)[gid]
    adv = (scores - mean) / (std + epsilon) if norm_adv_by_std else scores - mean
    adv = _broadcast(adv, mask)
    return adv, adv


@ADV_ESTIMATORS.register("rloo_vectorized")
def rloo_vectorized(token_level_rewards, response_mask, index=None, values=None, gamma=1.0,
                    lam=1.0, norm_adv_by_std=True, reward_baselines=None, epsilon=1e-6, **kwargs):
    """verl's `rloo_vectorized`: A_i = (n·r_i − Σ_g r)/(n − 1) = r_i − mean of the others,
    the same as `rloo` for groups of two or more — but a group of ONE gets A = 0 here
    (verl multiplies by [n > 1]), while `rloo` keeps the raw reward (as verl's `rloo`).
    returns = advantages."""
    rewards, mask = _prepare(token_level_rewards, response_mask)
    scores = _scores(rewards, mask)
    gid, n_groups = _group_ids(index, scores.shape[0], scores.device)
    zeros = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, gid, torch.ones_like(scores))[gid]
    total = zeros.index_add(0, gid, scores)[gid]
    adv = (count * scores - total) / (count - 1).clamp(min=1) * (count > 1)
    adv = _broadcast(adv, mask)
    return adv, adv
