"""Interrupted-write trials: writers killed by SIGINT/SIGTERM at random moments, outcomes counted.

    python benchmarks/interrupt_trials.py --trials 10 [--real]    # writes benchmarks/results/interrupt_trials.{json,md}

Writers: the atomic file and directory writers (edgerun/atomic.py, in a subprocess), ``edgerun bench
report`` on the recorded BPW sweep, and with ``--real`` ``edgerun export`` of the default model to
GGUF Q8_0 (needs the model and its cached float32 source). Each trial sends the signal after a random
delay and classifies the destination: ``complete`` (the whole output, checked), ``nothing`` (absent, or
for bench report the previous files unchanged), or a failure (``partial``: an incomplete output;
``leftover``: a temporary left beside it; ``traceback``: the command crashed instead of stopping).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import cli_env, edgerun_cmd  # noqa: E402
from test_interrupt import (WRITER, _complete_dir, _complete_file, _export_ok, interrupt, leftovers,  # noqa: E402
                            no_traceback)

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
TERM_PRELUDE = "import signal, sys; signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))\n"


def trial_atomic(kind: str, sig: int, rng: random.Random, work: Path) -> str:
    dest = work / "out"
    prelude = TERM_PRELUDE if sig == signal.SIGTERM else ""
    code, err = interrupt([sys.executable, "-c", prelude + WRITER, kind, str(dest), "40"], rng.uniform(0, 0.25), sig,
                          ready="ready", env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if leftovers(work):
        return "leftover"
    if not dest.exists():
        return "nothing"
    return "complete" if (_complete_file if kind == "file" else _complete_dir)(dest, 40) else "partial"


def trial_report(sig: int, rng: random.Random, work: Path) -> str:
    shutil.copy(ROOT / "benchmarks" / "results" / "bpw_sweep" / "runs.jsonl", work / "runs.jsonl")
    (work / "summary.md").write_text("old summary\n")
    code, err = interrupt(edgerun_cmd("bench", "report", str(work)), rng.uniform(0.3, 25.0), sig, env=cli_env())
    if not no_traceback(err):
        return "traceback"
    if leftovers(work):
        return "leftover"
    summary = (work / "summary.md").read_text()
    pngs_ok = all(p.read_bytes()[-8:-4] == b"IEND" for p in work.glob("*.png"))
    if summary == "old summary\n" and pngs_ok:
        return "nothing"
    try:
        json.loads((work / "summary.json").read_text())
    except (OSError, ValueError):
        return "partial"
    return "complete" if summary.startswith("#") and pngs_ok else "partial"


def trial_export(sig: int, rng: random.Random, work: Path) -> str:
    out = work / "m.gguf"
    code, err = interrupt(edgerun_cmd("export", "smollm2-135m-instruct", "--quant", "Q8_0", "-o", str(out),
                                      "--no-verify"), rng.uniform(0.5, 10.0), sig, env=cli_env())
    if not no_traceback(err):
        return "traceback"
    if leftovers(work):
        return "leftover"
    if not out.exists():
        return "nothing" if not out.with_name(out.name + ".manifest.json").exists() else "partial"
    try:
        return "complete" if _export_ok(out) else "partial"
    except Exception:  # noqa: BLE001 - an incomplete file or manifest
        return "partial"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10, help="trials per writer and signal (default 10)")
    ap.add_argument("--real", action="store_true", help="also interrupt 'edgerun export' on the default model")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "interrupt_trials")
    args = ap.parse_args()
    writers = {"atomic_file": lambda s, r, w: trial_atomic("file", s, r, w),
               "atomic_dir": lambda s, r, w: trial_atomic("dir", s, r, w),
               "bench report": trial_report}
    if args.real:
        writers["export (GGUF Q8_0, real model)"] = trial_export
    load0 = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in writers.items():
            for sname, sig in SIGNALS.items():
                rng = random.Random(f"{name}{sname}")
                counts: dict[str, int] = {}
                for t in range(args.trials if "real" not in name else max(2, args.trials // 3)):
                    work = Path(tmp) / f"{name}-{sname}-{t}".replace(" ", "_")
                    work.mkdir()
                    outcome = fn(sig, rng, work)
                    counts[outcome] = counts.get(outcome, 0) + 1
                results[f"{name} / {sname}"] = counts
                print(name, sname, counts, flush=True)
    record = {"trials": args.trials, "results": results, "loadavg": [load0, os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    rows = ["| writer / signal | trials | complete | nothing | partial | leftover | traceback |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for k, c in results.items():
        rows.append(f"| {k} | {sum(c.values())} | {c.get('complete', 0)} | {c.get('nothing', 0)} | "
                    f"{c.get('partial', 0)} | {c.get('leftover', 0)} | {c.get('traceback', 0)} |")
    md = ("# Interrupted-write trials\n\n`python benchmarks/interrupt_trials.py --trials "
          f"{args.trials}{' --real' if args.real else ''}`: a signal after a random delay; load average "
          f"{load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.\n\n" + "\n".join(rows) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    bad = sum(c.get(k, 0) for c in results.values() for k in ("partial", "leftover", "traceback"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
