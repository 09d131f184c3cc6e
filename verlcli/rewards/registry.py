"""Rule rewards keyed by `data_source` (the parquet column that selects the scorer).

A scorer is `fn(data_source, response, ground_truth, extra_info) -> float | dict`; a dict has
`score` plus any extra fields (acc, format_ok, pred, ...), which are logged per data source.
verl's own data source names are aliases, so parquet made by verl's preprocessing scripts
scores without changes. Add your own with:

    from verlcli.rewards.registry import register

    @register("my_source", "my_source_v2")
    def my_scorer(data_source, response, ground_truth, extra_info):
        return float(response.strip() == ground_truth)
"""

from __future__ import annotations

from typing import Callable

from verlcli.errors import UserError
from verlcli.rewards.arithmetic import score_arithmetic
from verlcli.rewards.countdown import score_countdown
from verlcli.rewards.gsm8k import score_gsm8k
from verlcli.rewards.math_reward import score_math

Scorer = Callable[..., "float | dict"]

# data_source name -> scorer. Several names share one scorer (aliases).
REWARDS: dict[str, Scorer] = {}
# data_source name -> canonical name of its scorer family (for per-scorer keyword arguments).
CANONICAL: dict[str, str] = {}


def register(*data_sources: str):
    """Decorator: score rows whose data_source is any of `data_sources` with this function.

    The first name is the canonical one (the key for per-scorer options in `RewardScorer`).
    """
    if not data_sources:
        raise ValueError("register() needs at least one data_source name")

    def deco(fn: Scorer) -> Scorer:
        for name in data_sources:
            REWARDS[name] = fn
            CANONICAL[name] = data_sources[0]
        return fn

    return deco


def canonical_name(data_source: str) -> str | None:
    return CANONICAL.get(data_source)


def get_scorer(data_source: str) -> Scorer:
    """The scorer for `data_source`; UserError naming the known sources when there is none."""
    try:
        return REWARDS[data_source]
    except (KeyError, TypeError):
        raise UserError(
            f"no reward function for data_source {data_source!r}; known: {', '.join(sorted(REWARDS))}",
            fix="set the parquet's data_source to one of those, or pass reward.fn=path.py:function",
        ) from None


register("gsm8k", "openai/gsm8k")(score_gsm8k)
register("math", "lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")(score_math)
register("countdown")(score_countdown)
register("arithmetic")(score_arithmetic)
