"""Arithmetic scorer (data source `arithmetic`, made by `verl prepare-data arithmetic`).

The answer is the number after the last "####". A response without "####" whose LAST number is
correct gets `fallback_score` (default 0.5): partial credit, so a small model is rewarded for
the right number while it still learns the format. Anything else scores 0.0.
Returns a dict: score, acc (1.0 if the answer read either way is correct), format_ok, pred.
"""

from __future__ import annotations

from verlcli.rewards.numeric import last_hash_answer, last_number, numbers_equal


def score_arithmetic(
    data_source: str,
    response: str,
    ground_truth: str,
    extra_info: dict | None = None,
    *,
    correct_score: float = 1.0,
    fallback_score: float = 0.5,
) -> dict:
    hashed = last_hash_answer(response)
    if hashed is not None:
        correct = numbers_equal(hashed, ground_truth)
        return {"score": correct_score if correct else 0.0, "acc": float(correct), "format_ok": True, "pred": hashed}
    pred = last_number(response)
    correct = pred is not None and numbers_equal(pred, ground_truth)
    return {"score": fallback_score if correct else 0.0, "acc": float(correct), "format_ok": False, "pred": pred}
