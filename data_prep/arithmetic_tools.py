"""Arithmetic with a calculator: "What is 4821 * 377? ..." with the `calculator` tool offered.

The operands (default 100-9999, multiplication) are too large for a 135M model to multiply in
its head — SmolLM2-135M-Instruct gets ~0% of these without a tool — while a calculator call
solves them exactly, so held-out accuracy with the tool can rise far above the no-tool
baseline. data_source `arithmetic` (the arithmetic reward reads the number after "####").

Files:
  train.parquet / test.parquet   RL prompts with a `tools` column (["calculator"]); disjoint.
  test_no_tools.parquet          the SAME held-out problems, asked without the tool (the plain
                                 arithmetic prompt): the baseline to compare against.
  sft_train / sft_test.parquet   tool-use transcripts for a warm-up with `verl sft`: messages
                                 (user question, assistant <tool_call>, tool result, assistant
                                 answer) + tools (JSON schemas). The loss covers the assistant
                                 turns only (verlcli/data/sft_dataset.py).
"""

from __future__ import annotations

import json
import random

from data_prep.arithmetic import _OPS, parse_operators
from data_prep.arithmetic import question as plain_question
from data_prep.common import PrepOptions, Splits, chat, check_size, rl_row, sft_conversation_row
from verlcli.errors import UserError

DESCRIPTION = "large-operand a*b problems with the `calculator` tool, plus SFT tool-use transcripts"
OPTIONS = {"seed", "train_size", "test_size", "system_prompt", "min_operand", "max_operand", "operators"}
DATA_SOURCE = "arithmetic"
TOOLS = ["calculator"]
DEFAULT_TRAIN, DEFAULT_TEST = 2000, 200
DEFAULT_MIN, DEFAULT_MAX, DEFAULT_OPS = 100, 9999, "*"


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}? You can use the calculator tool. Put the final number after ####."


def tool_call_text(expression: str) -> str:
    """An assistant turn calling the calculator, in the Hermes format the parser reads."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def transcript(a: int, op: str, b: int, value: int, system_prompt: str | None) -> list[dict]:
    expression = f"{a} {op} {b}"
    return chat(question(a, op, b), system_prompt) + [
        {"role": "assistant", "content": tool_call_text(expression)},
        {"role": "tool", "content": str(value)},
        {"role": "assistant", "content": f"{expression} = {value}\n#### {value}"},
    ]


def build(opts: PrepOptions) -> Splits:
    from verlcli.tools.calculator import Calculator

    # PrepOptions' arithmetic defaults (1..20, "+*") are the small variant's: this one has its own.
    lo = DEFAULT_MIN if opts.min_operand == PrepOptions.min_operand else opts.min_operand
    hi = DEFAULT_MAX if opts.max_operand == PrepOptions.max_operand else opts.max_operand
    ops = parse_operators(DEFAULT_OPS if opts.operators == PrepOptions.operators else opts.operators)
    if lo > hi:
        raise UserError(f"--min-operand {lo} is larger than --max-operand {hi}", fix="swap them")
    n_train = DEFAULT_TRAIN if opts.train_size is None else opts.train_size
    n_test = DEFAULT_TEST if opts.test_size is None else opts.test_size
    check_size(n_train, "--train-size", 1)
    space = (hi - lo + 1) ** 2 * len(ops)
    if n_train + n_test > space // 2:
        raise UserError(f"operands {lo}..{hi} give only {space} problems, too few for {n_train} + {n_test} distinct ones",
                        fix="widen --min-operand/--max-operand or lower --train-size/--test-size")
    rng = random.Random(opts.seed)
    seen: set[tuple] = set()
    problems = []
    while len(problems) < n_train + n_test:  # distinct problems: train and test never share one
        p = (rng.randint(lo, hi), rng.choice(ops), rng.randint(lo, hi))
        if p not in seen:
            seen.add(p)
            problems.append(p)
    tools_json = json.dumps([Calculator().schema])
    notes = ["warm up the tool format first: verl sft data.train_files=[DIR/sft_train.parquet] "
             "(the transcripts), then RL with tools=[calculator] on train.parquet",
             "test_no_tools.parquet holds the same held-out problems without the tool (the baseline)"]
    out = Splits(train=[], test=[], sft_train=[], sft_test=[], extra={"test_no_tools": []}, notes=notes)
    for split, chunk in (("test", problems[:n_test]), ("train", problems[n_test:])):
        for index, (a, op, b) in enumerate(chunk):
            value = _OPS[op](a, b)
            extra = dict(question=question(a, op, b), answer=str(value), a=a, b=b, op=op)
            row = rl_row(DATA_SOURCE, chat(question(a, op, b), opts.system_prompt), "arithmetic", str(value),
                         split, index, **extra)
            getattr(out, split).append({**row, "tools": list(TOOLS)})
            getattr(out, f"sft_{split}").append(
                sft_conversation_row(transcript(a, op, b, value, opts.system_prompt), tools_json))
            if split == "test":
                out.extra["test_no_tools"].append(rl_row(
                    DATA_SOURCE, chat(plain_question(a, op, b), opts.system_prompt), "arithmetic", str(value),
                    split, index, **{**extra, "question": plain_question(a, op, b)}))
    return out
