"""Longer fuzz campaigns over every reader of user files: executions, outcomes, coverage, findings.

The readers, seeds and property are those of the fast test tier (``tests/fuzz_targets.py``); here each
reader gets a time budget instead of a fixed count, hypothesis runs in rounds of fresh random seeds, and
a violation is recorded (exception, where it was raised, the input) instead of stopping the run. Line
coverage of the reader modules is measured with coverage.py when it is installed (``pip install
coverage``). ``--atheris`` adds a coverage-guided (libFuzzer) run of the binary readers in a child
process per reader, when atheris is installed; it is optional and not a project dependency.

    python benchmarks/fuzz_campaign.py --seconds 20          # per reader; writes benchmarks/results/fuzz_campaign.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import fuzz_targets as ft  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# the modules whose lines count for coverage, per reader
MODULES = {
    "gguf": ["edgerun/formats/gguf.py"],
    "safetensors": ["edgerun/formats/safetensors.py"],
    "checkpoint-config": ["edgerun/formats/safetensors.py", "edgerun/kv/layout.py"],
    "kv-layout": ["edgerun/formats/yamlfile.py", "edgerun/kv/layout.py"],
    "merge-recipe": ["edgerun/formats/yamlfile.py", "converters/merge.py", "converters/params.py"],
    "export-recipe": ["edgerun/formats/yamlfile.py", "converters/passes.py", "converters/params.py"],
    "sweep": ["edgerun/formats/yamlfile.py", "profilers/sweep.py"],
    "device": ["edgerun/formats/yamlfile.py", "edgerun/device.py"],
    "expert-pattern": ["edgerun/moe/tcess.py"],
    "manifest": ["converters/manifest.py"],
    "onnx-genai-config": ["edgerun/backends/onnx.py"],
    "onnx-graph": ["edgerun/backends/onnx.py"],
}


def where(e: BaseException) -> str:
    """file:line of the innermost frame inside the repository (the reader's line that raised)."""
    inner = e.__cause__ or e
    frames = [f for f in traceback.extract_tb(inner.__traceback__) if str(ROOT) in f.filename]
    f = frames[-1] if frames else traceback.extract_tb(inner.__traceback__)[-1]
    return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}"


