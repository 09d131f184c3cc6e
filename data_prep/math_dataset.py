"""MATH competition problems (hub DigitalLearningGmbH/MATH-lighteval: 7500 train / 5000 test).

Rows match verl's examples/data_preprocess/math_dataset.py: data_source
`DigitalLearningGmbH/MATH-lighteval`, the problem followed by "Let's think step by step and
output the final answer within \\boxed{}.", ground truth = the content of the solution's last
\\boxed{} (nested braces balanced). --source DIR takes train/test .jsonl/.parquet files with
`problem` and `solution`, or the original MATH layout (DIR/train/<subject>/<n>.json).
A solution without a box (a handful in MATH) is skipped and counted.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.common import (PrepOptions, RawFile, Splits, chat, load_hub, read_records, read_split,
                              rl_row, sft_row)
from verlcli.rewards.math_reward import last_boxed

DESCRIPTION = "MATH competition problems (hub DigitalLearningGmbH/MATH-lighteval, or --source DIR)"
OPTIONS = {"source", "train_size", "test_size", "system_prompt"}
DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
_FIX = "MATH rows need 'problem' and 'solution' (with the answer in \\boxed{...})"


def _read_local(source: str, split: str) -> RawFile:
    layout = Path(source) / split
    if layout.is_dir():  # original MATH release: one JSON object per problem
        files = sorted(layout.glob("*/*.json")) or sorted(layout.glob("*.json"))
        parts = [read_records(p) for p in files]
        raw = RawFile(layout, [r for p in parts for r in p.rows], [str(p.path) for p in parts for _ in p.rows])
        raw.require(["problem", "solution"], _FIX)
        return raw
    return read_split(source, split, ["problem", "solution"], _FIX)


def build(opts: PrepOptions) -> Splits:
    out = Splits(train=[], test=[], sft_train=[], sft_test=[])
    for split, size in (("train", opts.train_size), ("test", opts.test_size)):
        raw = _read_local(opts.source, split) if opts.source else load_hub(
            "DigitalLearningGmbH/MATH-lighteval", None, split)
        rows, sft = getattr(out, split), getattr(out, f"sft_{split}")
        skipped = 0
        for rec in raw.rows:
            if size is not None and len(rows) >= size:
                break
            answer = last_boxed(rec["solution"])
            if answer is None:
                skipped += 1
                continue
            prompt = chat(f"{rec['problem']} {INSTRUCTION}", opts.system_prompt)
            rows.append(rl_row(DATA_SOURCE, prompt, "math", answer, split, len(rows),
                               question=rec["problem"], answer=answer,
                               level=str(rec.get("level", "")), type=str(rec.get("type", ""))))
            sft.append(sft_row(prompt, rec["solution"]))
        if skipped:
            out.notes.append(f"{split}: skipped {skipped} solutions without \\boxed{{}}")
    return out
