"""Rewards: a registry of rule scorers keyed by data_source, user functions loaded from
'path.py:function', and a process pool that scores with timeouts and never raises.

    from verlcli.rewards import RewardScorer
    with RewardScorer(fn_spec=None, timeout_s=10, num_workers=2) as scorer:
        scorer.score([{"data_source": "gsm8k", "response": "... #### 18", "ground_truth": "18",
                       "extra_info": {}}])   # -> [{"score": 1.0, "error": None, "acc": 1.0, ...}]
"""

from verlcli.rewards.pool import RewardScorer, score_item
from verlcli.rewards.registry import REWARDS, canonical_name, get_scorer, register
from verlcli.rewards.user import load_user_fn

__all__ = ["REWARDS", "RewardScorer", "canonical_name", "get_scorer", "load_user_fn", "register", "score_item"]
