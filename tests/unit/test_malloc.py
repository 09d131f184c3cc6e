"""workers/malloc.py: trimming glibc's arenas after a phase gives freed memory back to the OS."""

from __future__ import annotations

import sys

import pytest

from verlcli.workers import malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trim_returns_freed_heap_memory_and_records_the_phase():
    # Many 64 KB blocks (below glibc's mmap threshold: they live in the heap), the LAST one
    # kept alive so the heap cannot shrink from its top when the others are freed: only
    # malloc_trim gives the pages below it back (what the worker's phases leave behind).
    blocks = [bytearray(64 << 10) for _ in range(3000)]  # ~200 MB, touched (zero-filled)
    keep = blocks[-1:]
    del blocks
    malloc.trim("test")
    assert malloc.last["mem/test_rss_gb"] > 0
    assert malloc.last["mem/test_trimmed_gb"] > 0.05  # most of the ~0.2 GB went back
    del keep
