"""RL prompts for training: parquet -> chat template -> token ids, plus a resumable sampler.

Accepts parquet from `verl prepare-data` and from verl's own preprocessing scripts: only the
prompt column and data_source are required; reward_model and extra_info are read when present;
other columns are ignored. The prompt may be a chat list or a plain string (one user turn).
"""

from __future__ import annotations

import random

from verlcli.data.parquet import as_file_list, check_chat_template, read_columns, render, to_messages
from verlcli.data.tool_chat import render_chat
from verlcli.errors import UserError

TRUNCATION = ("error", "left", "right", "filter")


class RLDataset:
    """Tokenized prompts. Each item: {"input_ids": list[int], "data_source", "ground_truth",
    "extra_info", "index"}, where index is the row's position across all files (stable)."""

    def __init__(self, items: list[dict], files: list[str], num_truncated: int = 0, num_filtered: int = 0):
        self.items = items
        self.files = files
        self.num_truncated = num_truncated
        self.num_filtered = num_filtered  # over-long prompts dropped (truncation="filter")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def __iter__(self):
        return iter(self.items)

    @property
    def data_sources(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for it in self.items:
            counts[it["data_source"]] = counts.get(it["data_source"], 0) + 1
        return counts


def load_rl_dataset(files, tokenizer, prompt_key: str = "prompt", *, max_prompt_tokens: int,
                    truncation: str = "error", tool_schemas: dict[str, dict] | None = None) -> RLDataset:
    """Read, template and tokenize prompts; check the length limit (data.max_prompt_tokens).

    truncation: "error" (UserError naming the row), "left" (keep the last tokens, as verl),
    "right" (keep the first tokens), or "filter" (drop the prompt; counted in num_filtered,
    and a UserError when no prompt is left).

    tools: an optional `tools` column lists the tool names each prompt may call; items carry it
    as "tools" (None when the column or cell is absent: every configured tool). With
    `tool_schemas` (name -> function schema, from verlcli.tools.tool_schemas) the prompt is
    rendered with its tools offered (verlcli/data/tool_chat.py); without, tools are not shown.
    """
    if truncation not in TRUNCATION:
        raise UserError(f"data.truncation={truncation!r} is not one of {', '.join(TRUNCATION)}",
                        fix="set data.truncation=error, left or filter")
    check_chat_template(tokenizer)
    files = as_file_list(files)
    items: list[dict] = []
    where: list[str] = []
    for path in files:
        cols, n = read_columns(path, [prompt_key, "data_source"], ["reward_model", "extra_info", "tools"], "data")
        texts = []
        for row in range(n):
            loc = f"{path}: row {row}"
            ds = cols["data_source"][row]
            if not isinstance(ds, str) or not ds:
                raise UserError(f"{loc}: data_source is {ds!r}", fix="every row needs a data_source string (it picks the reward)")
            messages = to_messages(cols[prompt_key][row], loc, prompt_key)
            tools = _row_tools((cols.get("tools") or [None] * n)[row], loc)
            if tool_schemas is not None:
                schemas = _schemas_for(tools, tool_schemas, loc)
                texts.append(render_chat(tokenizer, messages, schemas, add_generation_prompt=True, where=loc))
            else:
                texts.append(render(tokenizer, messages, loc, add_generation_prompt=True))
            rm = (cols.get("reward_model") or [None] * n)[row]
            items.append({
                "input_ids": None,
                "messages": messages,  # the multi-turn agent loop renders conversations from them
                "data_source": ds,
                "ground_truth": rm.get("ground_truth") if isinstance(rm, dict) else None,
                "extra_info": (cols.get("extra_info") or [None] * n)[row] or {},
                "index": len(items),
                "tools": tools,
            })
            where.append(loc)
        if texts:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for item, row_ids in zip(items[len(items) - n:], ids):
                item["input_ids"] = list(row_ids)
    if not items:
        raise UserError(f"no rows in {', '.join(files)}", fix="check the files in data.train_files / data.val_files")
    if truncation == "filter":
        return _filter_long(items, files, max_prompt_tokens)
    return RLDataset(items, files, _apply_limit(items, where, max_prompt_tokens, truncation))


def _row_tools(cell, loc: str) -> list[str] | None:
    if cell is None:
        return None
    if isinstance(cell, (list, tuple)) and all(isinstance(t, str) and t for t in cell):
        return list(cell)
    raise UserError(f"{loc}: the tools column holds {str(cell)[:80]!r}, not a list of tool names",
                    fix='store the tools a prompt may use as a list of names, e.g. ["calculator"]')


def _schemas_for(tools: list[str] | None, schemas: dict[str, dict], loc: str) -> list[dict]:
    names = list(schemas) if tools is None else tools
    unknown = [t for t in names if t not in schemas]
    if unknown:
        raise UserError(f"{loc}: the tools column names {', '.join(map(repr, unknown))}, which is not among "
                        f"the configured tools ({', '.join(schemas) or 'none'})",
                        fix="add it to the run's tools, or remove it from the dataset's tools column")
    return [schemas[t] for t in names]


def _filter_long(items: list[dict], files: list[str], limit: int) -> RLDataset:
    """Drop prompts over the limit; keep each item's original index (it names its row)."""
    kept = [it for it in items if len(it["input_ids"]) <= limit]
    if not kept:
        shortest = min(len(it["input_ids"]) for it in items)
        raise UserError(
            f"every one of the {len(items)} prompts in {', '.join(files)} is over data.max_prompt_tokens={limit} "
            f"(the shortest has {shortest} tokens), so data.truncation=filter leaves nothing",
            fix=f"raise data.max_prompt_tokens to at least {shortest}, or use data.truncation=left",
        )
    return RLDataset(kept, files, 0, len(items) - len(kept))


def _apply_limit(items: list[dict], where: list[str], limit: int, truncation: str) -> int:
    over = [i for i, it in enumerate(items) if len(it["input_ids"]) > limit]
    if not over:
        return 0
    if truncation == "error":
        first, longest = over[0], max(len(items[i]["input_ids"]) for i in over)
        raise UserError(
            f"{where[first]} (index {first}) has a {len(items[first]['input_ids'])}-token prompt, over "
            f"data.max_prompt_tokens={limit} ({len(over)} of {len(items)} prompts are too long; the longest has {longest})",
            fix=f"set data.max_prompt_tokens={longest}, or data.truncation=filter to drop them "
                "(data.truncation=left cuts them from the left)",
        )
    for i in over:
        ids = items[i]["input_ids"]
        items[i]["input_ids"] = ids[-limit:] if truncation == "left" else ids[:limit]
    return len(over)


class PromptLoader:
    """Yields lists of `prompts_per_step` items forever, epoch after epoch.

    Each epoch is a permutation drawn with Random(seed + epoch), so the order is reproducible and
    differs between epochs. A step that crosses an epoch boundary takes the rest of the old epoch
    and the start of the new one: a step is never short and never empty. state_dict() holds
    (epoch, position); load_state_dict() resumes at exactly the next unseen prompt.
    """

    def __init__(self, dataset, prompts_per_step: int, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise UserError("the prompt dataset is empty", fix="check data.train_files")
        if prompts_per_step < 1:
            raise UserError(f"data.train_prompts_per_step={prompts_per_step}", fix="set it to 1 or more")
        self.dataset = dataset
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # next index into this epoch's order
        self._order_epoch, self._order = -1, []

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def next_batch(self) -> list[dict]:
        batch = []
        while len(batch) < self.prompts_per_step:
            order = self._order_for(self.epoch)
            take = min(self.prompts_per_step - len(batch), len(order) - self.position)
            batch.extend(self.dataset[i] for i in order[self.position:self.position + take])
            self.position += take
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch_progress(self) -> float:
        """Epochs completed as a fraction, e.g. 1.25."""
        return self.epoch + self.position / len(self.dataset)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if state.get("dataset_size", len(self.dataset)) != len(self.dataset) or self.position > len(self.dataset):
            # The data changed since the checkpoint: the old position means nothing; start a new epoch.
            self.epoch, self.position = self.epoch + 1, 0
