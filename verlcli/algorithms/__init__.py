"""RL algorithms as pure tensor functions: advantage estimators, policy losses, loss
aggregation, KL estimators and controllers, value loss, entropy, DAPO helpers.

Selected by name from the config through registries (`ADV_ESTIMATORS`, `POLICY_LOSSES`,
`KL_ESTIMATORS`); every convention is written in the function's docstring and pinned by
hand-computed tests in tests/unit/test_algorithms_*.py.
"""

from verlcli.algorithms.advantages import ADV_ESTIMATORS, needs_baseline, needs_critic
from verlcli.algorithms.aggregation import (
    LOSS_AGG_MODES,
    agg_loss,
    count_tokens_and_seqs,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from verlcli.algorithms.dapo import dynamic_sampling_filter, overlong_reward_penalty
from verlcli.algorithms.entropy import (
    entropy_from_logits,
    entropy_from_logits_chunked,
    logprobs_from_logits,
)
from verlcli.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    get_kl_controller,
    kl_penalty,
)
from verlcli.algorithms.pf_ppo import PF_PPO_METHODS, pf_ppo_resample
from verlcli.algorithms.policy_loss import POLICY_LOSSES, PolicyLossConfig
from verlcli.algorithms.registry import Needs, Registry
from verlcli.algorithms.rollout_correction import rollout_correction
from verlcli.algorithms.token_baseline import optimal_token_baseline, tir_optimal_token_baseline
from verlcli.algorithms.value import value_loss

__all__ = [
    "ADV_ESTIMATORS",
    "KL_ESTIMATORS",
    "Needs",
    "LOSS_AGG_MODES",
    "PF_PPO_METHODS",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "PolicyLossConfig",
    "Registry",
    "agg_loss",
    "apply_kl_penalty",
    "count_tokens_and_seqs",
    "dynamic_sampling_filter",
    "entropy_from_logits",
    "entropy_from_logits_chunked",
    "get_kl_controller",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "needs_baseline",
    "needs_critic",
    "optimal_token_baseline",
    "overlong_reward_penalty",
    "pf_ppo_resample",
    "rollout_correction",
    "tir_optimal_token_baseline",
    "value_loss",
]