def campaign(target: ft.Target, seconds: float, work: Path) -> dict:
    seeds = target.seeds(work / "seeds")
    box = work / "input"
    box.mkdir(exist_ok=True)
    counts = {"ok": 0, "error": 0, "violation": 0}
    findings: dict[str, dict] = {}
    slowest = [0.0]

    def one(data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            counts[ft.check(target, box, data)] += 1
        except ft.PropertyViolation as e:
            counts["violation"] += 1
            key = f"{type(e.__cause__ or e).__name__} at {where(e)}"
            f = findings.setdefault(key, {"message": str(e)[:300], "count": 0, "input": data[:400].hex()})
            f["count"] += 1
        slowest[0] = max(slowest[0], time.perf_counter() - t0)

    ft.check(target, box, seeds[0])        # warm-up: imports (torch, onnx) are not a reader's time
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        @seed(rounds * 7919 + hash(target.name) % 1000)
        @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(ft.inputs(target, seeds))
        def run(data):
            one(data)
        run()
        rounds += 1
    return {"executions": sum(counts.values()), "seconds": round(time.perf_counter() - start, 1),
            "outcomes": counts, "slowest_input_s": round(slowest[0], 4), "findings": findings}


ATHERIS_CHILD = r"""
import sys, time, json
sys.path[:0] = [{root!r}, {tests!r}]
import atheris
with atheris.instrument_imports(include=["edgerun.formats"]):   # before anything imports edgerun
    from edgerun.formats import gguf, safetensors  # noqa
import fuzz_targets as ft                 # the harness itself is not instrumented, only the readers
from pathlib import Path
target = ft.TARGETS[{name!r}]
box = Path({box!r}); box.mkdir(exist_ok=True)
seeds = Path({corpus!r}); seeds.mkdir(exist_ok=True)
for i, s in enumerate(target.seeds(Path({work!r}))):
    (seeds / f"seed{{i}}").write_bytes(s)
n = [0]
def one(data):
    n[0] += 1
    ft.check(target, box, data)      # a PropertyViolation makes atheris report the input and stop
atheris.Setup([sys.argv[0], "-max_total_time={seconds}", "-max_len=4096", "-print_final_stats=1", str(seeds)], one)
atheris.Fuzz()
"""


def atheris_run(name: str, seconds: int, work: Path) -> dict:
    """libFuzzer's coverage-guided run of one binary reader in a child process (a crash stays in the child)."""
    code = ATHERIS_CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), name=name, box=str(work / "abox"),
                                corpus=str(work / "acorpus"), work=str(work), seconds=seconds)
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 300)
    except subprocess.TimeoutExpired:
        return {"seconds": round(time.perf_counter() - t0, 1), "returncode": None, "executions": None,
                "finding": ["did not finish (timeout)"]}
    stats = {}
    for line in p.stderr.splitlines():
        if line.startswith("stat::"):
            k, v = line[6:].split(":", 1)
            stats[k.strip()] = int(v.strip())
    crash = [line for line in p.stderr.splitlines() if "PropertyViolation" in line or "Uncaught" in line]
    return {"seconds": round(time.perf_counter() - t0, 1), "returncode": p.returncode,
            "executions": stats.get("number_of_executed_units"), "libfuzzer_stats": stats, "finding": crash[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget per reader (default 20)")
    ap.add_argument("--only", nargs="*", help="readers to fuzz (default: all)")
    ap.add_argument("--atheris", type=int, default=0, metavar="S",
                    help="also S seconds of atheris on the binary readers (gguf, safetensors)")
    ap.add_argument("--out", type=Path, default=RESULTS / "fuzz_campaign")
    args = ap.parse_args()
    names = args.only or sorted(ft.TARGETS)
    try:
        import coverage
        cov = coverage.Coverage(data_file=None, include=[str(ROOT / m) for ms in MODULES.values() for m in ms])
    except ImportError:
        cov = None
    load0 = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            work = Path(tmp) / name
            (work / "seeds").mkdir(parents=True)
            if cov:
                cov.erase()
                cov.start()
            r = campaign(ft.TARGETS[name], args.seconds, work)
            if cov:
                cov.stop()
                lines = total = 0
                for m in MODULES[name]:
                    _, statements, _, missing, _ = cov.analysis2(str(ROOT / m))
                    lines += len(statements) - len(missing)
                    total += len(statements)
                r["coverage"] = {"modules": MODULES[name], "lines_run": lines, "lines": total,
                                 "percent": round(100 * lines / max(total, 1), 1)}
            results[name] = r
            print(f"{name:18s} {r['executions']:7d} inputs  {r['outcomes']}  findings {len(r['findings'])}"
                  + (f"  coverage {r['coverage']['percent']}%" if cov else ""), flush=True)
        atheris_results = {}
        if args.atheris:
            try:
                import atheris  # noqa: F401
                for name in ("gguf", "safetensors"):
                    atheris_results[name] = atheris_run(name, args.atheris, Path(tmp) / name)
                    print(f"atheris {name}: {atheris_results[name]}", flush=True)
            except ImportError:
                atheris_results = {"skipped": "atheris is not installed"}
    record = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load0,
                          "loadavg_end": os.getloadavg()},
              "seconds_per_reader": args.seconds, "time_bound_s": ft.TIME_BOUND_S,
              "memory_bound_bytes": ft.MEMORY_BOUND, "readers": results, "atheris": atheris_results,
              "coverage_tool": f"coverage.py {coverage.__version__}" if cov else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    rows = ["| reader | inputs | value | one-line error | violations | distinct findings | slowest input | line coverage |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        c = r.get("coverage")
        rows.append(f"| {name} | {r['executions']} | {r['outcomes']['ok']} | {r['outcomes']['error']} | "
                    f"{r['outcomes']['violation']} | {len(r['findings'])} | {r['slowest_input_s'] * 1000:.0f} ms | "
                    + (f"{c['percent']}% of {c['lines']} ({', '.join(c['modules'])})" if c else "n/a") + " |")
    findings = [f"- {name}: `{k}` x{v['count']}: {v['message']}" for name, r in results.items()
                for k, v in r["findings"].items()]
    text = (f"# Fuzz campaign\n\n`python benchmarks/fuzz_campaign.py --seconds {args.seconds:g}"
            + (f" --atheris {args.atheris}" if args.atheris else "") + "`: hypothesis, "
            f"{args.seconds:g} s per reader on {os.cpu_count()} CPUs (load average {load0[0]:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end). Bounds per input: {ft.TIME_BOUND_S:g} s, "
            f"{ft.MEMORY_BOUND // 2**20} MiB of Python allocations.\n\n" + "\n".join(rows) + "\n\n"
            + ("Findings (violations of the property):\n\n" + "\n".join(findings) + "\n" if findings
               else "No violations.\n"))
    if atheris_results:
        text += "\natheris (coverage-guided, libFuzzer, one child process per reader):\n\n"
        for name, r in atheris_results.items():
            text += f"- {name}: {r}\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
