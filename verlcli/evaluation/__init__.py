"""`verl eval` as a library: generate with a rollout engine, score with the reward registry,
report mean@n, pass@k, maj@n and a bootstrap standard error per data source.

    metrics.py   pure metric functions (pass@k estimator, majority vote, bootstrap)
    pipeline.py  generate → score → metrics → OUT/generations.jsonl + OUT/metrics.json
"""

from verlcli.evaluation.metrics import bootstrap_se, compute_metrics, default_ks, majority_correct, pass_at_k
from verlcli.evaluation.pipeline import (EvalOptions, EvalResult, evaluate, metrics_table, read_generations,
                                         score_rows, write_generations)

__all__ = ["EvalOptions", "EvalResult", "bootstrap_se", "compute_metrics", "default_ks", "evaluate",
           "majority_correct", "metrics_table", "pass_at_k", "read_generations", "score_rows",
           "write_generations"]
