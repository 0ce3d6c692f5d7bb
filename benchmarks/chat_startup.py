"""`edgerun chat -p` end to end (process start to exit, one short answer) vs a minimal llama-cpp-python script.

Both are fresh processes on the same GGUF, the same threads (2), context (4096) and greedy sampling,
answering the same question with at most 16 tokens. They run as interleaved pairs (A B, B A, ...,
one uncounted warm-up pair first) so that machine drift hits both; per process this records wall
time (start to exit, s), CPU time (user + system of that process, s) and peak RSS (``ru_maxrss`` of
that one child from ``os.wait4``, so it is the process's own peak). A pair where either process got
less than half its wall time in CPU is flagged (another process took the cores).

The aim (the fast-load-path issue): a ratio edgerun / script of at most 1.10 in wall time and in
peak RSS. The edgerun side includes what the user gets: GGUF validation (the bounds-checked scan),
the catalog, the chat template, the session.

Usage: python benchmarks/chat_startup.py [--pairs 9] [--model NAME_OR_PATH]
Writes benchmarks/results/chat_startup.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from profilers.report import quartiles

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "What is the capital of Germany?"

RAW = """
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=4096, n_threads=2, n_threads_batch=2, n_batch=512,
                      verbose=False)
out = llm.create_chat_completion(messages=[{"role": "user", "content": sys.argv[2]}], max_tokens=16,
                                 temperature=0.0)
print(out["choices"][0]["message"]["content"])
"""


def run(cmd: list[str]) -> dict:
    """Run ``cmd`` to completion; its wall time (s), CPU time (s), peak RSS (bytes, that child's own
    ``ru_maxrss`` from ``os.wait4``, Linux kilobytes) and exit code. Output goes to temporary files, so a
    talkative child cannot block on a full pipe."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "rc": os.waitstatus_to_exitcode(status), "text": text.strip()[:80]}


def spread(xs: list[float]) -> dict:
    """Median, quartiles (the report's inclusive method), min, max and n of ``xs``."""
    q1, median, q3 = quartiles(xs)
    return {"median": median, "q1": q1, "q3": q3, "min": min(xs), "max": max(xs), "n": len(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="catalog name or GGUF path (default: the default model)")
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("error: this benchmark reads each child's peak RSS with os.wait4 in Linux units", file=sys.stderr)
        return 2

    import llama_cpp

    from edgerun import __version__, catalog
    from edgerun.procmem import peak_rss_bytes

    path = catalog.pull(args.model or catalog.DEFAULT_MODEL, progress=False) if not args.model or \
        not Path(args.model).exists() else Path(args.model)
    exe = shutil.which("edgerun") or f"{sys.executable} -m edgerun.cli"
    sides = {
        "edgerun": [*exe.split(), "chat", str(path), "-p", QUESTION, "--max-tokens", "16", "--temperature", "0",
                    "--threads", "2", "--ctx-size", "4096"],
        "script": [sys.executable, "-c", RAW, str(path), QUESTION],
    }
    rows = {s: [] for s in sides}
    flagged = 0
    for i in range(args.pairs + 1):
        order = ("edgerun", "script") if i % 2 == 0 else ("script", "edgerun")
        pair = {s: run(sides[s]) for s in order}
        if any(r["rc"] != 0 for r in pair.values()):
            print(json.dumps(pair, indent=1), file=sys.stderr)
            return 1
        if i == 0:
            continue                                             # warm-up: page cache, first imports
        lost = any(r["cpu_s"] < 1.2 * r["wall_s"] for r in pair.values())   # both use ~1.5 cores when alone
        flagged += lost
        for s, r in pair.items():
            rows[s].append({**r, "pair": i, "lost_cpu": lost})
    result = {
        "benchmark": "chat_startup", "model": path.name, "question": QUESTION, "max_tokens": 16, "threads": 2,
        "ctx_size": 4096, "pairs": args.pairs, "flagged_pairs": flagged,
        "wall_s": {s: spread([r["wall_s"] for r in rows[s]]) for s in rows},
        "cpu_s": {s: spread([r["cpu_s"] for r in rows[s]]) for s in rows},
        "peak_rss_mib": {s: spread([r["peak_rss_bytes"] / 2**20 for r in rows[s]]) for s in rows},
        "ratio_wall": spread([a["wall_s"] / b["wall_s"] for a, b in zip(rows["edgerun"], rows["script"])]),
        "ratio_peak_rss": spread([a["peak_rss_bytes"] / b["peak_rss_bytes"]
                                  for a, b in zip(rows["edgerun"], rows["script"])]),
        "answers": {s: rows[s][0]["text"] for s in rows},
        # a child's ru_maxrss can carry over the parent's peak at fork: the parent's stays far below the children's
        "parent_peak_rss_mib": peak_rss_bytes() / 2**20,
        "runs": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "llama_cpp_python": llama_cpp.__version__, "edgerun": __version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat_startup.json").write_text(json.dumps(result, indent=1) + "\n")

    def cell(d, spec=".2f"):
        return f"{format(d['median'], spec)} [{format(d['q1'], spec)}-{format(d['q3'], spec)}]"

    md = ["# `edgerun chat -p` vs a minimal llama-cpp-python script, end to end", "",
          f"{result['date']}, {path.name}, one question, at most 16 tokens, greedy, 2 threads, context 4096; "
          f"{args.pairs} interleaved pairs after one warm-up pair ({flagged} flagged for lost CPU). "
          "Median [IQR] per process.", "",
          "| side | wall s | CPU s | peak RSS MiB |", "|---|---|---|---|"]
    for s, label in (("edgerun", "`edgerun chat -p`"), ("script", "llama-cpp-python script")):
        md.append(f"| {label} | {cell(result['wall_s'][s])} | {cell(result['cpu_s'][s])} | "
                  f"{cell(result['peak_rss_mib'][s], '.0f')} |")
    rw, rr = result["ratio_wall"], result["ratio_peak_rss"]
    md += ["", f"Ratio edgerun / script per pair: wall time **{cell(rw, '.3f')}**, peak RSS **{cell(rr, '.3f')}** "
               "(aim: at most 1.10 for both). A pair is flagged when either process got less than 1.2 cores "
               f"on average (alone both get about 1.5); the parent's own peak RSS, "
               f"{result['parent_peak_rss_mib']:.0f} MiB, stays below the children's.", "",
           f"Answers: edgerun {result['answers']['edgerun']!r}; script {result['answers']['script']!r}.", ""]
    (args.out / "chat_startup.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
