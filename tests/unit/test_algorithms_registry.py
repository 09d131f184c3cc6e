"""Registries: errors that name the key, and every registered name is callable."""

import pytest
import torch

from verlcli.algorithms import (
    ADV_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PolicyLossConfig,
    Registry,
    kl_penalty,
    needs_baseline,
    needs_critic,
)
from verlcli.errors import UserError


def test_unknown_name_names_key_value_and_choices():
    with pytest.raises(UserError) as err:
        ADV_ESTIMATORS.get("grp0")
    text = str(err.value)
    assert "grp0" in text and "algorithm.adv_estimator" in text
    assert "grpo" in err.value.fix and "gae" in err.value.fix
    with pytest.raises(UserError, match="actor.policy_loss"):
        POLICY_LOSSES.get("ppo2")
    with pytest.raises(UserError, match="actor.kl_loss_type"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4", config_key="actor.kl_loss_type")


def test_register_and_duplicates():
    reg = Registry("thing", "x.thing")

    @reg.register("a", "alias")
    def a():
        return 1

    assert reg.get("alias") is a and "a" in reg and reg.names() == ["a", "alias"] and len(reg) == 2
    with pytest.raises(ValueError):
        reg.register("a")(lambda: 2)
    reg.register("a")(a)  # re-registering the same function is harmless


def test_expected_names():
    assert set(ADV_ESTIMATORS) == {
        "gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
        "remax", "opo", "gpg", "grpo_passk", "grpo_vectorized", "rloo_vectorized",
        "optimal_token_baseline", "tir_optimal_token_baseline",
    }
    assert set(POLICY_LOSSES) == {"vanilla", "gspo", "clip_cov", "kl_cov", "cispo", "gpg", "sapo",
                                  "geo_mean", "bypass_mode"}
    base = {"k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"}
    assert set(KL_ESTIMATORS) == base | {name + "+" for name in base}


def test_needs_critic_and_baseline():
    assert [n for n in ADV_ESTIMATORS if needs_critic(n)] == ["gae"]
    assert [n for n in ADV_ESTIMATORS if needs_baseline(n)] == ["remax"]
    with pytest.raises(UserError):
        needs_critic("nope")


# One small batch: 2 groups of 2 responses, one response fully masked.
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]])
REWARDS = torch.tensor([[0, 1.0, 0], [0, 0, 0.5], [0, 0, 0], [2.0, 0, 0]])


@pytest.mark.parametrize("name", ADV_ESTIMATORS.names())
def test_every_estimator_runs_with_the_uniform_call(name):
    adv, ret = ADV_ESTIMATORS.get(name)(
        REWARDS, MASK, index=["p", "p", "q", "q"], values=torch.full((4, 3), 0.1),
        gamma=0.9, lam=0.95, norm_adv_by_std=True, reward_baselines=torch.zeros(4),
        old_log_probs=torch.full((4, 3), -0.5), sum_pi_squared=torch.full((4, 3), 0.4),
        something_new=1,  # unknown keywords are ignored, so the trainer can pass extras
    )
    assert adv.shape == ret.shape == (4, 3)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert adv[2].abs().sum() == 0  # the fully masked response gets nothing
    assert (adv[MASK == 0] == 0).all()


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_every_policy_loss_runs_with_the_uniform_call(name):
    log_prob = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.5, -0.5], [-0.3, -2.0, -3.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, metrics = POLICY_LOSSES.get(name)(
        old, log_prob, adv, mask, "token-mean", PolicyLossConfig(), global_tokens=5,
        global_seqs=2, rollout_log_prob=old,
    )
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(metrics) >= {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert torch.isfinite(log_prob.grad).all() and log_prob.grad[0, 2] == 0


@pytest.mark.parametrize("name", KL_ESTIMATORS.names())
def test_every_kl_estimator_runs(name):
    out = kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), name)
    assert out.shape == (2,) and torch.isfinite(out).all()
