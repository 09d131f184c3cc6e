"""KL estimators between the policy and the reference model, and KL controllers.

Two uses: as a penalty folded into the token rewards before the advantage
(`apply_kl_penalty`, PPO-style, `algorithm.use_kl_in_reward`), or as a loss term in the
actor (GRPO-style `actor.kl_loss_type`). Both take per-token log-probs of the sampled
tokens, d = log π − log π_ref, and one of Schulman's estimators
(http://joschu.net/blog/kl-approx.html), named as in verl:

- `k1` (alias `kl`): d. Unbiased for KL(π‖π_ref), high variance, can be negative.
- `abs`: |d|.
- `k2` (alias `mse`): ½·d². Low variance, biased; its gradient d·∇log π is the unbiased
  gradient of KL.
- `k3` (alias `low_var_kl`): e^{−d} − 1 + d ≥ 0. Unbiased and low variance. As in verl,
  −d is clamped to [−20, 20] before `exp` and the result to [−10, 10], so a token whose
  log-prob collapsed cannot produce inf.
- `<name>+` (e.g. `k3+`, `low_var_kl+`, `k1+`): straight-through — the VALUE of <name>
  with the GRADIENT of k2 (value k2 − sg(k2) + sg(<name>)), since k1 and k3 have the right
  expectation but a biased gradient. `k2+` / `mse+` are just k2.
"""

from __future__ import annotations

import torch

from verlcli.algorithms.aggregation import masked_mean
from verlcli.algorithms.catalog import KL_BASE, KL_ESTIMATORS
from verlcli.errors import UserError


@KL_ESTIMATORS.register("k1", "kl")
def _k1(logprob, ref_logprob):
    return logprob - ref_logprob


@KL_ESTIMATORS.register("abs")
def _abs(logprob, ref_logprob):
    return (logprob - ref_logprob).abs()


@KL_ESTIMATORS.register("k2", "mse")
def _k2(logprob, ref_logprob):
    return 0.5 * (logprob - ref_logprob).square()


@KL_ESTIMATORS.register("k3", "low_var_kl")
def _k3(logprob, ref_logprob):
    neg = (ref_logprob - logprob).clamp(-20.0, 20.0)
    return (neg.exp() - neg - 1).clamp(-10.0, 10.0)


def _register_straight_through():
    for name in KL_BASE:
        forward = KL_ESTIMATORS.get(name)

        def straight_through(logprob, ref_logprob, _forward=forward):
            surrogate = _k2(logprob, ref_logprob)
            return surrogate - surrogate.detach() + _forward(logprob, ref_logprob).detach()

        KL_ESTIMATORS.register(name + "+")(_k2 if forward is _k2 else straight_through)


_register_straight_through()


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "low_var_kl",
               config_key: str = "algorithm.kl_penalty") -> torch.Tensor:
    """Per-token KL estimate `[B, T]` of the given `kind` (see the module docstring).
    `config_key` is the key named if `kind` is unknown (the actor's KL loss passes
    `actor.kl_loss_type`)."""
    return KL_ESTIMATORS.get(kind, config_key)(logprob, ref_logprob)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv:1909.08593): steer the observed KL towards `target_kl`.

    e = clip(current_kl / target_kl − 1, −0.2, 0.2);  value ← value · (1 + e · n_steps / horizon)
    `n_steps` is the number of samples the KL was measured on (verl passes the batch size).
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def get_kl_controller(kind: str = "fixed", kl_coef: float = 0.001, target_kl: float | None = None,
                      horizon: int | None = None):
    """`fixed` or `adaptive` (`algorithm.kl_ctrl.type`); adaptive needs target_kl > 0 and
    horizon > 0."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if not horizon or horizon <= 0 or not target_kl or target_kl <= 0:
            raise UserError(
                f"adaptive KL control needs algorithm.kl_ctrl.target_kl > 0 and "
                f"algorithm.kl_ctrl.horizon > 0 (got {target_kl}, {horizon})",
                fix="set e.g. algorithm.kl_ctrl.target_kl=0.1 algorithm.kl_ctrl.horizon=10000",
            )
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise UserError(
        f"unknown KL controller {kind!r} for algorithm.kl_ctrl.type",
        fix="set algorithm.kl_ctrl.type to fixed or adaptive",
    )


def apply_kl_penalty(token_level_scores: torch.Tensor, old_log_prob: torch.Tensor,
                     ref_log_prob: torch.Tensor, response_mask: torch.Tensor, kl_ctrl,
                     kind: str = "kl") -> tuple[torch.Tensor, dict[str, float]]:
    """rewards = scores − β·KL_t on every valid token (β = `kl_ctrl.value`), as verl.

    The KL reported and fed to the controller is the batch mean of each response's
    per-token mean KL; the controller is then updated with n_steps = batch size, so the
    metrics show the β that was USED (before the update).
    Metrics: `reward_kl_penalty` (that KL), `reward_kl_penalty_coeff` (β).
    """
    mask = response_mask.to(token_level_scores.dtype)
    kld = kl_penalty(old_log_prob, ref_log_prob, kind).to(token_level_scores.dtype)
    kld = torch.where(mask.bool(), kld, torch.zeros_like(kld))  # padding may hold -inf log-probs
    beta = kl_ctrl.value
    rewards = token_level_scores - beta * kld
    current_kl = float(masked_mean(kld, mask, dim=-1).mean())
    kl_ctrl.update(current_kl=current_kl, n_steps=token_level_scores.shape[0])
    return rewards, {"reward_kl_penalty": current_kl, "reward_kl_penalty_coeff": beta}
