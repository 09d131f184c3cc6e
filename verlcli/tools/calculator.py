"""`calculator`: arithmetic by walking the expression's syntax tree (no eval, no names).

Accepts numbers, + - * / // % **, unary minus, parentheses and a few functions (abs, round,
min, max, sqrt). `^` means power and `×` / `÷` are read as * and /, because that is how
people (and small models) write them. Every intermediate result is bounded (MAX_DIGITS) and a
power is refused before it is computed when its result would be too large, so no expression
can hang or exhaust memory. Integer-valued results print without ".0" ("12", not "12.0").
"""

from __future__ import annotations

import ast
import math
import operator

from verlcli.tools.base import Tool, ToolFailure

MAX_CHARS = 500
MAX_DIGITS = 100  # |result| < 10**100 at every step
_LIMIT = 10 ** MAX_DIGITS
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt}


def evaluate(expression: str):
    """The value of an arithmetic expression; ToolFailure with a readable reason otherwise."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolFailure("give an arithmetic expression, e.g. 12 * (3 + 4)")
    if len(expression) > MAX_CHARS:
        raise ToolFailure(f"the expression is longer than {MAX_CHARS} characters")
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolFailure(f"cannot read {expression!r} as arithmetic") from None
    return _check(_eval(tree.body))


def _eval(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _check(_eval(node.left)), _check(_eval(node.right))
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolFailure("division by zero") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_check(_eval(node.operand)))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords and 0 < len(node.args) <= 8):
        args = [_check(_eval(a)) for a in node.args]
        try:
            return _FUNCS[node.func.id](*args)
        except (TypeError, ValueError) as e:
            raise ToolFailure(f"{node.func.id}: {e}") from None
    what = type(node).__name__ if not isinstance(node, ast.Name) else f"the name {node.id!r}"
    raise ToolFailure(f"{what} is not allowed (numbers, + - * / // % ** and {', '.join(_FUNCS)} only)")


def _check_power(base, exp) -> None:
    """Refuse a power whose result would exceed the bound, before computing it."""
    if abs(exp) > 10_000:
        raise ToolFailure("the exponent is too large")
    if abs(base) > 1 and exp > 0 and exp * math.log10(abs(base)) >= MAX_DIGITS:
        raise ToolFailure(f"the result has more than {MAX_DIGITS} digits")


def _check(value):
    if isinstance(value, complex):
        raise ToolFailure("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolFailure("the result is not a finite number")
    if abs(value) >= _LIMIT:
        raise ToolFailure(f"the result has more than {MAX_DIGITS} digits")
    return value


def format_number(value) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return repr(round(value, 10))
    return str(value)


class Calculator(Tool):
    def __init__(self):
        super().__init__(
            name="calculator",
            description="Evaluate an arithmetic expression exactly.",
            parameters={"type": "object",
                        "properties": {"expression": {"type": "string",
                                                      "description": "e.g. (12 + 5) * 3"}},
                        "required": ["expression"]},
        )

    def run(self, arguments: dict) -> str:
        return format_number(evaluate(arguments["expression"]))
