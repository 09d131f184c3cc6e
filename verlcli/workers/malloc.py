"""Host memory the allocator keeps: glibc malloc in a long-running worker process.

A hybrid worker allocates and frees gigabytes per step in phases that do not share sizes:
vLLM's weight reload materializes each layer and repacks it (oneDNN copies, freed next sync),
generation builds per-request buffers, the update's activations and logits come and go. glibc
keeps freed chunks in its arenas (one per thread that allocated, up to 8 × cores) and returns
them to the OS only from the top of a heap, so the resident size of the process grows with the
fragmentation: measured here as a peak above the live tensors and a creep across steps
(BENCHMARKS.md, Memory). Two remedies, both plain glibc:

* `MALLOC_ARENA_MAX` (set for CPU workers by the trainer, see trainer/setup.py): fewer arenas,
  so memory one thread freed is reused by the next phase instead of sitting in another arena.
* `trim()` after each phase: `malloc_trim(0)` hands every free page of every arena back to the
  OS (madvise), whatever its position in the heap. Cheap next to a phase (milliseconds).

Elsewhere (musl, macOS) both are no-ops. `VERL_MALLOC_TRIM=0` turns the trims off (to measure
what they save: bench/memory.py). Each trim records the RSS before it and what it released,
per phase, for the step's metrics (`mem/<phase>_rss_gb`, `mem/<phase>_trimmed_gb`).
"""

from __future__ import annotations

import ctypes
import os
import sys

from verlcli.distributed.worker import rss_bytes

_libc = None
last: dict[str, float] = {}  # phase → RSS before its trim and bytes the trim released (GB)


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libc.so.6")
                lib.malloc_trim  # noqa: B018 - glibc only
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc or None


def trim(phase: str) -> None:
    """At the end of `phase`: give the free pages of every malloc arena back to the OS."""
    lib = _glibc()
    before = rss_bytes()
    if lib and os.environ.get("VERL_MALLOC_TRIM", "1") != "0":
        lib.malloc_trim(0)
    last[f"mem/{phase}_rss_gb"] = before / 2**30
    last[f"mem/{phase}_trimmed_gb"] = (before - rss_bytes()) / 2**30
