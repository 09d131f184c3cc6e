"""Shared parts of `verl prepare-data`: options, reading raw files, building rows in the one
schema, and writing the parquet files atomically.

RL schema (one row per prompt, the same as verl's preprocessing scripts write):
  data_source   string                      selects the reward function
  prompt        list<{role, content}>       chat messages
  ability       string
  reward_model  {style: "rule", ground_truth: string}
  extra_info    {split, index, ...}         dataset-specific (original question, answer, ...)
  tools         list<string>                optional: the tools a prompt may call (arithmetic-tools)
SFT schema (`sft_train.parquet`, `sft_test.parquet`): prompt (the same chat list) + response;
or, for multi-turn tool-use transcripts, messages (chat list with "tool" turns) + tools (JSON
text of the function schemas offered).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from verlcli.errors import UserError
from verlcli.io import atomic_path

MESSAGE_FIELDS = [("role", "string"), ("content", "string")]


@dataclass
class PrepOptions:
    """Every option of `verl prepare-data`; each dataset module says which ones it accepts."""

    source: str | None = None
    test_source: str | None = None
    seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    system_prompt: str | None = None
    # custom
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    response_key: str | None = None
    data_source: str | None = None
    # arithmetic
    min_operand: int = 1
    max_operand: int = 20
    operators: str = "+*"
    # countdown
    num_count: int = 3
    max_number: int = 25
    max_target: int = 100


@dataclass
class Splits:
    """What a dataset module builds; `prepare` writes it."""

    train: list[dict]
    test: list[dict]
    sft_train: list[dict] | None = None
    sft_test: list[dict] | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, list[dict]] = field(default_factory=dict)  # more RL files: name -> rows


@dataclass
class RawFile:
    """Records read from a user's file, with where each came from (for error messages)."""

    path: Path
    rows: list[dict]
    where: list[str]  # "line 12" for jsonl, "row 11" otherwise

    def require(self, keys: list[str], fix: str) -> None:
        for row, where in zip(self.rows, self.where):
            missing = [k for k in keys if k not in row]
            if missing:
                raise UserError(
                    f"{self.path}: {where} has no {' / '.join(repr(k) for k in missing)} "
                    f"(it has: {', '.join(map(repr, row)) or 'nothing'})",
                    fix=fix,
                )


