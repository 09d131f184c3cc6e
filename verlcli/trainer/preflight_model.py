"""Preflight of a model name: it resolves, its config and tokenizer load, it has a chat template.

A dry run downloads nothing: a hub model that is not in the local cache is checked by
fetching its config.json when the hub answers, and reported as "not checked" when it does
not. A real run downloads it (resolve_model), but first asks whether the hub answers at all,
so an offline machine fails in seconds instead of after huggingface_hub's retries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from verlcli.errors import UserError


def _is_hub_id(name: str) -> bool:
    from verlcli.models.builtin import BUILTINS
    from verlcli.models.resolve import _HUB_ID, _looks_local

    return not Path(name).expanduser().exists() and not _looks_local(name) and name not in BUILTINS \
        and bool(_HUB_ID.match(name))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def check_model(name: str, trust_remote_code: bool, dry_run: bool, out, key: str) -> Path | None:
    """The local directory of `name` with its config loaded; None when a dry run could not
    reach the hub (a warning says so)."""
    from verlcli.models.resolve import resolve_model

    name = str(name).strip()
    if _is_hub_id(name):
        cached = _cached_snapshot(name)
        if cached is None and not hub_reachable():
            if dry_run:
                out.warnings.append(f"{key}={name}: not in the local Hugging Face cache and the hub does not answer; "
                                    "not checked (the run will need network)")
                return None
            raise UserError(f"{key}={name} is not in the local Hugging Face cache and the hub cannot be reached",
                            fix="use a local model directory or a built-in (tiny-qwen2, smollm2-135m-instruct), or "
                                f"download it where there is network (`hf download {name}`) and copy it here")
        if cached is None and dry_run:
            _fetch_config(name, key, trust_remote_code)
            out.lines.append(f"{key}={name}: config.json fetched from the hub (weights not downloaded in a dry run)")
            return None
    path = resolve_model(name)
    load_config(path, trust_remote_code, key)
    out.lines.append(f"{key}={name}: {path}")
    return path


def _fetch_config(repo_id: str, key: str, trust_remote_code: bool) -> None:
    from huggingface_hub import errors as hf_errors, hf_hub_download

    try:
        path = hf_hub_download(repo_id, "config.json")
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError, hf_errors.EntryNotFoundError) as e:
        raise UserError(f"{key}={repo_id}: the Hugging Face hub has no such model ({type(e).__name__})",
                        fix="check the id's spelling; for a private or gated model run `hf auth login` first") from None
    load_config(Path(path).parent, trust_remote_code, key)


def load_config(path: Path, trust_remote_code: bool, key: str = "model.path"):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 (json, OSError, ValueError for unknown model types, ...)
        text = str(e).split("\n")[0][:300]
        if "trust_remote_code" in str(e):
            raise UserError(f"{key}: the model in {path} needs its own Python code to load",
                            fix=f"if you trust that code, set model.trust_remote_code=true") from None
        raise UserError(f"{key}: cannot load the model config {path}/config.json ({type(e).__name__}: {text})",
                        fix="check that config.json is a complete Hugging Face config (re-download or re-save the model)") \
            from None


def load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from verlcli.data.parquet import check_chat_template

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        text = str(e).split("\n")[0][:300]
        raise UserError(f"model.path: cannot load the tokenizer in {path} ({type(e).__name__}: {text})",
                        fix="the model directory needs its tokenizer files (tokenizer.json / tokenizer_config.json)") \
            from None
    check_chat_template(tok)
    return tok
