"""The run directory: config.yaml, metrics.jsonl, checkpoints/step_N/ — and resume.

A checkpoint is written into `step_N.tmp/` (engines write their role directories there,
the driver its trainer.json), then `manifest.json` (every file's size and sha256) is
written last and the directory is renamed to `step_N/`. So a `step_N/` always holds a
whole checkpoint; a save killed half-way leaves only a `.tmp` that resume never reads
(and the next start deletes). resume=auto also checks the manifest's sizes, and falls back
to the previous checkpoint with a warning when the newest does not match.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from verlcli.errors import UserError
from verlcli.io import write_text_atomic
from verlcli.manifest import MANIFEST, check_manifest, read_manifest, write_manifest

STEP_RE = re.compile(r"^step_(\d+)$")
TMP, OLD = ".tmp", ".old"
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "file too large", "disk quota exceeded")


def prepare(cfg, to_yaml) -> Path:
    run = Path(cfg.run_dir)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run / "config.yaml", to_yaml(cfg))
    _clean_interrupted_saves(run)
    return run


def _clean_interrupted_saves(run: Path) -> None:
    """A killed save leaves step_N.tmp (incomplete: delete it) or, killed between the two
    renames of a re-save, step_N.old without step_N (complete: put it back)."""
    for p in (run / "checkpoints").glob("step_*"):
        if p.name.endswith(OLD) and p.is_dir():
            final = p.with_name(p.name[: -len(OLD)])
            if not final.exists():
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
    for p in (run / "checkpoints").glob(f"step_*{TMP}"):
        print(f"warning: removing {p}, a checkpoint whose save was interrupted", flush=True)
        shutil.rmtree(p, ignore_errors=True)


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Published checkpoints (step_N with a manifest), oldest first."""
    found = []
    for p in (run / "checkpoints").glob("step_*"):
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resume_from(cfg, run: Path) -> Path | None:
    """trainer.resume: auto (newest checkpoint that matches its manifest), never, or a path."""
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        for _, path in reversed(checkpoints(run)):
            problems = check_manifest(path, allow_extra=True)  # e.g. merge-checkpoint's export inside
            if not problems:
                return path
            print(f"warning: not resuming from {path}: it does not match its manifest "
                  f"({problems[0]}); trying an older checkpoint", flush=True)
        return None
    path = Path(mode)
    if not (path / "trainer.json").exists():
        raise UserError(
            f"trainer.resume={mode} is not a complete checkpoint (no trainer.json)",
            fix="point it at a checkpoints/step_N directory, or use trainer.resume=auto / never",
        )
    problems = check_manifest(path, allow_extra=True) if (path / MANIFEST).exists() else []
    if problems:
        raise UserError(f"trainer.resume={mode} does not match its manifest: {problems[0]}",
                        fix="the checkpoint is damaged: point trainer.resume at another step_N")
    return path


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step}"


def save_step(run: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint `step` atomically: `write(tmp_dir)`, manifest, rename, prune.

    A failure leaves the previous checkpoints as they were and no partial one; a full disk
    becomes a UserError naming the directory and the bytes a checkpoint needs."""
    final = step_dir(run, step)
    tmp = final.with_name(final.name + TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        write_manifest(tmp, step=step)
        _publish(tmp, final)
    except BaseException as e:
        written = _du(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        # Writers do not always pass the errno on (torch's zip writer turns EFBIG into
        # "unexpected pos"), so a failed save also asks the filesystem directly.
        reason = _disk_full_reason(e) or _probe_disk(final.parent, _largest_file(run))
        if reason:
            raise _disk_full_error(run, final, written, reason) from e
        raise
    prune(run, keep)
    return final


def _publish(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + OLD)
    if final.exists():  # re-saving a step (resumed from an older one): keep it until the new one is in
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune(run: Path, keep: int) -> None:
    for _, p in checkpoints(run)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def truncate_metrics(run: Path, last_step: int) -> None:
    """Drop metrics.jsonl rows after the checkpoint we resume from: a killed run logged
    steps that the resumed run trains again, and each step must appear once."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if int(row.get("step", 0)) <= last_step:
            keep.append(line)
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


# ---------------------------------------------------------------- full disk


def _disk_full_reason(e: BaseException) -> str | None:
    """Why the disk is full (ENOSPC / EFBIG / EDQUOT anywhere in the exception chain, or in a
    worker's error text from Ray), or None when `e` is something else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return os.strerror(e.errno).lower()
        text = str(e).lower()
        for t in _DISK_FULL_TEXT:
            if t in text:
                return t
        e = e.__cause__ or e.__context__
    return None


def _largest_file(run: Path) -> int:
    """The largest file of the newest checkpoint (what a save must be able to write), or 64 MB."""
    prev = checkpoints(run)
    manifest = read_manifest(prev[-1][1]) if prev else None
    sizes = [f["bytes"] for f in (manifest or {}).get("files", {}).values()]
    return max(sizes) if sizes else 64 << 20


def _probe_disk(directory: Path, nbytes: int) -> str | None:
    """Try to write `nbytes` (at most 256 MB) beside the checkpoints; the disk-full reason if
    the filesystem refuses, else None. Only runs after a save already failed."""
    probe = directory / f".verl-disk-probe-{os.getpid()}"
    block = b"\0" * (1 << 20)
    try:
        with open(probe, "wb") as f:
            for _ in range(max(1, min(nbytes, 256 << 20) // len(block) + 1)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return os.strerror(e.errno).lower() if e.errno in _DISK_FULL else None
    finally:
        probe.unlink(missing_ok=True)
    return None


def _du(path: Path) -> int:
    try:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _disk_full_error(run: Path, final: Path, written: int, reason: str) -> UserError:
    prev = checkpoints(run)
    manifest = read_manifest(prev[-1][1]) if prev else None
    if manifest is not None:
        need = f"needs about {_fmt_bytes(manifest['total_bytes'])} ({manifest['total_bytes']} bytes, the size of {prev[-1][1].name})"
    else:
        need = f"needs more than the {_fmt_bytes(written)} ({written} bytes) written before the disk filled"
    free = shutil.disk_usage(final.parent).free
    kept = f"; {prev[-1][1]} is intact" if prev else ""
    return UserError(
        f"saving checkpoint {final} failed: out of disk space ({reason}). A checkpoint {need}; "
        f"{_fmt_bytes(free)} free on the filesystem of {final.parent}{kept}",
        fix="free disk space or set trainer.run_dir to a bigger disk, then run the same command "
            "again (it resumes); trainer.keep_checkpoints=1 keeps fewer checkpoints",
    )