# -- reading --------------------------------------------------------------------------------
def read_records(path: str | Path) -> RawFile:
    """Rows of a .jsonl / .json / .parquet file; UserError naming the file (and line) on problems."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist", fix="check the path given to --source / --test-source")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    raise UserError(f"{path}: unsupported file type {suffix or '(none)'!r}", fix="give a .jsonl, .json or .parquet file")


def _read_parquet(path: Path) -> RawFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file: {e}", fix="re-create the file, or convert it to .jsonl") from None
    return RawFile(path, rows, [f"row {i}" for i in range(len(rows))])


def _read_json(path: Path) -> RawFile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}", fix="check the file's permissions and that it is UTF-8 text") from None
    if path.suffix.lower() == ".json":
        # A .json file may hold one array of objects or a single object (MATH's layout).
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(text)
            rows = obj if isinstance(obj, list) else [obj]
            if all(isinstance(r, dict) for r in rows):
                return RawFile(path, rows, [f"item {i}" for i in range(len(rows))])
    rows, where = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})",
                fix=f"fix or delete line {lineno}; every line must be one JSON object",
            ) from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {lineno} is a JSON {type(obj).__name__}, not an object",
                            fix='each line must look like {"question": ..., "answer": ...}')
        rows.append(obj)
        where.append(f"line {lineno}")
    return RawFile(path, rows, where)


def find_split_files(source: str | Path, split: str) -> list[Path]:
    """`split`.jsonl/.json/.parquet in `source`, or hub-style shards `**/split-*.parquet`."""
    src = Path(source)
    if not src.is_dir():
        kind = "a file" if src.exists() else "missing"
        raise UserError(f"--source {src} is {kind}; expected a directory with {split}.jsonl or {split}.parquet",
                        fix="pass the directory that holds train.jsonl and test.jsonl (or .parquet)")
    for name in (f"{split}.jsonl", f"{split}.json", f"{split}.parquet"):
        if (src / name).is_file():
            return [src / name]
    shards = sorted(src.glob(f"**/{split}-*.parquet"))
    if shards:
        return shards
    have = sorted(p.name for p in src.iterdir())[:20]
    raise UserError(f"{src} has no {split}.jsonl / {split}.parquet (it has: {', '.join(have) or 'nothing'})",
                    fix=f"put the {split} split in {src}/{split}.jsonl")


def read_split(source: str | Path, split: str, keys: list[str], fix: str) -> RawFile:
    """All records of one split of a local source directory, checked for `keys`."""
    files = [read_records(p) for p in find_split_files(source, split)]
    for f in files:
        f.require(keys, fix)
    if len(files) == 1:
        return files[0]
    return RawFile(files[0].path.parent,
                   [r for f in files for r in f.rows],
                   [f"{f.path.name} {w}" for f in files for w in f.where])


def load_hub(repo: str, config: str | None, split: str) -> RawFile:
    """One split from the Hugging Face hub through `datasets` (imported only here: it is slow)."""
    try:
        import datasets
    except ImportError:
        raise UserError("the `datasets` package is not installed", fix="pip install datasets, or pass --source DIR") from None
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001 (network, auth, missing repo: all mean "cannot get it")
        raise UserError(
            f"could not load {repo} ({split}) from the Hugging Face hub: {type(e).__name__}: {str(e)[:300]}",
            fix="check the network (or HF_ENDPOINT / HF_TOKEN), or download the files and pass --source DIR",
        ) from None
    rows = ds.to_list()
    return RawFile(Path(f"hf://{repo}"), rows, [f"{split} row {i}" for i in range(len(rows))])


# -- rows -----------------------------------------------------------------------------------
def chat(user_text: str, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user_text}]


def rl_row(data_source: str, prompt: list[dict], ability: str, ground_truth: str,
           split: str, index: int, **extra) -> dict:
    return {
        "data_source": data_source,
        "prompt": prompt,
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": str(ground_truth)},
        "extra_info": {"split": split, "index": index, **extra},
    }


def sft_row(prompt: list[dict], response: str) -> dict:
    return {"prompt": prompt, "response": response}


def sft_conversation_row(messages: list[dict], tools_json: str) -> dict:
    """A multi-turn SFT row: messages (with "tool" turns) + the JSON text of the tool schemas."""
    return {"messages": messages, "tools": tools_json}


def first_n(rows: list, n: int | None, what: str) -> list:
    if n is None:
        return rows
    if n < 0:
        raise UserError(f"--{what} must be >= 0, got {n}", fix=f"pass a row count, e.g. --{what} 100")
    return rows[:n]


def check_size(n: int | None, flag: str, minimum: int = 0) -> None:
    if n is not None and n < minimum:
        raise UserError(f"{flag} must be >= {minimum}, got {n}", fix=f"pass {flag} {max(minimum, 1)} or more")


# -- writing --------------------------------------------------------------------------------
def _rl_table(rows: list[dict]):
    import pyarrow as pa

    message = pa.list_(pa.struct(MESSAGE_FIELDS))
    reward = pa.struct([("style", "string"), ("ground_truth", "string")])
    extra = [r["extra_info"] for r in rows]
    return pa.table({
        "data_source": pa.array([r["data_source"] for r in rows], pa.string()),
        "prompt": pa.array([r["prompt"] for r in rows], message),
        "ability": pa.array([r["ability"] for r in rows], pa.string()),
        "reward_model": pa.array([r["reward_model"] for r in rows], reward),
        "extra_info": pa.array(extra) if extra else pa.array([], pa.struct([("split", "string"), ("index", "int64")])),
        **({"tools": pa.array([r.get("tools") for r in rows], pa.list_(pa.string()))}
           if any("tools" in r for r in rows) else {}),
    })


def _sft_table(rows: list[dict]):
    import pyarrow as pa

    if rows and "messages" in rows[0]:
        return pa.table({
            "messages": pa.array([r["messages"] for r in rows], pa.list_(pa.struct(MESSAGE_FIELDS))),
            "tools": pa.array([r["tools"] for r in rows], pa.string()),
        })
    return pa.table({
        "prompt": pa.array([r["prompt"] for r in rows], pa.list_(pa.struct(MESSAGE_FIELDS))),
        "response": pa.array([r["response"] for r in rows], pa.string()),
    })


def write_splits(out: str | Path, splits: Splits) -> dict[str, Path]:
    """Write train/test (and SFT) parquet files into `out`. All tables are built first and all
    files renamed into place only after every one was written: an error leaves no partial set."""
    import pyarrow.parquet as pq

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file", fix="pass a directory path for --out")
    tables = {"train": _rl_table(splits.train), "test": _rl_table(splits.test)}
    tables.update({name: _rl_table(rows) for name, rows in splits.extra.items()})
    if splits.sft_train is not None:
        tables["sft_train"] = _sft_table(splits.sft_train)
        tables["sft_test"] = _sft_table(splits.sft_test or [])
    paths = {name: out / f"{name}.parquet" for name in tables}
    with contextlib.ExitStack() as stack:
        for name, table in tables.items():
            tmp = stack.enter_context(atomic_path(paths[name]))
            pq.write_table(table, tmp)
    return paths
