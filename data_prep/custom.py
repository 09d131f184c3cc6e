"""Your own data: `--source FILE.jsonl|.json|.parquet --prompt-key K --answer-key K`.

The prompt column may hold a string (becomes one user message) or a chat list of
{role, content}. The answer becomes reward_model.ground_truth (non-strings as JSON).
--data-source names the reward (default `custom`: needs reward.fn=path.py:function, or set it to
a built-in one such as `gsm8k` for "#### N" numeric answers). Without --test-source, a seeded
random --test-size rows (default 10%) are held out as the test split.
With --response-key, the SFT files are written too (prompt + that response).
"""

from __future__ import annotations

import json
import random

from data_prep.common import PrepOptions, RawFile, Splits, chat, check_size, read_records, rl_row, sft_row
from verlcli.errors import UserError

DESCRIPTION = "your own .jsonl/.parquet (--source FILE --prompt-key K --answer-key K)"
OPTIONS = {"source", "test_source", "seed", "train_size", "test_size", "system_prompt",
           "prompt_key", "answer_key", "response_key", "data_source"}


def _messages(value, where: str, opts: PrepOptions) -> list[dict]:
    if isinstance(value, str):
        return chat(value, opts.system_prompt)
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        if opts.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": opts.system_prompt})
        return messages
    raise UserError(f"{where}: {opts.prompt_key!r} is neither a string nor a list of {{role, content}} messages",
                    fix=f"store the prompt as text, or as [{{'role': 'user', 'content': '...'}}]")


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _convert(raw: RawFile, split: str, opts: PrepOptions, data_source: str) -> tuple[list[dict], list[dict]]:
    rows, sft = [], []
    for index, (rec, where) in enumerate(zip(raw.rows, raw.where)):
        prompt = _messages(rec[opts.prompt_key], f"{raw.path}: {where}", opts)
        answer = _as_text(rec[opts.answer_key])
        question = rec[opts.prompt_key] if isinstance(rec[opts.prompt_key], str) else prompt[-1]["content"]
        rows.append(rl_row(data_source, prompt, "custom", answer, split, index, question=question, answer=answer))
        if opts.response_key:
            sft.append(sft_row(prompt, _as_text(rec[opts.response_key])))
    return rows, sft


def _load(path: str, opts: PrepOptions) -> RawFile:
    raw = read_records(path)
    keys = [opts.prompt_key, opts.answer_key] + ([opts.response_key] if opts.response_key else [])
    raw.require(keys, fix="name the right columns with --prompt-key / --answer-key (and --response-key)")
    if not raw.rows:
        raise UserError(f"{path} has no rows", fix="give a file with at least one record")
    return raw


def _hold_out(raw: RawFile, opts: PrepOptions) -> tuple[RawFile, RawFile]:
    n = len(raw.rows)
    k = opts.test_size if opts.test_size is not None else (max(1, round(0.1 * n)) if n >= 2 else 0)
    if k >= n:
        raise UserError(f"--test-size {k} leaves no training rows in {raw.path} ({n} rows)",
                        fix=f"use a smaller --test-size, or give a separate --test-source file")
    test_ids = set(random.Random(opts.seed).sample(range(n), k))
    pick = lambda keep: RawFile(raw.path, [r for i, r in enumerate(raw.rows) if keep(i)],  # noqa: E731
                                [w for i, w in enumerate(raw.where) if keep(i)])
    return pick(lambda i: i not in test_ids), pick(lambda i: i in test_ids)


def build(opts: PrepOptions) -> Splits:
    if not opts.source:
        raise UserError("prepare-data custom needs --source FILE",
                        fix="verl prepare-data custom --source my.jsonl --prompt-key question --answer-key answer")
    check_size(opts.test_size, "--test-size")
    raw = _load(opts.source, opts)
    if opts.test_source:
        train_raw, test_raw = raw, _load(opts.test_source, opts)
        test_raw.rows, test_raw.where = test_raw.rows[: opts.test_size], test_raw.where[: opts.test_size]
    else:
        train_raw, test_raw = _hold_out(raw, opts)
    if opts.train_size is not None:
        train_raw.rows, train_raw.where = train_raw.rows[: opts.train_size], train_raw.where[: opts.train_size]
    data_source = opts.data_source or "custom"
    train, sft_train = _convert(train_raw, "train", opts, data_source)
    test, sft_test = _convert(test_raw, "test", opts, data_source)
    if opts.response_key:
        return Splits(train, test, sft_train, sft_test)
    return Splits(train, test)
