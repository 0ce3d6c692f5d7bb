"""Soak: many chat turns through the Python API; RSS, open file descriptors and threads sampled every turn.

    python benchmarks/soak.py --turns 1000          # writes benchmarks/results/soak.{json,md}

One session on the default model (``edgerun.load()``) with a small context (``n_ctx`` 256) so the
history rolls over (the session trims the oldest turns) again and again, short replies (``max_tokens``
8), ``session.clear()`` every 50 turns, and a cancelled reply every 7th turn (the stream iterator is
closed after its first piece). After a warm-up (the first ``--warmup`` turns) the RSS must stay within
``--bound`` MiB of its warm-up value; the least-squares slope over the remaining turns is reported in
KiB per turn, with the threads and file descriptors (their set of values after warm-up). Adaptive-expert
switches are not in this run: they need the carved MoE on the torch engine (seconds per turn; see
docs/reliability.md). ``run()`` is the same loop for the test suite's 50-turn version.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["What is the capital of France?", "Name a prime number.", "Say hello in Spanish.",
           "Give me one word that rhymes with cat.", "What colour is the sky?", "Count to five.",
           "Write a very short poem about rain.", "What is 2 + 2?", "Tell me a fun fact about owls.",
           "Describe a chair in one sentence."]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def run(turns: int, warmup: int, n_ctx: int = 256, max_tokens: int = 8, clear_every: int = 50,
        cancel_every: int = 7, session=None, log=print, threads: int | None = None,
        max_seconds: float | None = None) -> dict:
    """The soak loop; returns the per-turn samples and the summary (see the module docstring)."""
    import edgerun

    proc = psutil.Process()
    s = session or edgerun.load(n_ctx=n_ctx, max_tokens=max_tokens, temperature=0.7, seed=0, threads=threads)
    samples, counts = [], {"full": 0, "cancelled": 0, "clear": 0, "trimmed_turns": 0}
    t0 = time.perf_counter()
    for turn in range(turns):
        if max_seconds and time.perf_counter() - t0 > max_seconds and turn > warmup + 10:
            log(f"stopped at turn {turn}: the --max-seconds budget is spent")
            break
        if turn and turn % clear_every == 0:
            s.clear()
            counts["clear"] += 1
        prompt = PROMPTS[turn % len(PROMPTS)] + f" (turn {turn})"
        before = len(s.messages)
        if turn % cancel_every == cancel_every - 1:
            it = s.chat(prompt)
            next(it, None)
            it.close()                                 # the caller stops reading: a cancellation
            counts["cancelled"] += 1
        else:
            "".join(s.chat(prompt))
            counts["full"] += 1
        if len(s.messages) <= before:
            counts["trimmed_turns"] += 1               # the history did not grow: its oldest turns were dropped
        if turn % 25 == 0:
            gc.collect()
        mem = proc.memory_info()
        samples.append({"turn": turn, "rss": mem.rss, "fds": proc.num_fds(), "threads": proc.num_threads(),
                        "t": round(time.perf_counter() - t0, 3)})
        if log and turn % 100 == 0:
            log(f"turn {turn}: rss {mem.rss / 2**20:.1f} MiB, fds {samples[-1]['fds']}, "
                f"threads {samples[-1]['threads']}, {samples[-1]['t']:.0f} s")
    after = samples[warmup:]
    base = after[0]["rss"]
    summary = {
        "turns": len(samples), "turns_asked": turns, "threads": threads, "warmup": warmup, "n_ctx": n_ctx, "max_tokens": max_tokens, "counts": counts,
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_start_mib": round(samples[0]["rss"] / 2**20, 2), "rss_after_warmup_mib": round(base / 2**20, 2),
        "rss_max_after_warmup_mib": round(max(x["rss"] for x in after) / 2**20, 2),
        "rss_end_mib": round(samples[-1]["rss"] / 2**20, 2),
        "rss_growth_after_warmup_mib": round((max(x["rss"] for x in after) - base) / 2**20, 2),
        "rss_slope_kib_per_turn": round(slope([x["turn"] for x in after], [x["rss"] for x in after]) / 1024, 3),
        "fds_after_warmup": sorted({x["fds"] for x in after}),
        "threads_after_warmup": sorted({x["threads"] for x in after}),
    }
    return {"summary": summary, "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--bound", type=float, default=16.0, help="allowed RSS growth after warm-up, MiB (default 16)")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop early after this long (reported)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    args = ap.parse_args()
    load0 = os.getloadavg()
    r = run(args.turns, args.warmup, n_ctx=args.n_ctx, max_tokens=args.max_tokens, threads=args.threads,
            max_seconds=args.max_seconds)
    s = r["summary"]
    s["bound_mib"] = args.bound
    s["within_bound"] = s["rss_growth_after_warmup_mib"] <= args.bound
    s["fds_constant"] = len(s["fds_after_warmup"]) == 1
    s["threads_constant"] = len(s["threads_after_warmup"]) == 1
    s["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load0,
                    "loadavg_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(r, indent=0) + "\n")
    c = s["counts"]
    md = f"""# Soak: {s['turns']} chat turns through the Python API

`python benchmarks/soak.py --turns {s['turns_asked']}`: `edgerun.load()` (SmolLM2-135M-Instruct, llama.cpp), n_ctx
{s['n_ctx']}, max_tokens {s['max_tokens']}, threads {s['threads'] or 'default'}; {s['turns']} of {s['turns_asked']} turns run; {c['full']} full replies, {c['cancelled']} cancelled after the
first piece (stream closed), {c['clear']} `clear()`, the history trimmed by the context on {c['trimmed_turns']}
turns. {s['seconds']:.0f} s on {os.cpu_count()} CPUs, load average {load0[0]:.2f} at the start and
{os.getloadavg()[0]:.2f} at the end (other work shared the machine).

| measure | value |
|---|---|
| RSS at turn 0 | {s['rss_start_mib']} MiB |
| RSS after warm-up ({s['warmup']} turns) | {s['rss_after_warmup_mib']} MiB |
| RSS max after warm-up | {s['rss_max_after_warmup_mib']} MiB |
| RSS at the end | {s['rss_end_mib']} MiB |
| growth after warm-up (bound {args.bound:g} MiB) | {s['rss_growth_after_warmup_mib']} MiB ({'within' if s['within_bound'] else 'OVER'} the bound) |
| RSS slope after warm-up | {s['rss_slope_kib_per_turn']} KiB/turn |
| open file descriptors after warm-up | {s['fds_after_warmup']} |
| threads after warm-up | {s['threads_after_warmup']} |

Adaptive-expert switches are not in this soak (they need the carved MoE on the torch engine, seconds per
turn); the server soak is left until `edgerun serve` is committed.
"""
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if s["within_bound"] and s["fds_constant"] and s["threads_constant"] else 1


if __name__ == "__main__":
    sys.exit(main())
