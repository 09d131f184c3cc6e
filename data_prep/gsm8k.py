"""GSM8K (grade-school math word problems; openai/gsm8k, config `main`; 7473 train / 1319 test).

Rows match verl's examples/data_preprocess/gsm8k.py: data_source `openai/gsm8k`, the question
followed by the same instruction, ground truth = the number after "####" with commas removed,
extra_info {split, index, answer, question}. The SFT response is the reference solution with
GSM8K's calculator annotations (<<16-3-4=9>>) removed; it ends in "#### N" like the reward expects.
"""

from __future__ import annotations

import re

from data_prep.common import PrepOptions, Splits, chat, first_n, load_hub, read_split, rl_row, sft_row
from verlcli.errors import UserError

DESCRIPTION = "GSM8K word problems (hub openai/gsm8k, or --source DIR with train.jsonl/test.jsonl)"
OPTIONS = {"source", "train_size", "test_size", "system_prompt"}
DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

_ANSWER_RE = re.compile(r"####\s*(-?[0-9.,]+)")
_CALC_RE = re.compile(r"<<[^<>]*>>")


def extract_answer(solution: str) -> str | None:
    m = _ANSWER_RE.search(solution or "")
    return m.group(1).replace(",", "").rstrip(".") if m else None


def build(opts: PrepOptions) -> Splits:
    out = Splits(train=[], test=[], sft_train=[], sft_test=[])
    for split, size in (("train", opts.train_size), ("test", opts.test_size)):
        if opts.source:
            raw = read_split(opts.source, split, ["question", "answer"],
                             fix="GSM8K rows need 'question' and 'answer' (the solution ending in '#### N')")
        else:
            raw = load_hub("openai/gsm8k", "main", split)
        rows, sft = getattr(out, split), getattr(out, f"sft_{split}")
        for index, (rec, where) in enumerate(first_n(list(zip(raw.rows, raw.where)), size, f"{split}-size")):
            answer = extract_answer(rec["answer"])
            if answer is None:
                raise UserError(f"{raw.path}: {where} has no '#### N' final answer in 'answer'",
                                fix="GSM8K solutions end with '#### <number>'; fix or remove that row")
            prompt = chat(f"{rec['question']} {INSTRUCTION}", opts.system_prompt)
            rows.append(rl_row(DATA_SOURCE, prompt, "math", answer, split, index,
                               answer=rec["answer"], question=rec["question"]))
            sft.append(sft_row(prompt, _CALC_RE.sub("", rec["answer"])))
    return out
