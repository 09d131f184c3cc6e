"""The driver's advantage step with the verl-parity settings: decoupled rollout correction
(weights and rejection reach the batch, metrics are returned), PF-PPO resampling, and the
optimal token baseline fed the old log-probs and Σπ² from the batch."""

import math

import pytest
import torch

from verlcli.config.loader import load_config
from verlcli.data.batch import Batch
from verlcli.trainer.steps import compute_advantages

MASK = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]])


def batch():
    scores = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    old = torch.log(torch.tensor([[0.5, 0.5], [1.0, 0.5], [0.5, 0.5], [0.5, 0.5]]))
    rollout = old.clone()
    rollout[0, 0] = old[0, 0] - math.log(3)  # π_train/π_rollout = 3 on one token
    return Batch({"token_level_scores": scores, "response_mask": MASK.clone(), "old_log_probs": old,
                  "rollout_log_probs": rollout, "sum_pi_squared": old.exp().clamp(min=0.5)},
                 {"uid": ["a", "a", "b", "b"]})


def test_decoupled_rollout_correction_reaches_the_batch():
    cfg = load_config(overrides=["algorithm.rollout_correction.rollout_is=token",
                                 "algorithm.rollout_correction.rollout_is_threshold=2",
                                 "algorithm.rollout_correction.rollout_rs=token_k1",
                                 "algorithm.rollout_correction.rollout_rs_threshold=2.5"])
    out, metrics = compute_advantages(cfg, None, batch())
    assert out["rollout_is_weights"][0].tolist() == pytest.approx([2.0, 1.0])  # 3 capped at 2
    assert out["response_mask"][0].tolist() == [0, 1]  # ratio 3 > 2.5: rejected
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(3.0)
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(1 / 6)


def test_optimal_token_baseline_gets_old_log_probs_and_sum_pi_squared():
    cfg = load_config(overrides=["algorithm.adv_estimator=optimal_token_baseline"])
    out, _ = compute_advantages(cfg, None, batch())
    # group a: w = [.5, .5] and [0, .5] -> the hand-computed example of test_algorithms_parity
    assert out["advantages"][0].tolist() == pytest.approx([0.0, 1 / 3], abs=1e-6)
    assert out["advantages"][1].tolist() == pytest.approx([-1.0, -2 / 3], abs=1e-6)


def test_pf_ppo_resamples_towards_extreme_rewards():
    torch.manual_seed(0)
    cfg = load_config(overrides=["algorithm.use_pf_ppo=true", "algorithm.pf_ppo.reweight_method=max_min"])
    out, metrics = compute_advantages(cfg, None, batch())
    assert len(out) == 4 and 0 < metrics["pf_ppo/unique_fraction"] <= 1
    # scores 1, 0, 2, 0: max 2 and min 0 are kept; the middle response (1) is filtered out
    assert 1.0 not in out["token_level_scores"].sum(-1).tolist()
