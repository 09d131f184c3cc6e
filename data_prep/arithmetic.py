"""Generated arithmetic: "What is 7 * 8? Put the final number after ####." (no download).

Small enough that a 135M instruct model partly solves it before training (measured on
SmolLM2-135M-Instruct: a+b with 1-9 about 38% correct, a*b with 1-12 about 51%; it writes
"####" only 8-26% of the time), so both correctness and format are learnable by RL on a CPU.
data_source `arithmetic`; ground truth the integer result; SFT response "7 * 8 = 56\\n#### 56".
When the problem space holds train+test problems they are drawn without replacement, so the
splits are disjoint; otherwise both draw with replacement and overlap (a note says so).
"""

from __future__ import annotations

import operator
import random

from data_prep.common import PrepOptions, Splits, chat, check_size, rl_row, sft_row
from verlcli.errors import UserError

DESCRIPTION = "generated a+b / a*b problems for small models (--operators, --min/--max-operand)"
OPTIONS = {"seed", "train_size", "test_size", "system_prompt", "min_operand", "max_operand", "operators"}
DATA_SOURCE = "arithmetic"
# 20 × 20 × {+, *} = 800 distinct problems: 700 train + 100 held-out test, no overlap.
DEFAULT_TRAIN, DEFAULT_TEST = 700, 100
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_ALIASES = {"x": "*", "×": "*", "−": "-"}


def parse_operators(text: str) -> list[str]:
    ops: list[str] = []
    for ch in text.replace(",", "").replace(" ", ""):
        ch = _ALIASES.get(ch, ch)
        if ch not in _OPS:
            raise UserError(f"--operators {text!r}: unknown operator {ch!r}", fix="use any of + - * (e.g. --operators '+*')")
        if ch not in ops:
            ops.append(ch)
    if not ops:
        raise UserError("--operators is empty", fix="use any of + - * (e.g. --operators '+*')")
    return ops


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}? Put the final number after ####."


def build(opts: PrepOptions) -> Splits:
    lo, hi = opts.min_operand, opts.max_operand
    if lo > hi:
        raise UserError(f"--min-operand {lo} is larger than --max-operand {hi}", fix="swap them")
    space = [(a, op, b) for op in parse_operators(opts.operators) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    n_test = DEFAULT_TEST if opts.test_size is None else opts.test_size
    # Without --train-size a smaller problem space (e.g. --max-operand 12) keeps the splits
    # disjoint: train gets what the test split leaves, up to the usual 700.
    n_train = min(DEFAULT_TRAIN, max(len(space) - n_test, 1)) if opts.train_size is None else opts.train_size
    check_size(n_train, "--train-size", 1)
    rng = random.Random(opts.seed)
    notes = []
    if n_train + n_test <= len(space):
        drawn = rng.sample(space, n_train + n_test)
        test, train = drawn[:n_test], drawn[n_test:]
    else:
        test, train = rng.choices(space, k=n_test), rng.choices(space, k=n_train)
        notes.append(f"only {len(space)} distinct problems: train and test overlap")
    out = Splits(train=[], test=[], sft_train=[], sft_test=[], notes=notes)
    for split, problems in (("train", train), ("test", test)):
        for index, (a, op, b) in enumerate(problems):
            value = _OPS[op](a, b)
            prompt = chat(question(a, op, b), opts.system_prompt)
            getattr(out, split).append(rl_row(DATA_SOURCE, prompt, "arithmetic", str(value), split, index,
                                              question=question(a, op, b), answer=str(value), a=a, b=b, op=op))
            getattr(out, f"sft_{split}").append(sft_row(prompt, f"{a} {op} {b} = {value}\n#### {value}"))
    return out
