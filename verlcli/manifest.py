"""A checkpoint's manifest: every file's size and sha256, written last.

`write_manifest(DIR)` lists every file under DIR (`manifest.json` itself excluded), fsyncs
them (a power loss must not leave a renamed checkpoint with empty files) and writes
`DIR/manifest.json`. `check_manifest(DIR)` says what does not match: a missing, extra-sized
or changed file. Sizes are cheap to check (resume does it); sha256 reads everything
(merge-checkpoint does it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from verlcli.io import write_json_atomic

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 8 << 20


def _hash_and_sync(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):  # hashlib releases the GIL: threads read in parallel
            h.update(chunk)
        os.fsync(f.fileno())
        size = f.tell()
    return size, h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)


def write_manifest(root: str | os.PathLike, **info) -> dict:
    """Hash and fsync every file under `root`, then write root/manifest.json. Returns it."""
    root = Path(root)
    files = _files(root)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        sums = list(pool.map(_hash_and_sync, files))
    entries = {p.relative_to(root).as_posix(): {"bytes": n, "sha256": h} for p, (n, h) in zip(files, sums)}
    manifest = {"format": FORMAT, "created": time.time(), **info,
                "total_bytes": sum(n for n, _ in sums), "files": entries}
    write_json_atomic(root / MANIFEST, manifest)
    _fsync_dir(root)
    return manifest


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest, or None when there is none or it is unreadable (a half-written one)."""
    try:
        m = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def check_manifest(root: str | os.PathLike, hashes: bool = False, under: str = "",
                   allow_extra: bool = False) -> list[str]:
    """Problems with `root` against its manifest (empty list = it matches).

    hashes: also compare sha256 (reads every byte). under: only files below this
    sub-directory (e.g. 'actor' when exporting one role). allow_extra: files the manifest
    does not list are fine (e.g. a merge-checkpoint export written into the step dir)."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        return [f"no readable {MANIFEST}"]
    problems = []
    prefix = under.rstrip("/") + "/" if under else ""
    listed = {k: v for k, v in manifest["files"].items() if k.startswith(prefix)}
    for rel, want in listed.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = p.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{rel} has {size} bytes, the manifest says {want['bytes']}")
        elif hashes and _hash_and_sync(p)[1] != want["sha256"]:
            problems.append(f"{rel} has a different sha256 than the manifest says")
    base = root / under if under else root
    for p in _files(base) if base.is_dir() and not allow_extra else []:
        rel = p.relative_to(root).as_posix()
        if rel not in listed:
            problems.append(f"{rel} is not in the manifest")
    return problems


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
