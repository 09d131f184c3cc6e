"""Eval metrics: pure functions over scored generations (no torch, no I/O).

Conventions (each tested with hand-computed numbers in tests/unit/test_eval.py):

- A *row* is one sampled response: `prompt_id`, `data_source`, `score`, `correct`, `answer`.
  Rows of one prompt share `prompt_id`; every prompt has the same number of samples n.
- mean@n   = mean over prompts of the mean score of its n samples (equal n per prompt, so
             also the mean over all rows). It is the reward's average, partial credit included.
- pass@k   = mean over prompts of the unbiased estimator 1 − C(n−c, k) / C(n, k)
             (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), where
             c of the n samples are correct. Needs k ≤ n.
- maj@n    = fraction of prompts whose majority answer is correct. Votes are the scorer's
             extracted answers (`pred`), numbers compared by value ("18.0" = "18"); a sample
             without an extracted answer abstains. Ties go to the answer seen first.
- mean@n/se = bootstrap standard error of mean@n: prompts resampled with replacement
             (the prompt is the independent unit, its n samples are not), B resamples, a
             seeded generator, standard deviation (ddof=1) of the resampled means.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from fractions import Fraction

DEFAULT_BOOTSTRAP = 1000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt: n samples, c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): the numerically stable form of the binomial ratio.
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def vote_key(answer) -> str | None:
    """Normalize an extracted answer for voting: numbers by value, text stripped."""
    if answer is None:
        return None
    s = str(answer).strip()
    if not s:
        return None
    num = s.replace(",", "").replace("$", "").strip()
    try:
        return str(Fraction(num))  # "18.0", "18", "36/2" -> "18"
    except (ValueError, ZeroDivisionError):
        return s


def majority_correct(answers: list, correct: list[bool]) -> bool:
    """Is the most common answer correct? Abstentions (None) don't vote; ties: first seen."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        key = vote_key(a)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return False
    winner = max(counts, key=lambda a: (counts[a], -first[a]))
    return bool(correct[first[winner]])


def bootstrap_means(values: list[float], resamples: list[list[int]]) -> list[float]:
    """Mean of `values` under each list of resampled indices."""
    return [math.fsum(values[i] for i in idx) / len(idx) for idx in resamples]


def bootstrap_se(values: list[float], seed: int = 0, num_resamples: int = DEFAULT_BOOTSTRAP) -> float:
    """Bootstrap standard error of the mean of `values` (seeded: same input, same output)."""
    if len(values) < 2 or min(values) == max(values):
        return 0.0
    rng = random.Random(seed)
    n = len(values)
    resamples = [[rng.randrange(n) for _ in range(n)] for _ in range(num_resamples)]
    return _std(bootstrap_means(values, resamples))


def _std(xs: list[float]) -> float:
    mean = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def group_by_prompt(rows: list[dict]) -> dict:
    """prompt_id -> its rows, sorted by sample number; prompts in order of first appearance."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[r["prompt_id"]].append(r)
    for g in groups.values():
        g.sort(key=lambda r: r.get("sample", 0))
    return groups


def source_metrics(prompts: list[list[dict]], ks: list[int], seed: int,
                   num_resamples: int = DEFAULT_BOOTSTRAP) -> dict:
    """Metrics of one data source; `prompts` is a list of each prompt's sample rows."""
    n = len(prompts[0])
    means = [sum(r["score"] for r in p) / n for p in prompts]
    out = {"num_prompts": len(prompts), "n": n}
    out[f"mean@{n}"] = sum(means) / len(means)
    out[f"mean@{n}/se"] = bootstrap_se(means, seed, num_resamples)
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = _avg(pass_at_k(n, sum(bool(r["correct"]) for r in p), k) for p in prompts)
    out[f"maj@{n}"] = _avg(float(majority_correct([r.get("answer") for r in p],
                                                  [bool(r["correct"]) for r in p])) for p in prompts)
    out["errors"] = sum(1 for p in prompts for r in p if r.get("error"))
    return out


def _avg(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def compute_metrics(rows: list[dict], ks: list[int] | None = None, seed: int = 0,
                    num_resamples: int = DEFAULT_BOOTSTRAP) -> dict:
    """data_source -> metrics, plus "all" over every prompt when there are several sources.

    Raises ValueError when prompts have different sample counts (pass@k would mix n's).
    """
    if not rows:
        raise ValueError("no generations to compute metrics from")
    groups = group_by_prompt(rows)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"prompts have different numbers of samples ({sorted(sizes)}); "
                         "every prompt needs the same n")
    n = sizes.pop()
    ks = sorted(set(ks or default_ks(n)))
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"k={bad} not in 1..n={n}")
    by_source: dict[str, list[list[dict]]] = defaultdict(list)
    for g in groups.values():
        by_source[str(g[0]["data_source"])].append(g)
    out = {ds: source_metrics(ps, ks, seed, num_resamples) for ds, ps in sorted(by_source.items())}
    if len(by_source) > 1:
        out["all"] = source_metrics(list(groups.values()), ks, seed, num_resamples)
    return out
