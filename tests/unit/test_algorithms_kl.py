"""KL estimators, straight-through variants, controllers and the reward penalty."""

import math

import pytest
import torch

from verlcli.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    get_kl_controller,
    kl_penalty,
)
from verlcli.errors import UserError

LOGP = [-1.0, -2.0]
REF = [-1.5, -1.0]  # d = log π − log π_ref = 0.5, −1


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


@pytest.mark.parametrize(
    "names, expected",
    [
        (("k1", "kl"), [0.5, -1.0]),
        (("abs",), [0.5, 1.0]),
        (("k2", "mse"), [0.125, 0.5]),  # ½·d²
        # e^{−d} − 1 + d: e^{−0.5} − 0.5 = 0.1065307, e^{1} − 2 = 0.7182818
        (("k3", "low_var_kl"), [0.1065307, 0.7182818]),
    ],
)
def test_estimators_and_aliases(names, expected):
    for name in names:
        close(kl_penalty(torch.tensor(LOGP), torch.tensor(REF), name), expected)


def test_k3_is_clamped_for_extreme_log_ratios():
    # d = +50: −d clamped to −20 → e^{−20} + 19 ≈ 19 → clamped to 10
    # d = −50: −d clamped to 20 → e^{20} − 21 → clamped to 10
    out = kl_penalty(torch.tensor([50.0, -50.0]), torch.tensor([0.0, 0.0]), "k3")
    close(out, [10.0, 10.0])


@pytest.mark.parametrize(
    "name, value",
    [("k3+", [0.1065307, 0.7182818]), ("low_var_kl+", [0.1065307, 0.7182818]),
     ("k1+", [0.5, -1.0]), ("abs+", [0.5, 1.0]), ("k2+", [0.125, 0.5])],
)
def test_straight_through_value_of_the_estimator_gradient_of_k2(name, value):
    logp = torch.tensor(LOGP, requires_grad=True)
    out = kl_penalty(logp, torch.tensor(REF), name)
    close(out, value)
    out.sum().backward()
    close(logp.grad, [0.5, -1.0])  # d(½d²)/d log π = d


def test_unknown_estimator():
    with pytest.raises(UserError, match="algorithm.kl_penalty"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "full")


def test_controllers():
    fixed = FixedKLController(0.2)
    fixed.update(current_kl=5.0, n_steps=100)
    assert fixed.value == 0.2
    ctl = AdaptiveKLController(init_kl_coef=0.1, target_kl=0.05, horizon=100)
    ctl.update(current_kl=0.1, n_steps=10)  # error 0.1/0.05 − 1 = 1 → clipped 0.2; ×(1 + 0.2·10/100)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=0.04, n_steps=10)  # error −0.2 → ×0.98
    assert ctl.value == pytest.approx(0.09996)
    ctl.update(current_kl=0.055, n_steps=10)  # error 0.1 (inside the band) → ×1.01
    assert ctl.value == pytest.approx(0.09996 * 1.01)


def test_get_kl_controller():
    assert isinstance(get_kl_controller("fixed", kl_coef=0.3), FixedKLController)
    ctl = get_kl_controller("adaptive", kl_coef=0.3, target_kl=0.1, horizon=10)
    assert isinstance(ctl, AdaptiveKLController) and ctl.value == 0.3
    with pytest.raises(UserError, match="horizon"):
        get_kl_controller("adaptive", kl_coef=0.3, target_kl=0.1, horizon=0)
    with pytest.raises(UserError, match="kl_ctrl.type"):
        get_kl_controller("pid")


def test_apply_kl_penalty():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -math.inf]])  # −inf in padding
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ctl = AdaptiveKLController(init_kl_coef=0.1, target_kl=1.0, horizon=10)
    rewards, metrics = apply_kl_penalty(scores, old, ref, mask, ctl, kind="k1")
    # k1 = old − ref: [0.5, 0, −0.5] and [−0.5, 0, (padding) 0]; rewards = scores − 0.1·k1
    close(rewards, [[-0.05, 0.0, 1.05], [0.05, 2.0, 0.0]])
    # per-response mean KL 0 and −0.25 → batch mean −0.125
    assert metrics["reward_kl_penalty"] == pytest.approx(-0.125)
    assert metrics["reward_kl_penalty_coeff"] == pytest.approx(0.1)  # the β used
    # then updated: error clip(−0.125 − 1) = −0.2, n_steps = batch size 2 → ×(1 − 0.2·2/10)
    assert ctl.value == pytest.approx(0.096)
