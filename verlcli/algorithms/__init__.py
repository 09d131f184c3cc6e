"""RL algorithms as pure tensor functions: advantage estimators, policy losses, loss
aggregation, KL estimators and controllers, value loss, entropy, DAPO helpers, rollout
correction, PF-PPO.

Selected by name from the config through registries (`ADV_ESTIMATORS`, `POLICY_LOSSES`,
`KL_ESTIMATORS`, declared in catalog.py); every convention is written in the function's
docstring and pinned by hand-computed tests in tests/unit/test_algorithms_*.py.

Attributes load lazily (PEP 562): `from verlcli.algorithms import ADV_ESTIMATORS` imports
only the torch-free catalog, so a config load checks names without importing torch.
"""

from importlib import import_module

_WHERE = {
    "catalog": ["ADV_ESTIMATORS", "KL_ESTIMATORS", "POLICY_LOSSES"],
    "registry": ["Needs", "Registry"],
    "advantages": ["needs_baseline", "needs_critic"],
    "aggregation": ["LOSS_AGG_MODES", "agg_loss", "count_tokens_and_seqs", "masked_mean", "masked_sum",
                    "masked_whiten"],
    "dapo": ["dynamic_sampling_filter", "overlong_reward_penalty"],
    "entropy": ["entropy_from_logits", "entropy_from_logits_chunked", "logprobs_from_logits"],
    "kl": ["AdaptiveKLController", "FixedKLController", "apply_kl_penalty", "get_kl_controller", "kl_penalty"],
    "pf_ppo": ["PF_PPO_METHODS", "pf_ppo_resample"],
    "policy_loss": ["PolicyLossConfig"],
    "rollout_correction": ["rollout_correction"],
    "token_baseline": ["optimal_token_baseline", "tir_optimal_token_baseline"],
    "value": ["value_loss"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'verlcli.algorithms' has no attribute {name!r}")
    value = getattr(import_module(f"verlcli.algorithms.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
