"""Model name → local Hugging Face directory.

`model.path` accepts three kinds of names, tried in this order:
  1. a local directory holding config.json → itself;
  2. a built-in name (`tiny-qwen2`, `smollm2-135m-instruct`) → its cached directory;
  3. a hub id `org/name` → downloaded (or found in the HF cache) by `huggingface_hub`.
Anything else is a UserError naming the input and what would work instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from verlcli.errors import UserError
from verlcli.models.builtin import BUILTINS, ensure_builtin

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what loading needs: no .bin/.pt duplicates, no GGUF/ONNX exports.
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def _builtin_list() -> str:
    return ", ".join(BUILTINS)


def _looks_local(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~")) or name in (".", "..")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _check_local_dir(path: Path, name: str) -> Path:
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        hint = ("it looks like a training checkpoint: run `verl merge-checkpoint "
                f"{name}` to turn it into a Hugging Face directory"
                if (path / ".metadata").exists() or any(path.glob("*.distcp"))
                else "point model.path at a Hugging Face model directory (config.json, "
                     "safetensors weights, tokenizer files)")
        raise UserError(f"model directory {name} has no config.json", fix=hint)
    if path.exists():
        raise UserError(f"model path {name} is a file, not a Hugging Face model directory",
                        fix="point model.path at the directory that holds config.json")
    raise UserError(f"model path {name} does not exist",
                    fix=f"check the path, or use a built-in model ({_builtin_list()}) "
                        "or a hub id like Qwen/Qwen2.5-0.5B-Instruct")


def _download(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=_HUB_FILES)
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError,
            hf_errors.GatedRepoError) as e:
        raise UserError(f"model {repo_id!r} could not be fetched from the Hugging Face hub "
                        f"({type(e).__name__})",
                        fix="check the id's spelling; for a private or gated model run "
                            "`hf auth login` first") from None
    except Exception as e:  # offline, connection refused, DNS, timeouts, ...
        raise UserError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({type(e).__name__})",
            fix=f"use a local model directory, or a built-in model ({_builtin_list()}), or "
                "download it on a machine with network (`hf download "
                f"{repo_id}`) and copy the directory here") from None
    path = Path(path)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise UserError(f"hub model {repo_id!r} has no config.json or no safetensors weights",
                        fix="use a model published with safetensors weights, or convert it "
                            "and pass the local directory")
    return path


def resolve_model(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """Return a local directory holding a Hugging Face model for `name_or_path`."""
    name = os.fspath(name_or_path).strip()
    if not name:
        raise UserError("model.path is empty",
                        fix=f"set model.path to a directory, a built-in ({_builtin_list()}) "
                            "or a hub id")
    path = Path(name).expanduser()
    if path.exists() or _looks_local(name):
        return _check_local_dir(path, name)
    if name in BUILTINS:
        return ensure_builtin(name)
    if _HUB_ID.match(name):
        return _download(name, revision)
    raise UserError(f"unknown model {name!r}: not a local directory, not a built-in, "
                    "not a hub id (org/name)",
                    fix=f"use a model directory, a built-in ({_builtin_list()}), "
                        "or a hub id like Qwen/Qwen2.5-0.5B-Instruct")
