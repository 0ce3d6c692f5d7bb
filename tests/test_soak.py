"""A 50-turn soak of the Python API on the default model (the 1,000-turn run: benchmarks/soak.py).

Context rollover (n_ctx 256), clear() every 20 turns, a cancelled stream every 7th turn; after 20 turns of
warm-up the RSS stays within 16 MiB and the open file descriptors and threads do not change.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_soak_50_turns(default_model_path):
    import edgerun
    from soak import run

    s = edgerun.load(str(default_model_path), n_ctx=256, max_tokens=6, temperature=0.7, seed=0, threads=1)
    r = run(50, 20, clear_every=20, session=s, log=None)["summary"]
    assert r["counts"]["cancelled"] == 7 and r["counts"]["clear"] == 2
    assert r["counts"]["trimmed_turns"] > 0                     # the context did roll over
    assert r["rss_growth_after_warmup_mib"] < 16, r
    assert len(r["fds_after_warmup"]) == 1 and len(r["threads_after_warmup"]) == 1, r


def test_freed_heap_goes_back_to_the_kernel():
    """A fragmented heap (freed 64 KiB blocks between live ones, as a closed model's tensors leave)
    stays resident until :func:`release_free_memory` trims it (glibc)."""
    import ctypes.util

    import psutil
    import pytest

    from edgerun.procmem import release_free_memory

    if "libc" not in (ctypes.util.find_library("c") or "") or not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("malloc_trim is glibc's")
    proc = psutil.Process()
    blocks = [bytearray(64 * 1024) for _ in range(3200)]          # 200 MiB below the mmap threshold
    keep = blocks[::16]                                           # live blocks pin the heap's pages
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])                      # touch every page
    del blocks
    freed = proc.memory_info().rss
    assert release_free_memory()
    trimmed = proc.memory_info().rss
    assert freed - trimmed > 100 * 2**20, (freed / 2**20, trimmed / 2**20)
    assert len(keep) == 200
