"""Reading the product's parquet files with pyarrow, with errors that name the file, the
columns it has, and the fix. Shared by the RL and SFT dataset loaders."""

from __future__ import annotations

from pathlib import Path

from verlcli.errors import UserError


def as_file_list(files: str | Path | list) -> list[str]:
    if isinstance(files, (str, Path)):
        files = [files]
    files = [str(f) for f in files]
    if not files:
        raise UserError("no data files given", fix="set data.train_files=[path/to/train.parquet]")
    return files


def read_columns(path: str, required: list[str], optional: list[str], what: str) -> tuple[dict[str, list], int]:
    """Columns of one parquet file as Python lists: all `required` (UserError if absent) and
    whichever `optional` exist. Other columns are never read. Returns (columns, num_rows)."""
    import pyarrow.parquet as pq

    names = column_names(path, what)
    missing = [c for c in required if c not in names]
    if missing:
        raise UserError(
            f"{what} file {path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(names)})",
            fix=missing_column_fix(missing),
        )
    columns = required + [c for c in optional if c in names and c not in required]
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_pylist() for c in columns}, table.num_rows


def column_names(path: str, what: str) -> list[str]:
    """Column names of a parquet file; UserError when it is missing or not parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {path} does not exist",
                        fix="run `verl prepare-data NAME` to create it, or fix the path in data.train_files / data.val_files")
    try:
        names = pq.read_schema(p).names
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{what} file {path} is not a readable parquet file ({e})",
                        fix="re-create it with `verl prepare-data`") from None
    return names


def missing_column_fix(missing: list[str]) -> str:
    hints = {
        "data_source": "every row needs data_source (it picks the reward); `verl prepare-data` writes it",
        "prompt": "name the prompt column with data.prompt_key=COLUMN, or build the file with `verl prepare-data`",
        "messages": "SFT data needs `messages` (chat list) or `prompt` + `response` columns",
    }
    return "; ".join(hints.get(m, f"add a {m!r} column, or point the matching data.*_key option at yours")
                     for m in missing)


def to_messages(value, where: str, key: str) -> list[dict]:
    """A prompt cell -> chat messages. A plain string becomes one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                break
            messages.append({"role": m["role"], "content": m["content"]})
        else:
            return messages
    raise UserError(f"{where}: column {key!r} holds {type(value).__name__} {str(value)[:80]!r}, "
                    "not text or a list of {role, content} messages",
                    fix="store prompts as [{'role': 'user', 'content': '...'}] (what `verl prepare-data` writes)")


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"tokenizer {name!r} has no chat template, so chat prompts cannot be formatted",
                        fix="use an instruct/chat model, or set tokenizer.chat_template in its tokenizer_config.json")


def render(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # noqa: BLE001 (jinja raises its own types, e.g. "roles must alternate")
        raise UserError(f"{where}: the chat template rejected these messages: {type(e).__name__}: {e}",
                        fix="check the roles/order of the messages against the model's chat template") from None
