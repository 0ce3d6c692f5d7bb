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
