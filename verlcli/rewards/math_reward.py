"""MATH scorer (data sources `math`, `lighteval/MATH`, `DigitalLearningGmbH/MATH-lighteval`,
`HuggingFaceH4/MATH-500`).

The answer is the content of the LAST `\\boxed{...}` (or `\\fbox{...}`) in the response, with
nested braces balanced, so `\\boxed{\\frac{1}{2}}` reads as `\\frac{1}{2}`. Equivalence is
decided by the `math-verify` package (symbolic: `\\frac{1}{2}` equals `0.5`); if math-verify
cannot parse either side, the normalized strings are compared.
No box scores 0.0; a wrong box scores `format_score` (0.0); a correct one `correct_score` (1.0).
Returns a dict: score, acc, format_ok (a box was found), pred.

This module is also used by `verl prepare-data math` to read ground truths from solutions.
"""

from __future__ import annotations

import re
import threading


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces) or `\\boxed 5`; else None."""
    if not text:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):  # "\boxed 5": the answer runs to the next space or dollar sign
        rest = text[i + 1 :]
        return re.split(r"[\s$]", rest, maxsplit=1)[0] or None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut off inside the box


def _normalize(s: str) -> str:
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("dfrac", "frac")
    s = s.replace("tfrac", "frac").replace("^\\circ", "").replace("^{\\circ}", "").replace("\\$", "")
    return re.sub(r"\s+", "", s).rstrip(".")


def math_equal(pred: str, truth: str) -> bool:
    """Symbolic equivalence through math-verify, falling back to normalized text."""
    if _normalize(pred) == _normalize(truth):
        return True
    from math_verify import parse, verify  # heavy (sympy): only when a box must be checked

    # math-verify's timeouts use SIGALRM, which only works in a process's main thread.
    t = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{truth}}}", parsing_timeout=t)
    answer = parse(f"\\boxed{{{pred}}}", parsing_timeout=t)
    if not gold or not answer:
        return False
    return bool(verify(gold, answer, timeout_seconds=t))


def score_math(
    data_source: str,
    response: str,
    ground_truth: str,
    extra_info: dict | None = None,
    *,
    format_score: float = 0.0,
    correct_score: float = 1.0,
) -> dict:
    pred = last_boxed(response)
    if pred is None:
        return {"score": 0.0, "acc": 0.0, "format_ok": False, "pred": None}
    truth = last_boxed(ground_truth) or ground_truth  # accept a whole solution as ground truth too
    correct = math_equal(pred, str(truth))
    return {
        "score": float(correct_score if correct else format_score),
        "acc": float(correct),
        "format_ok": True,
        "pred": pred,
    }
