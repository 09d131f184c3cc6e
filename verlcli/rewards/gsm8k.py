"""GSM8K scorer (data sources `openai/gsm8k`, `gsm8k`).

Two modes, as in verl's gsm8k reward:
- strict (default): the answer is the number after the LAST "####" anywhere in the response.
  No "####" at all scores 0.0; a "####" answer that is wrong scores `format_score`
  (default 0.0, i.e. no credit for format alone); a correct one scores `correct_score` (1.0).
- flexible: the answer is the last number in the response, "####" or not.

Unlike verl we search the whole response rather than its last 300 characters, and compare by
value: "18.0", "$18" and "18" are equal, as are "1,000" and "1000".
Returns a dict: score, acc (1.0 if correct), format_ok ("####" with a number present), pred.
"""

from __future__ import annotations

from verlcli.rewards.numeric import last_hash_answer, last_number, numbers_equal


def score_gsm8k(
    data_source: str,
    response: str,
    ground_truth: str,
    extra_info: dict | None = None,
    *,
    method: str = "strict",
    format_score: float = 0.0,
    correct_score: float = 1.0,
) -> dict:
    if method not in ("strict", "flexible"):
        raise ValueError(f"gsm8k method must be 'strict' or 'flexible', got {method!r}")
    hashed = last_hash_answer(response)
    pred = hashed if method == "strict" else last_number(response)
    correct = pred is not None and numbers_equal(pred, ground_truth)
    if correct:
        score = correct_score
    elif pred is not None:
        score = format_score
    else:
        score = 0.0
    return {"score": float(score), "acc": float(correct), "format_ok": hashed is not None, "pred": pred}
