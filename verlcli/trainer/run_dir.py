"""The run directory: config.yaml, metrics.jsonl, checkpoints/step_N/ — and resume.

Checkpoints appear atomically (written to a temp name, renamed when complete), so the
newest `step_N` directory is always a whole checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from verlcli.errors import UserError
from verlcli.io import write_text_atomic

STEP_RE = re.compile(r"^step_(\d+)$")


def prepare(cfg, to_yaml) -> Path:
    run = Path(cfg.run_dir)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run / "config.yaml", to_yaml(cfg))
    return run


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = []
    for p in (run / "checkpoints").glob("step_*"):
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resume_from(cfg, run: Path) -> Path | None:
    """trainer.resume: auto (newest complete checkpoint, if any), never, or a path."""
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = checkpoints(run)
        return found[-1][1] if found else None
    path = Path(mode)
    if not (path / "trainer.json").exists():
        raise UserError(
            f"trainer.resume={mode} is not a complete checkpoint (no trainer.json)",
            fix="point it at a checkpoints/step_N directory, or use trainer.resume=auto / never",
        )
    return path


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step}"


def prune(run: Path, keep: int) -> None:
    for _, p in checkpoints(run)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
