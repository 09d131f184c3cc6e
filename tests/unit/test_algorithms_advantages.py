"""Advantage estimators against hand-computed numbers."""

import numpy as np
import pytest
import torch

from verlcli.algorithms import ADV_ESTIMATORS
from verlcli.errors import UserError


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def outcome(scores, lengths, width=3):
    """Outcome rewards: the score on the last valid token; mask from the lengths."""
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    rewards = torch.zeros(len(scores), width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        if n:
            rewards[i, n - 1] = s
    return rewards, mask


# Groups: a = {1, 0} (mixed), b = {1, 1} (all equal), c = {2} (alone), d = {fully masked}.
GRPO_REWARDS, GRPO_MASK = outcome([1.0, 0.0, 1.0, 1.0, 2.0, 0.0], [2, 3, 1, 2, 2, 0])
GRPO_INDEX = ["a", "a", "b", "b", "c", "d"]


def test_grpo():
    adv, ret = ADV_ESTIMATORS.get("grpo")(GRPO_REWARDS, GRPO_MASK, GRPO_INDEX)
    # a: mean 0.5, unbiased std sqrt(((0.5)² + (0.5)²)/1) = 0.7071068
    #    → ±0.5 / (0.7071068 + 1e-6) = ±0.7071058
    # b: std 0 → 0 / (0 + 1e-6) = 0
    # c: alone → verl's mean 0, std 1 → 2 / (1 + 1e-6) = 1.999998
    # d: fully masked → 0 everywhere
    a, z = 0.7071058, 0.0
    close(adv, [[a, a, z], [-a, -a, -a], [z, z, z], [z, z, z], [1.999998, 1.999998, z], [z, z, z]])
    assert torch.equal(adv, ret)


def test_dr_grpo_without_std():
    adv, _ = ADV_ESTIMATORS.get("grpo")(GRPO_REWARDS, GRPO_MASK, GRPO_INDEX, norm_adv_by_std=False)
    # r − group mean: a → ±0.5, b → 0, c (alone, mean 0) → 2
    close(adv, [[0.5, 0.5, 0], [-0.5, -0.5, -0.5], [0, 0, 0], [0, 0, 0], [2, 2, 0], [0, 0, 0]])


def test_grpo_index_types_and_equal_float_rewards():
    ints = ADV_ESTIMATORS.get("grpo")(GRPO_REWARDS, GRPO_MASK, torch.tensor([0, 0, 1, 1, 2, 3]))[0]
    arr = ADV_ESTIMATORS.get("grpo")(GRPO_REWARDS, GRPO_MASK, np.array(GRPO_INDEX, dtype=object))[0]
    ref = ADV_ESTIMATORS.get("grpo")(GRPO_REWARDS, GRPO_MASK, GRPO_INDEX)[0]
    assert torch.equal(ints, ref) and torch.equal(arr, ref)
    # 0.1 three times: float summing leaves a residue that 1/(std + 1e-6) would amplify;
    # an all-equal group must give exactly 0.
    rewards, mask = outcome([0.1, 0.1, 0.1], [1, 1, 1], width=1)
    adv, _ = ADV_ESTIMATORS.get("grpo")(rewards, mask, [7, 7, 7])
    assert adv.abs().max().item() == 0.0


def test_grpo_rejects_misaligned_index():
    with pytest.raises(ValueError):
        ADV_ESTIMATORS.get("grpo")(GRPO_REWARDS, GRPO_MASK, ["a", "b"])


def test_rloo():
    rewards, mask = outcome([1.0, 0.0, 2.0, 3.0], [1, 1, 1, 1], width=1)
    adv, ret = ADV_ESTIMATORS.get("rloo")(rewards, mask, ["g", "g", "g", "alone"])
    # leave-one-out means: 1 − (0+2)/2 = 0; 0 − (1+2)/2 = −1.5; 2 − (1+0)/2 = 1.5
    # a lone response keeps its raw reward (verl): 3
    close(adv, [[0.0], [-1.5], [1.5], [3.0]])
    assert torch.equal(adv, ret)


def test_opo():
    rewards, mask = outcome([1.0, 0.0, 5.0], [1, 3, 2])
    adv, _ = ADV_ESTIMATORS.get("opo")(rewards, mask, [0, 0, 1])
    # baseline = length-weighted mean = (1·1 + 3·0) / (1 + 3) = 0.25 → 0.75, −0.25
    # a lone response has baseline 0 → 5
    close(adv, [[0.75, 0, 0], [-0.25, -0.25, -0.25], [5, 5, 0]])


def test_remax():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the 7 is padding and must be ignored
    adv, ret = ADV_ESTIMATORS.get("remax")(rewards, mask, None, reward_baselines=torch.tensor([0.5, 2.0]))
    # reward-to-go: [1, 1, 1] and [1.5, 1, 0]; minus the greedy baseline on valid tokens
    close(ret, [[1, 1, 1], [1.5, 1, 0]])
    close(adv, [[0.5, 0.5, 0.5], [-0.5, -1, 0]])
    with pytest.raises(ValueError):
        ADV_ESTIMATORS.get("remax")(rewards, mask, None)


def test_gpg():
    rewards, mask = outcome([1.0, 0.0, 0.0, 0.0], [1, 1, 1, 1], width=1)
    adv, _ = ADV_ESTIMATORS.get("gpg")(rewards, mask, ["a", "a", "b", "b"])
    # α = B / #nonzero = 4 / 1 = 4; group means 0.5 and 0 → 4·(±0.5), 0, 0
    close(adv, [[2.0], [-2.0], [0.0], [0.0]])
    adv, _ = ADV_ESTIMATORS.get("gpg")(rewards * 0, mask, ["a", "a", "b", "b"])
    close(adv, [[0.0]] * 4)  # no reward at all: α's denominator is clamped to 1, no NaN


def test_grpo_passk():
    rewards, mask = outcome([1.0, 0.0, 0.5, 1.0, 1.0, 0.0], [1, 1, 1, 1, 1, 1], width=1)
    index = ["g", "g", "g", "tie", "tie", "tie"]
    adv, _ = ADV_ESTIMATORS.get("grpo_passk")(rewards, mask, index)
    # g: best 1, second 0.5 → gap 0.5; unbiased std of {1, 0, 0.5} = sqrt(0.5/2) = 0.5
    #    → only the best gets 0.5 / (0.5 + 1e-6) = 0.999998
    # tie: two share the best → gap 0 for everyone
    close(adv, [[0.999998], [0.0], [0.0], [0.0], [0.0], [0.0]])
    adv, _ = ADV_ESTIMATORS.get("grpo_passk")(rewards, mask, index, norm_adv_by_std=False)
    close(adv, [[0.5], [0.0], [0.0], [0.0], [0.0], [0.0]])
    with pytest.raises(UserError, match="rollout.n"):
        ADV_ESTIMATORS.get("grpo_passk")(rewards[:1], mask[:1], ["alone"])


def test_reinforce_plus_plus():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = ADV_ESTIMATORS.get("reinforce_plus_plus")(rewards, mask, None, gamma=0.5)
    # returns-to-go with γ = 0.5: [0.25, 0.5, 1] and [1, 2, (padding) 0]
    close(ret, [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]])
    # whitened over the 5 valid values: mean 0.95, deviations −0.7 −0.45 0.05 | 0.05 1.05,
    # unbiased var 1.8 / 4 = 0.45, std 0.6708204 (1/std = 1.4907120)
    close(adv, [[-1.0434984, -0.6708204, 0.0745356], [0.0745356, 1.5652476, 0.0]])


