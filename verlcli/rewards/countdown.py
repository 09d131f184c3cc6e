"""Countdown scorer (data source `countdown`, made by `verl prepare-data countdown`).

Ground truth: JSON `{"target": 24, "numbers": [3, 5, 2, 8]}` (a dict is accepted too).
The answer is the expression in the last `<answer>...</answer>` (TinyZero's format) or, failing
that, the text after the last "####" up to the end of its line; a trailing "= 16" is ignored.
It is correct when it uses only + - * / and parentheses, each given number at most as often as
it was given (a multiset check), and evaluates exactly (fractions, no float error) to the target.
The expression is parsed with `ast` and evaluated node by node: nothing is ever `eval`-ed.
Correct scores `correct_score` (1.0); a readable but wrong/invalid expression `format_score`
(0.0); no expression 0.0. Returns a dict: score, acc, format_ok, pred, and `reason` when wrong.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from fractions import Fraction

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_MAX_EXPR_CHARS = 200  # a longer "expression" is not a countdown answer; bounds parse work

_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def extract_expression(response: str) -> str | None:
    tags = _ANSWER_RE.findall(response or "")
    if tags:
        expr = tags[-1]
    elif "####" in (response or ""):
        after = response.rsplit("####", 1)[1].strip()
        expr = after.splitlines()[0] if after else ""
    else:
        return None
    expr = expr.split("=")[0].strip().replace("×", "*").replace("÷", "/").strip("`$ ")
    return expr or None


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses.

    Raises ValueError for anything that is not numbers, + - * /, and parentheses.
    """
    if len(expr) > _MAX_EXPR_CHARS or not re.fullmatch(r"[\d\s+\-*/().]+", expr):
        raise ValueError("only numbers, + - * / and parentheses are allowed")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not a valid expression ({e.msg})") from None
    used: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.Constant):
            if type(node.value) is not int:
                raise ValueError(f"{node.value!r} is not a whole number")
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"{type(node).__name__} is not allowed (numbers, + - * / and parentheses only)")

    return walk(tree.body), used


def _parse_truth(ground_truth) -> tuple[Fraction, list[int]]:
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    return Fraction(gt["target"]), [int(n) for n in gt["numbers"]]


def score_countdown(
    data_source: str,
    response: str,
    ground_truth,
    extra_info: dict | None = None,
    *,
    format_score: float = 0.0,
    correct_score: float = 1.0,
) -> dict:
    target, numbers = _parse_truth(ground_truth)
    expr = extract_expression(response)
    if expr is None:
        return {"score": 0.0, "acc": 0.0, "format_ok": False, "pred": None, "reason": "no expression"}
    wrong = {"score": float(format_score), "acc": 0.0, "format_ok": True, "pred": expr}
    try:
        value, used = evaluate(expr)
    except ValueError as e:
        return {**wrong, "reason": str(e)}
    extra = Counter(used) - Counter(numbers)
    if extra:
        return {**wrong, "reason": f"uses {sorted(extra.elements())} more often than given"}
    if value != target:
        return {**wrong, "reason": f"evaluates to {float(value):g}, not {float(target):g}"}
    return {"score": float(correct_score), "acc": 1.0, "format_ok": True, "pred": expr, "reason": None}
