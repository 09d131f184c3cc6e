"""Golden numbers for the verl-0.9 parity additions: grpo/rloo_vectorized, the optimal token
baseline, SAPO, GMPO (geo_mean), bypass mode, rollout correction, PF-PPO, and the knobs
(CISPO lower bound, kl_cov coefficient, critic seq-mean-token-sum-norm). Every expected
value is worked out by hand in the comment beside it."""

import math

import pytest
import torch

from verlcli.algorithms import ADV_ESTIMATORS, POLICY_LOSSES, PolicyLossConfig, rollout_correction, value_loss
from verlcli.algorithms.pf_ppo import pf_ppo_resample, pf_ppo_weights
from verlcli.algorithms.rollout_correction import is_weights, rejection_mask
from verlcli.errors import UserError

A = pytest.approx


def outcome(scores):
    """One-token responses whose reward is the score."""
    return torch.tensor(scores).unsqueeze(-1), torch.ones(len(scores), 1)


# ---------------------------------------------------------------- vectorized aliases

def test_grpo_vectorized_floors_the_std():
    rewards, mask = outcome([0.0, 0.001, 1.0, 3.0, 2.0])
    index = ["p", "p", "q", "q", "r"]
    adv, ret = ADV_ESTIMATORS.get("grpo_vectorized")(rewards, mask, index=index)
    # p: mean 5e-4, var = (1e-6 - 1e-6/2)/1 = 5e-7 < 1e-6 -> std = sqrt(1e-6) = 1e-3
    #    A = -+5e-4 / (1e-3 + 1e-6) = -+0.4995005
    # q: mean 2, var = (10 - 16/2)/1 = 2 -> A = -+1/(sqrt 2 + 1e-6)
    # r: alone: mean 0, std 1 -> A = 2/(1 + 1e-6)
    expected = [-0.4995005, 0.4995005, -1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6), 2 / (1 + 1e-6)]
    assert adv[:, 0].tolist() == A(expected, rel=1e-5)
    assert torch.equal(adv, ret)
    # plain grpo divides by the real std 7.07e-4: -+0.7066
    plain, _ = ADV_ESTIMATORS.get("grpo")(rewards, mask, index=index)
    assert plain[0, 0].item() == A(-0.0005 / (math.sqrt(5e-7) + 1e-6), rel=1e-4)


def test_rloo_vectorized_gives_zero_to_a_lone_response():
    rewards, mask = outcome([1.0, 2.0, 3.0, 5.0])
    index = ["p", "p", "p", "q"]
    adv, _ = ADV_ESTIMATORS.get("rloo_vectorized")(rewards, mask, index=index)
    # r_i - mean(others): 1 - 2.5, 2 - 2, 3 - 1.5; the lone q gets 0 (verl)
    assert adv[:, 0].tolist() == A([-1.5, 0.0, 1.5, 0.0])
    plain, _ = ADV_ESTIMATORS.get("rloo")(rewards, mask, index=index)
    assert plain[:, 0].tolist() == A([-1.5, 0.0, 1.5, 5.0])  # rloo keeps the raw reward


# ---------------------------------------------------------------- optimal token baseline

# Group g: response a (π = .5, .5; Σπ² = .5, .5) -> w = 1 - 1 + .5 = .5 per token, W = [.5, 1]
#          response b (π = 1, .5;  Σπ² = 1, .5)  -> w = [0, .5], W = [0, .5]
# a is rewarded 1 at its last token, b 0: G_a = [1, 1], G_b = [0, 0].
# Response c is alone in group h, reward 2 on its only token.
OTB_REWARDS = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
OTB_MASK = torch.tensor([[1, 1], [1, 1], [1, 0]])
OTB_LP = torch.log(torch.tensor([[0.5, 0.5], [1.0, 0.5], [0.5, 0.5]]))
OTB_S2 = torch.tensor([[0.5, 0.5], [1.0, 0.5], [0.5, 0.5]])
OTB_INDEX = ["g", "g", "h"]


def test_optimal_token_baseline():
    adv, ret = ADV_ESTIMATORS.get("optimal_token_baseline")(
        OTB_REWARDS, OTB_MASK, index=OTB_INDEX, old_log_probs=OTB_LP, sum_pi_squared=OTB_S2)
    # B_0 = (1·.5 + 0·0)/(.5 + 0) = 1;  B_1 = (1·1 + 0·.5)/(1 + .5) = 2/3
    # a: [1 - 1, 1 - 2/3];  b: [0 - 1, 0 - 2/3];  c alone: A = G = [2, 0]
    assert adv.tolist() == [A([0.0, 1 / 3], abs=1e-6), A([-1.0, -2 / 3], abs=1e-6), A([2.0, 0.0])]
    assert ret.tolist() == [A([1.0, 1.0]), A([0.0, 0.0]), A([2.0, 0.0])]


