"""SFT samples: chat -> token ids with a loss mask on assistant tokens only.

Rows are multi-turn `messages` (chat list), or `prompt` (chat list or text) + `response` (text).
The assistant spans are found by rendering the chat template on growing prefixes of the
conversation: the text a turn adds after its generation prompt ("content<|im_end|>\\n" for
Qwen-style templates) is that turn's span, so the end-of-turn token is learned too. The whole
conversation is then tokenized once, and a token is in the loss when its first character lies
in an assistant span (no segment-by-segment tokenization that could split merges differently).
loss_mask[i] = 1 means token i is an assistant token, i.e. predicting it from position i-1 counts.

Tool-use transcripts: a `messages` row may hold role "tool" turns, and an optional `tools` column
holds the JSON text of the function schemas offered; the conversation is then rendered with
verlcli/data/tool_chat.py exactly as the multi-turn rollout renders it (tool calls are assistant
text, so they are learned; tool results and the tool list are context).
"""

from __future__ import annotations

import json

from verlcli.data.parquet import as_file_list, check_chat_template, column_names, read_columns, render, to_messages
from verlcli.data.tool_chat import render_chat
from verlcli.errors import UserError

TRUNCATION = ("error", "right", "filter")


class SFTDataset(list):
    """A list of {"input_ids": list[int], "loss_mask": list[int]} with load statistics."""

    num_truncated: int = 0
    num_dropped: int = 0
    num_filtered: int = 0  # over max_length and dropped (truncation="filter")


def load_sft_dataset(files, tokenizer, max_length: int, messages_key: str = "messages", prompt_key: str = "prompt",
                     response_key: str = "response", truncation: str = "error") -> SFTDataset:
    """truncation: "error" (UserError naming the row, for sft.max_length_tokens), "right"
    (cut the end; a row left with no assistant token is dropped and counted) or "filter"
    (drop over-long rows, counted in num_filtered)."""
    if truncation not in TRUNCATION:
        raise UserError(f"SFT truncation {truncation!r} is not one of {', '.join(TRUNCATION)}", fix="use error or right")
    check_chat_template(tokenizer)
    out = SFTDataset()
    for path in as_file_list(files):
        for loc, messages, tools in _conversations(path, messages_key, prompt_key, response_key):
            ids, mask = tokenize_conversation(tokenizer, messages, loc, tools)
            if len(ids) > max_length:
                if truncation == "error":
                    raise UserError(f"{loc} is {len(ids)} tokens, over sft.max_length_tokens={max_length}",
                                    fix=f"raise sft.max_length_tokens to {len(ids)} or more, or set "
                                        "data.truncation=filter to drop such rows")
                if truncation == "filter":
                    out.num_filtered += 1
                    continue
                ids, mask = ids[:max_length], mask[:max_length]
                out.num_truncated += 1
            if not any(mask):
                out.num_dropped += 1
                continue
            out.append({"input_ids": ids, "loss_mask": mask})
    if not out:
        raise UserError(f"no usable SFT rows in {', '.join(as_file_list(files))}",
                        fix="check the files, and that sft.max_length_tokens leaves room for the responses")
    return out


def _conversations(path: str, messages_key: str, prompt_key: str, response_key: str):
    names = column_names(path, "SFT data")
    if messages_key in names:
        cols, n = read_columns(path, [messages_key], ["tools"], "SFT data")
        for row in range(n):
            loc = f"{path}: row {row}"
            tools = _tool_schemas((cols.get("tools") or [None] * n)[row], loc)
            yield loc, to_messages(cols[messages_key][row], loc, messages_key), tools
        return
    if prompt_key not in names or response_key not in names:
        raise UserError(
            f"SFT data file {path} has neither {messages_key!r} nor {prompt_key!r} + {response_key!r} columns "
            f"(columns: {', '.join(names)})",
            fix="SFT data needs `messages` (chat list) or `prompt` + `response`; "
                "`verl prepare-data` writes sft_train.parquet in that form",
        )
    cols, n = read_columns(path, [prompt_key, response_key], [], "SFT data")
    for row in range(n):
        loc = f"{path}: row {row}"
        response = cols[response_key][row]
        if not isinstance(response, str):
            raise UserError(f"{loc}: {response_key!r} is {type(response).__name__}, not text",
                            fix="store the response as a string")
        prompt = to_messages(cols[prompt_key][row], loc, prompt_key)
        yield loc, prompt + [{"role": "assistant", "content": response}], None


def _tool_schemas(cell, loc: str) -> list[dict] | None:
    """The `tools` cell: JSON text of a list of function schemas (None / "" = no tools)."""
    if cell is None or cell == "":
        return None
    try:
        schemas = json.loads(cell) if isinstance(cell, str) else None
    except json.JSONDecodeError:
        schemas = None
    if not isinstance(schemas, list) or not all(isinstance(s, dict) for s in schemas):
        raise UserError(f"{loc}: the tools column is not JSON text of a list of function schemas ({str(cell)[:80]!r})",
                        fix='store tools as json.dumps([{"type": "function", "function": {...}}]), as '
                            "`verl prepare-data arithmetic-tools` writes it")
    return schemas


def _render(tokenizer, messages: list[dict], loc: str, add_generation_prompt: bool, tools: list[dict] | None) -> str:
    if tools is None and not any(m["role"] == "tool" for m in messages):
        return render(tokenizer, messages, loc, add_generation_prompt=add_generation_prompt)
    return render_chat(tokenizer, messages, tools, add_generation_prompt=add_generation_prompt, where=loc)


def assistant_spans(tokenizer, messages: list[dict], loc: str,
                    tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(tokenizer, messages, loc, False, tools)
    spans, search_from = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], loc, True, tools)
        through = _render(tokenizer, messages[: i + 1], loc, False, tools)
        if through.startswith(before) and full.startswith(through):
            spans.append((len(before), len(through)))
        else:
            # Templates that render earlier turns differently (e.g. strip reasoning) break the
            # prefix property: fall back to finding the content itself.
            start = full.find(m["content"], search_from)
            if start < 0:
                raise UserError(f"{loc}: cannot locate assistant turn {i} in the chat template's output",
                                fix="this chat template rewrites assistant messages; use a `prompt` + `response` form")
            spans.append((start, start + len(m["content"])))
        search_from = spans[-1][1]
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], loc: str = "row",
                          tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) for one conversation; mask 1 on assistant tokens. `tools`:
    function schemas offered in the conversation (rendered by verlcli/data/tool_chat.py)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{loc}: the conversation has no assistant message to learn from",
                        fix="each SFT row needs at least one assistant turn (or a response)")
    text, spans = assistant_spans(tokenizer, messages, loc, tools)
    if not getattr(tokenizer, "is_fast", False):
        return _tokenize_segments(tokenizer, text, spans)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    return ids, mask


def _tokenize_segments(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Slow tokenizers have no offsets: tokenize the text between span edges piece by piece."""
    ids: list[int] = []
    mask: list[int] = []
    edges = sorted({0, len(text), *(x for span in spans for x in span)})
    for a, b in zip(edges, edges[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a < e for s, e in spans)
        ids += piece
        mask += [int(inside)] * len(piece)
    return ids, mask
