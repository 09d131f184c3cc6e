"""Finding and comparing numbers in model responses (shared by the gsm8k and arithmetic scorers).

Numbers compare by value, not by text: "18.0" == "18", "1,000" == "1000", "$18" == "18".
Decimal keeps the comparison exact (no float rounding surprises for money-like answers).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: thousands groups ("1,000,000") or a plain run of digits, optional sign and decimals.
# The grouped form requires exactly three digits per group so "3,4" (a list) is not read as 34.
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(NUMBER)
# "#### 18", "#### $1,000.50", "####: -3", "#### **42**"
_HASH_RE = re.compile(r"####[\s:*]*\$?\s*(" + NUMBER + r")")


def to_decimal(text) -> Decimal | None:
    """'$1,000.00' -> Decimal('1000.00'); None when it is not a number."""
    if text is None:
        return None
    s = str(text).strip().replace(",", "").replace("$", "").rstrip("%").strip()
    if s.endswith("."):
        s = s[:-1]
    try:
        d = Decimal(s)
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def numbers_equal(pred, truth) -> bool:
    """Value comparison; falls back to exact text when either side is not a number."""
    a, b = to_decimal(pred), to_decimal(truth)
    if a is None or b is None:
        return pred is not None and str(pred).strip() == str(truth).strip()
    return a == b


def last_hash_answer(response: str) -> str | None:
    """The number after the LAST '####' in the whole response (not just a tail), commas removed."""
    matches = _HASH_RE.findall(response or "")
    return matches[-1].replace(",", "") if matches else None


def last_number(response: str) -> str | None:
    """The last number anywhere in the response, commas removed."""
    matches = _NUMBER_RE.findall(response or "")
    return matches[-1].replace(",", "") if matches else None