def test_optimal_token_baseline_with_is_weights():
    rho = torch.tensor([[2.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    adv, _ = ADV_ESTIMATORS.get("optimal_token_baseline")(
        OTB_REWARDS, OTB_MASK, index=OTB_INDEX, old_log_probs=OTB_LP, sum_pi_squared=OTB_S2,
        rollout_is_weights=rho)
    # w_a = [.5·4, .5] -> W_a = [2, 2.5]; B_0 = 2/2 = 1; B_1 = 2.5/(2.5 + .5) = 5/6
    assert adv[0].tolist() == A([0.0, 1 / 6], abs=1e-6)
    assert adv[1].tolist() == A([-1.0, -5 / 6], abs=1e-6)


def test_optimal_token_baseline_zero_tail():
    # a has 3 tokens, b 1: past b's length only a is left, and its baseline there is 0.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    lp, s2 = torch.log(torch.full((2, 3), 0.5)), torch.full((2, 3), 0.5)  # w = .5 per token
    kw = dict(index=["g", "g"], old_log_probs=lp, sum_pi_squared=s2)
    adv, _ = ADV_ESTIMATORS.get("optimal_token_baseline")(rewards, mask, **kw)
    # t=0: W = [.5, .5], G = [1, .5] -> B = .75; t>0: only a (W 1, 1.5) -> B = G_a = 1
    assert adv.tolist() == [A([0.25, 0.0, 0.0]), A([-0.25, 0.0, 0.0])]
    adv, _ = ADV_ESTIMATORS.get("optimal_token_baseline")(rewards, mask, handle_zero_tail=True, **kw)
    assert adv.tolist() == [A([0.25, 1.0, 1.0]), A([-0.25, 0.0, 0.0])]


def test_tir_optimal_token_baseline_packs_valid_tokens():
    # a's middle token is a tool output (masked): TIR aligns a's 2nd valid token with b's 2nd.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.5], [1.0, 0.5, 0.2]]))
    s2 = torch.tensor([[0.5, 0.9, 0.5], [1.0, 0.5, 0.2]])
    adv, ret = ADV_ESTIMATORS.get("tir_optimal_token_baseline")(
        rewards, mask, index=["g", "g"], old_log_probs=lp, sum_pi_squared=s2)
    # packed: a = G [1, 1], W [.5, 1];  b = G [0, 0], W [0, .5] -> the OTB example above:
    # a: [0, 1/3] at positions 0 and 2; b: [-1, -2/3] at positions 0 and 1.
    assert adv.tolist() == [A([0.0, 0.0, 1 / 3], abs=1e-6), A([-1.0, -2 / 3, 0.0], abs=1e-6)]
    assert ret[0].tolist() == A([1.0, 1.0, 1.0])


# ---------------------------------------------------------------- policy losses

def loss_of(name, old, new, adv, mask, cfg=None, **kw):
    log_prob = torch.tensor(new, requires_grad=True)
    loss, m = POLICY_LOSSES.get(name)(torch.tensor(old), log_prob, torch.tensor(adv), torch.tensor(mask),
                                      "token-mean", cfg or PolicyLossConfig(), **kw)
    loss.backward()
    return loss.item(), m, log_prob.grad


def test_sapo():
    ln2 = math.log(2)
    loss, m, grad = loss_of("sapo", old=[[0.0, 0.0], [0.0, 0.0]], new=[[0.0, ln2], [0.0, -5.0]],
                            adv=[[1.0, 1.0], [-1.0, -1.0]], mask=[[1, 1], [1, 0]], global_seqs=2)
    # seq 1 (A = 1, τ = 1): r = 1 -> -σ(0)·4 = -2;  r = 2 -> -σ(1)·4 = -2.9242344; mean -2.4621172
    # seq 2 (A = -1, τ = 1.05): r = 1 -> +σ(0)·4/1.05 = 1.9047619
    # seq-mean-token-mean: (-2.4621172 + 1.9047619) / 2
    assert loss == A((-2.4621172 + 1.9047619) / 2, rel=1e-6)
    # at r = 1 the gate's slope is 1, so the gradient is PPO's: -A · (1/2 tokens) · (1/2 seqs)
    assert grad[0, 0].item() == A(-0.25)
    assert m["pg_clipfrac"] == 0.0 and m["pg_clipfrac_lower"] == 0.0


def test_geo_mean():
    kw = dict(old=[[0.0, 0.0], [0.0, 0.0]], new=[[0.1, 0.5], [-0.5, 0.3]],
              adv=[[1.0, 1.0], [-1.0, -1.0]], mask=[[1, 1], [1, 1]], global_seqs=2)
    loss, m, _ = loss_of("geo_mean", **kw)
    # seq 1, A > 0: min(x, clip(x, -.2, .2)) = [.1, .2] -> exp(.15) = 1.1618342, L = -1.1618342
    # seq 2, A < 0: max(x, clip(x)) = [-.2, .3]          -> exp(.05) = 1.0512711, L = +1.0512711
    assert loss == A((-1.1618342 + 1.0512711) / 2, rel=1e-6)
    assert m["pg_clipfrac"] == A(0.25) and m["pg_clipfrac_lower"] == A(0.5)
    # IS weights [4, 1] on seq 1 enter as their geometric mean 2
    loss, _, _ = loss_of("geo_mean", **kw, rollout_is_weights=torch.tensor([[4.0, 1.0], [1.0, 1.0]]))
    assert loss == A((-2 * 1.1618342 + 1.0512711) / 2, rel=1e-6)


BYPASS = dict(old=[[-1.5, -2.0]], new=[[-1.0, -2.0]], adv=[[1.0, 1.0]], mask=[[1, 1]], global_tokens=2)


def test_bypass_reinforce_with_token_is():
    cfg = PolicyLossConfig(bypass_loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5)
    loss, m, grad = loss_of("bypass_mode", **BYPASS, cfg=cfg)
    # w = min(π/π_rollout, 1.5) = [min(e^.5, 1.5), 1] = [1.5, 1]
    # L = -Σ A·w·log π / 2 = -(1.5·-1 + 1·-2)/2 = 1.75; dL/dlog π = -A·w/2 = [-.75, -.5]
    assert loss == A(1.75)
    assert grad.tolist() == [A([-0.75, -0.5])]
    assert m["ppo_kl"] == A(-0.25)  # mean(log π_rollout - log π) = (-.5 + 0)/2
    assert m["rollout_corr/rollout_is_mean"] == A(1.25)
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == A(0.5)


def test_bypass_reinforce_rejects_outliers():
    cfg = PolicyLossConfig(bypass_loss_type="reinforce", rollout_rs="token_k1", rollout_rs_threshold=1.5)
    loss, m, grad = loss_of("bypass_mode", **BYPASS, cfg=cfg)
    # ratio e^.5 = 1.65 is outside [1/1.5, 1.5]: token 1 masked; L = -(1·-2)/2 (global count 2)
    assert loss == A(1.0) and grad[0, 0].item() == 0.0
    assert m["rollout_corr/rollout_rs_masked_fraction"] == A(0.5)


def test_bypass_ppo_clip_is_vanilla_against_the_rollout():
    cfg = PolicyLossConfig(rollout_is="token", rollout_is_threshold=1.5)
    loss, m, _ = loss_of("bypass_mode", **BYPASS, cfg=cfg)
    plain, _, _ = loss_of("vanilla", **BYPASS)
    # weights are measured but not applied (the ratio already is π/π_rollout):
    # vanilla: r = [1.65, 1] clipped to [1.2, 1] -> -(1.2 + 1)/2
    assert loss == A(plain) == A(-1.1)
    assert "rollout_corr/rollout_is_mean" in m


# ---------------------------------------------------------------- rollout correction

LOG_RATIO = torch.log(torch.tensor([[3.0, 0.5], [1.0, 1.0]]))
RC_MASK = torch.tensor([[1, 1], [1, 0]])


def test_token_is_weights_truncate_and_normalize():
    w, m = is_weights(LOG_RATIO, RC_MASK, "token", 2.0)
    # raw [3, .5 | 1, pad] -> truncated [2, .5 | 1, 0]
    assert w.tolist() == [A([2.0, 0.5]), A([1.0, 0.0])]
    assert m["rollout_is_mean"] == A(3.5 / 3) and m["rollout_is_max"] == A(3.0) and m["rollout_is_min"] == A(0.5)
    assert m["rollout_is_ratio_fraction_high"] == A(1 / 3) and m["rollout_is_ratio_fraction_low"] == 0.0
    w, m = is_weights(LOG_RATIO, RC_MASK, "token", 2.0, batch_normalize=True)
    assert w[0].tolist() == A([2 / (3.5 / 3), 0.5 / (3.5 / 3)]) and m["rollout_is_batch_norm_factor"] == A(3.5 / 3)


def test_sequence_is_weights():
    w, m = is_weights(LOG_RATIO, RC_MASK, "sequence", 2.0)
    # seq 1: 3 · .5 = 1.5 on both tokens; seq 2: 1
    assert w.tolist() == [A([1.5, 1.5]), A([1.0, 0.0])]
    assert m["rollout_is_ratio_fraction_high"] == 0.0


def test_rejection_options():
    # seq_max_k2 ≤ .5: seq 1 has ½(ln 3)² = .6035 -> rejected whole; seq 2 kept
    mask, m = rejection_mask(LOG_RATIO, RC_MASK, "seq_max_k2", 0.5)
    assert mask.tolist() == [[0, 0], [1, 0]] and m["rollout_rs_masked_fraction"] == A(2 / 3)
    # token_k1 with '0.4_2.5': ratios 3 (out), .5 (in), 1 (in)
    mask, _ = rejection_mask(LOG_RATIO, RC_MASK, "token_k1", "0.4_2.5")
    assert mask.tolist() == [[0, 1], [1, 0]]
    # asymmetric bounds are ratio bounds: '0.6_4' keeps 3 and 1, drops .5 (verl before
    # PR #6377 compared -log ρ with [ln .6, ln 4] and kept .5, dropped 3)
    mask, _ = rejection_mask(LOG_RATIO, RC_MASK, "token_k1", "0.6_4")
    assert mask.tolist() == [[1, 0], [1, 0]]
    # two options, one threshold each: both must pass
    mask, _ = rejection_mask(LOG_RATIO, RC_MASK, "token_k1,seq_mean_k3", "0.4_4,0.5")
    # seq_mean_k3 of seq 1 = ((3 - 1 - ln 3) + (.5 - 1 - ln .5))/2 = (.9014 + .1931)/2 = .547 > .5
    assert mask.tolist() == [[0, 0], [1, 0]]
    with pytest.raises(UserError, match="rollout_rs"):
        rejection_mask(LOG_RATIO, RC_MASK, "token_k9", 1.0)


def test_offpolicy_metrics():
    lp = torch.tensor([[math.log(3), math.log(0.5)], [0.0, 0.0]])
    _, _, m = rollout_correction(lp, torch.zeros(2, 2), RC_MASK)
    # kl = mean(log π_rollout - log π) = (-ln 3 - ln .5 + 0)/3; chi2 = mean(9, .25, 1) - 1
    assert m["rollout_corr/kl"] == A((-math.log(3) - math.log(0.5)) / 3)
    assert m["rollout_corr/chi2_token"] == A(10.25 / 3 - 1)


# ---------------------------------------------------------------- PF-PPO

def test_pf_ppo_weights_and_resample():
    scores = torch.tensor([-2.0, 1.0, 0.0, 1.0])
    assert pf_ppo_weights(scores, "pow", 2.0).tolist() == A([4.0, 1.0, 1e-8, 1.0])
    assert pf_ppo_weights(scores, "max_min").tolist() == A([1.0, 1.0, 1e-8, 1.0])
    assert pf_ppo_weights(scores, "max_random").tolist() == A([0.1, 0.4, 0.1, 0.4])
    idx = pf_ppo_resample(scores, "max_min", generator=torch.Generator().manual_seed(0))
    assert len(idx) == 4 and 2 not in idx.tolist()  # the middling reward is filtered out


# ---------------------------------------------------------------- knobs

def test_cispo_accepts_a_lower_bound_above_one():
    cfg = PolicyLossConfig(clip_ratio_low=10.0, clip_ratio_high=0.2)
    loss, m, _ = loss_of("cispo", old=[[0.0, 0.0]], new=[[-3.0, 1.0]], adv=[[1.0, 1.0]], mask=[[1, 1]], cfg=cfg)
    # weights: e^-3 = .0498 (no lower bound), e^1 -> 1.2; L = -(.0498·-3 + 1.2·1)/2
    assert loss == A(-(math.exp(-3) * -3 + 1.2) / 2, rel=1e-6) and m["pg_clipfrac"] == A(0.5)


def test_kl_cov_coefficient_defaults_to_verls():
    assert PolicyLossConfig().ppo_kl_coef == 0.1


def test_critic_seq_mean_token_sum_norm_uses_the_configured_length():
    vpreds, returns = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    args = dict(cliprange_value=None, loss_agg_mode="seq-mean-token-sum-norm", global_seqs=2, loss_scale_factor=8)
    whole, _ = value_loss(vpreds, vpreds, returns, mask, **args)
    # 0.5 · ((1 + 4)/8 + 9/8) / 2 = 0.4375, and the same when split into micro-batches of other widths
    parts = [value_loss(vpreds[i:i + 1, :w], vpreds[i:i + 1, :w], returns[i:i + 1, :w], mask[i:i + 1, :w], **args)[0]
             for i, w in ((0, 2), (1, 1))]
    assert whole.item() == A(0.4375) and sum(p.item() for p in parts) == A(0.4375)