def test_reinforce_plus_plus_baseline():
    rewards, mask = outcome([1.0, 0.0, 3.0], [2, 1, 1])
    adv, ret = ADV_ESTIMATORS.get("reinforce_plus_plus_baseline")(rewards, mask, ["a", "a", "b"])
    # centred scores: 0.5, −0.5, 3 (alone: mean 0); on tokens: 0.5 0.5 | −0.5 | 3
    # whitened over those 4 tokens: mean 0.875, deviations −0.375 −0.375 −1.375 2.125,
    # unbiased var 6.6875 / 3 = 2.2291667, std 1.4930394
    close(adv, [[-0.2511655, -0.2511655, 0], [-0.9209402, 0, 0], [1.4232713, 0, 0]])
    assert torch.equal(adv, ret)


def test_gae_gamma_lambda_one():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = ADV_ESTIMATORS.get("gae")(rewards, torch.ones(1, 3), None, values=values)
    # γ = λ = 1: A_t = (sum of future rewards) − V_t = [0.5, 0.4, 0.3]; returns = A + V = 1
    close(ret, [[1.0, 1.0, 1.0]])
    # whitened: mean 0.4, deviations ±0.1, unbiased var 0.02/2 = 0.01 → [1, 0, −1]
    close(adv, [[1.0, 0.0, -1.0]])


def test_gae_padding_and_masked_middle_token():
    g = dict(gamma=0.5, lam=0.5)
    # Right padding: t=1 δ = 1 + 0.5·0 − 2 = −1 → A1 = −1;
    #                t=0 δ = 0 + 0.5·2 − 1 = 0 → A0 = 0 + 0.25·(−1) = −0.25.  returns = A + V.
    adv, ret = ADV_ESTIMATORS.get("gae")(
        torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1, 1, 0]]), None,
        values=torch.tensor([[1.0, 2.0, 3.0]]), **g)
    close(ret, [[0.75, 1.0, 0.0]])
    # whitened: mean −0.625, deviations ±0.375, unbiased var 0.28125 → ±0.7071068
    close(adv, [[0.7071068, -0.7071068, 0.0]])
    # A masked token in the middle is skipped: its value 9 is never used, and the
    # running A and next value pass through it.  t=2 δ = 1 − 2 = −1 → A2 = −1;
    # t=0 δ = 0 + 0.5·2 − 1 = 0 → A0 = −0.25 (same numbers as above).
    adv, ret = ADV_ESTIMATORS.get("gae")(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1, 0, 1]]), None,
        values=torch.tensor([[1.0, 9.0, 2.0]]), **g)
    close(ret, [[0.75, 0.0, 1.0]])
    close(adv, [[0.7071068, 0.0, -0.7071068]])
    with pytest.raises(ValueError):
        ADV_ESTIMATORS.get("gae")(torch.zeros(1, 3), torch.ones(1, 3), None)


@pytest.mark.parametrize("name", ADV_ESTIMATORS.names())
def test_all_masked_batch_gives_zeros_not_nan(name):
    zeros = torch.zeros(4, 3)
    adv, ret = ADV_ESTIMATORS.get(name)(
        torch.ones(4, 3), zeros.long(), [0, 0, 1, 1], values=torch.ones(4, 3),
        reward_baselines=torch.ones(4), old_log_probs=zeros - 1, sum_pi_squared=zeros + 0.5)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert adv.abs().sum() == 0
