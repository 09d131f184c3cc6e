"""Generated Countdown: reach a target with the given numbers, + - * / and parentheses, each
number used at most once (TinyZero's task; no download).

Each problem is made by combining the numbers in a random order with random operations (exact
divisions only, no negative intermediate results), so every problem has a solution, which is
kept in extra_info.solution and used as the SFT response ("#### (3 + 5) * 2").
data_source `countdown`; ground truth the JSON string {"target": T, "numbers": [...]}.
"""

from __future__ import annotations

import json
import random

from data_prep.common import PrepOptions, Splits, chat, check_size, rl_row, sft_row
from verlcli.errors import UserError

DESCRIPTION = "generated Countdown puzzles: numbers + target -> expression (--num-count, --max-number)"
OPTIONS = {"seed", "train_size", "test_size", "system_prompt", "num_count", "max_number", "max_target"}
DATA_SOURCE = "countdown"
DEFAULT_TRAIN, DEFAULT_TEST = 10000, 500


def question(numbers: list[int], target: int) -> str:
    return (f"Using the numbers {numbers}, create an expression that equals {target}. You may use "
            f"+, -, *, / and parentheses, and each number at most once. Put the final expression "
            f"after ####, for example: #### (1 + 2) * 3")


def _combine(rng: random.Random, numbers: list[int]) -> tuple[str, int] | None:
    """Random expression over all `numbers`; None when a step would leave the integers."""
    items = [(str(n), n, True) for n in numbers]  # (text, value, is_atom)
    while len(items) > 1:
        (ta, a, atom_a), (tb, b, atom_b) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        op = rng.choice("+-*/")
        if op == "-" and a < b or op == "/" and b > a:
            (ta, a, atom_a), (tb, b, atom_b) = (tb, b, atom_b), (ta, a, atom_a)
        if op == "/" and (b == 0 or a % b):
            return None
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        text = f"{ta if atom_a else f'({ta})'} {op} {tb if atom_b else f'({tb})'}"
        items.append((text, value, False))
    return items[0][0], items[0][1]


def make_problem(rng: random.Random, count: int, max_number: int, max_target: int) -> tuple[list[int], int, str]:
    for _ in range(10000):
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        made = _combine(rng, numbers)
        if made and 1 <= made[1] <= max_target:
            return numbers, made[1], made[0]
    raise UserError(f"could not make countdown problems with targets in 1..{max_target}",
                    fix="raise --max-target or --max-number")


def build(opts: PrepOptions) -> Splits:
    if not 2 <= opts.num_count <= 6:
        raise UserError(f"--num-count {opts.num_count} is out of range", fix="use 2 to 6 numbers per problem")
    if opts.max_number < 1 or opts.max_target < 1:
        raise UserError("--max-number and --max-target must be >= 1", fix="e.g. --max-number 25 --max-target 100")
    n_train = DEFAULT_TRAIN if opts.train_size is None else opts.train_size
    n_test = DEFAULT_TEST if opts.test_size is None else opts.test_size
    check_size(n_train, "--train-size", 1)
    rng = random.Random(opts.seed)
    out = Splits(train=[], test=[], sft_train=[], sft_test=[])
    for split, n in (("test", n_test), ("train", n_train)):
        for index in range(n):
            numbers, target, solution = make_problem(rng, opts.num_count, opts.max_number, opts.max_target)
            prompt = chat(question(numbers, target), opts.system_prompt)
            truth = json.dumps({"target": target, "numbers": numbers})
            getattr(out, split).append(rl_row(DATA_SOURCE, prompt, "countdown", truth, split, index,
                                              target=target, numbers=numbers, solution=solution))
            getattr(out, f"sft_{split}").append(sft_row(prompt, f"#### {solution}"))
    return out
