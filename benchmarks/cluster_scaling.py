"""Scaling of sweeps and KV searches on a Ray cluster: 1 vs 2 worker processes, each limited to one core.

Three configurations, each run the same work:

- ``local``: no Ray; the sweep (``profilers.sweep.run``) and the KV search (``edgerun.kv.tune.tune``,
  1 torch thread) in a child process pinned to core 0;
- ``ray-1``: a Ray cluster of one node (``edgerun worker --head``, 1 CPU, pinned to core 0);
- ``ray-2``: two nodes (head on core 0, a worker process on core 1), both offering the same device, so any
  cell and any layout can go to either.

The work: a 16-cell sweep (SmolLM2-135M, GGUF Q8_0 / Q6_K / Q4_0 / Q4_K_M x prompt 32 / 64 tokens x
generate 16 / 32 tokens, one thread, 1 warm-up + 3 cold repetitions per cell, one task per cell) plus
its 4 quality records (perplexity on one window), and a 36-trial NSGA-II KV layout search on SmolLM2
(KVTuner: population 12, 4 layer groups, layouts scored on one 512-token held-out context: the 6
uniform baselines and 36 trials). The per-layer sensitivity the search starts from (210 forwards of
128 calibration tokens) is computed once before the timings and copied into every run, so the timed
part is the search itself. Exports and the float32 checkpoint are made before any timing. Wall times
exclude starting the cluster (reported apart) but include connecting and starting the evaluator
actors (each loads the model); each cluster is started fresh, so the first task of each Ray worker
process pays its imports, as it does on a real fleet.

Configurations alternate within a round and the order reverses from round to round (local, ray-1,
ray-2, then ray-2, ray-1, local), so drift in the machine's load hits all; the 2-core VM is shared, so
the load average is recorded around every measurement. Also measured: a no-op Ray task's round trip
(sequential, the scheduling floor per task), the overhead per sweep task (ray-1 minus local, over the
tasks) and the bytes sent and returned per task.

Usage: python benchmarks/cluster_scaling.py [--rounds 2] [--trials 36]
Writes benchmarks/results/cluster_scaling.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))

MODEL = "smollm2-135m-instruct"
DEVICE = "bench-dev"
SWEEP = f"""\
name: cluster-scaling
devices: [{DEVICE}]
models: [{MODEL}]
variants:
  - {{format: gguf, quant: Q8_0}}
  - {{format: gguf, quant: Q6_K}}
  - {{format: gguf, quant: Q4_0}}
  - {{format: gguf, quant: Q4_K_M}}
backends: [edgerun]
threads: [1]
prompt_tokens: [32, 64]
gen_tokens: [16, 32]
repetitions: 3
warmup: 1
ctx_size: 256
accuracy:
  perplexity_windows: 1
"""


def kv_settings(trials: int) -> dict:
    return dict(budget=4.0, trials=trials, population=12, groups=4, context=512, contexts=1, calib_windows=1,
                calib_len=128, search="nsga2", seed=0, progress=False, log=lambda m: None)


def kv_dir(work: Path, name: str) -> Path:
    """A KV search's output directory, holding the sensitivity computed once before the timings."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_bytes((work / "sensitivity.json").read_bytes())
    return out


class TimedEvaluate:
    """Wraps an ``evaluate(spec, layouts)``: wall seconds and layouts per phase (calibration = sensitivity,
    heldout = uniform baselines and trials), from the first layout asked to the last result."""

    def __init__(self, inner):
        self.inner, self.phases = inner, {}

    def __call__(self, spec, layouts):
        p = self.phases.setdefault(spec.split, {"seconds": 0.0, "layouts": 0, "calls": 0})
        p["calls"] += 1
        last = time.perf_counter()
        for q in self.inner(spec, layouts):    # counted as results arrive (a caller may stop early)
            now = time.perf_counter()
            p["seconds"] += now - last
            p["layouts"] += 1
            yield q
            last = time.perf_counter()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the child process of the local configuration ----------------------------------------------

def child(kind: str, work: Path, trials: int) -> None:
    """Run one configuration's work here (pinned by the parent) and print its timings as JSON."""
    from edgerun.device import load as load_device

    if kind == "sweep":
        from profilers import sweep

        sw = sweep.load(work / "sweep.yaml")
        t0 = time.perf_counter()
        sweep.run(sw, work / "local-sweep", device=load_device(work / f"{DEVICE}.yaml"), progress=False,
                  log=lambda m: None, device_name=DEVICE)
        print(json.dumps({"wall_s": time.perf_counter() - t0}))
    else:
        from converters.source import open_source
        from edgerun.backends.torch import TorchBackend
        from edgerun.kv import tune as kvt

        src = open_source(MODEL, progress=False).path
        t0 = time.perf_counter()
        engine = TorchBackend(src, n_ctx=4096, threads=1)
        timed = TimedEvaluate(kvt.LocalEvaluations(engine.model, engine.tokenizer))
        kvt.tune(src, kv_dir(work, "local-kv"), evaluate=timed, **kv_settings(trials))
        print(json.dumps({"wall_s": time.perf_counter() - t0, "phases": timed.phases}))


def run_child(kind: str, work: Path, trials: int) -> dict:
    def pin():
        os.sched_setaffinity(0, {0})

    r = subprocess.run([sys.executable, __file__, "--child", kind, str(work), "--trials", str(trials)], cwd=ROOT,
                       capture_output=True, text=True, preexec_fn=pin, timeout=3600)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- the cluster configurations ----------------------------------------------------------------

def on_cluster(nodes: int, work: Path, trials: int, tag: str, overhead: bool) -> dict:
    from ray_nodes import LocalCluster, linked_home

    from edgerun import catalog
    from profilers import cluster, sweep

    home = linked_home(catalog.home(), work / "home")
    out = {}
    t0 = time.perf_counter()
    with LocalCluster(work / f"ray-{tag}", env={"EDGERUN_HOME": str(home)}) as lc:
        lc.start("head", work / f"{DEVICE}.yaml", head=True, num_cpus=1, cpus={0})
        if nodes == 2:
            lc.start("w1", work / f"{DEVICE}.yaml", num_cpus=1, cpus={1})
        lc.wait_for({DEVICE: nodes})
        out["cluster_start_s"] = time.perf_counter() - t0
        sw = sweep.load(work / "sweep.yaml")
        load0 = load()
        t = time.perf_counter()
        cluster.run_sweep(sw, work / f"sweep-{tag}", lc.address, progress=False, log=lambda m: None)
        out["sweep"] = {"wall_s": time.perf_counter() - t, "load_before": load0, "load_after": load()}
        recs = [json.loads(line) for line in (work / f"sweep-{tag}" / "runs.jsonl").read_text().splitlines()]
        out["sweep"]["ok"] = sum(r["status"] == "ok" for r in recs)
        out["sweep"]["nodes_used"] = len({(r.get("node") or {}).get("ray_node_id") for r in recs})
        src = cluster.checkpoint_dir(MODEL)
        load0 = load()
        t = time.perf_counter()
        with cluster.LayoutPool(lc.address, MODEL, src) as pool:
            timed = TimedEvaluate(pool)
            from edgerun.kv import tune as kvt

            kvt.tune(src, kv_dir(work, f"kv-{tag}"), evaluate=timed, **kv_settings(trials))
        out["kv"] = {"wall_s": time.perf_counter() - t, "phases": timed.phases, "load_before": load0,
                     "load_after": load(), "actors": nodes}
        if overhead:
            out["noop_round_trip_ms"] = noop_round_trips(lc.address)
    return out


def _noop():
    return None


def noop_round_trips(address: str, n: int = 100) -> list[float]:
    """Sequential round trips (ms) of a no-op task pinned to the device resource, after 5 warm-ups."""
    from profilers import cluster

    with cluster.connected(address) as ray:
        task = ray.remote(_noop)
        opts = dict(resources={cluster.device_resource(DEVICE): 1}, num_cpus=0)
        for _ in range(5):
            ray.get(task.options(**opts).remote())
        out = []
        for _ in range(n):
            t = time.perf_counter()
            ray.get(task.options(**opts).remote())
            out.append((time.perf_counter() - t) * 1e3)
    return out


def payload_bytes(work: Path) -> dict:
    """Bytes of what one task sends and returns (pickled as Ray does: arguments, records)."""
    from edgerun.kv.cache import PAIRS
    from edgerun.kv.layout import Layout
    from edgerun.kv.tune import EvaluationSpec
    from profilers import cluster, sweep

    sw = sweep.load(work / "sweep.yaml")
    group = sweep.todo(sw, set())[0][0]
    recs = [json.loads(line) for line in (work / "sweep-ray-1-r0" / "runs.jsonl").read_text().splitlines()] \
        if (work / "sweep-ray-1-r0").exists() else []
    cell_rec = next((r for r in recs if r.get("status") == "ok" and "cell" in r), None)
    lay = Layout([PAIRS["K8V4"]] * 30, "per-token", 32, 32)
    return {"sweep_task_args": len(pickle.dumps((group, sw, DEVICE, cluster.model_digests(sw.models)))),
            "sweep_task_result_per_cell": len(json.dumps(cell_rec)) if cell_rec else None,
            "kv_call_args": len(pickle.dumps((EvaluationSpec("wiki", "heldout", 512, 1), lay))),
            "kv_call_result": len(pickle.dumps({"kl": 0.1, "ppl": 10.0, "nll": 2.3}))}


# --- report ------------------------------------------------------------------------------------

def summarize(xs: list[float], spec: str = ".1f") -> str:
    """``median [min-max] n=N`` of ``xs``."""
    xs = sorted(xs)
    return f"{format(statistics.median(xs), spec)} [{format(xs[0], spec)}-{format(xs[-1], spec)}] n={len(xs)}"


def report(data: dict) -> str:
    runs = data["runs"]
    configs = ["local", "ray-1", "ray-2"]

    def col(cfg, path):
        vals = []
        for r in runs:
            if r["config"] != cfg:
                continue
            v = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if v is not None:
                vals.append(v)
        return vals

    lines = ["# Sweeps and KV searches on a Ray cluster: 1 vs 2 worker processes", "",
             f"Machine: {data['machine']['cpu']} ({data['machine']['cpus']} CPUs, shared with other jobs), "
             f"{data['machine']['platform']}, Ray {data['machine']['ray']}. Each Ray node is one process limited to one "
             "core (`sched_setaffinity`, inherited by its workers and the cells' processes) offering 1 CPU; `local` "
             "is one process pinned to core 0 without Ray. Wall times in seconds, median [min-max] over rounds "
             "(configurations interleaved, order reversed each round); cluster start-up excluded.", "",
             "| configuration | 16-cell sweep (+4 quality) s | KV search s (actors started, 6 uniform + 36 trials) "
             "| of which evaluating s | cluster start s |",
             "|---|---|---|---|---|"]
    for cfg in configs:
        sw = col(cfg, ["sweep", "wall_s"])
        kv = col(cfg, ["kv", "wall_s"])
        held = col(cfg, ["kv", "phases", "heldout", "seconds"])
        start = col(cfg, ["cluster_start_s"])
        lines.append(f"| {cfg} | {summarize(sw) if sw else '-'} | {summarize(kv) if kv else '-'} | "
                     f"{summarize(held) if held else '-'} | {summarize(start) if start else '-'} |")
    lines += ["", "Same-round ratios (n = rounds):", ""]
    for name, path in (("sweep", ["sweep", "wall_s"]), ("KV search", ["kv", "wall_s"]),
                       ("KV evaluating", ["kv", "phases", "heldout", "seconds"])):
        ratios, over = [], []
        for rnd in sorted({r["round"] for r in runs}):
            by = {r["config"]: r for r in runs if r["round"] == rnd}

            def get(cfg):
                v = by.get(cfg)
                for k in path:
                    v = v.get(k) if isinstance(v, dict) else None
                return v

            if get("ray-1") and get("ray-2"):
                ratios.append(get("ray-1") / get("ray-2"))
            if get("local") and get("ray-1"):
                over.append(get("ray-1") / get("local"))
        if ratios:
            lines.append(f"- {name}: speed-up ray-2 over ray-1 (ray-1 wall / ray-2 wall) {summarize(ratios, '.2f')}; "
                         f"ray-1 wall / local wall {summarize(over, '.2f') if over else '-'}")
    o = data.get("overhead", {})
    if o:
        lines += ["", "## Per task", "",
                  f"- no-op task round trip (sequential, device resource, 2-node cluster): "
                  f"median {o['noop_ms']['median']:.2f} ms, IQR {o['noop_ms']['q1']:.2f}-{o['noop_ms']['q3']:.2f} ms, "
                  f"n={o['noop_ms']['n']}",
                  f"- sweep overhead per task (ray-1 wall - local wall) / {o['sweep_tasks']} tasks, per round: "
                  + ", ".join(f"{x:.2f} s" for x in o["sweep_overhead_per_task_s"]),
                  f"- bytes per sweep task: arguments {o['bytes']['sweep_task_args']} (the group's cells, the sweep "
                  f"settings, the device name, the models' sha256), result about "
                  f"{o['bytes']['sweep_task_result_per_cell']} per cell (its JSON record)",
                  f"- bytes per KV evaluation: arguments {o['bytes']['kv_call_args']} (spec + a 30-layer layout), "
                  f"result {o['bytes']['kv_call_result']}"]
    same = [r["kv"].get("same_trials_as_local") for r in runs if r["config"] != "local" and "kv" in r]
    lines += ["", f"KV search on the cluster proposed and scored the same trials as the local run (1 thread per "
                  f"evaluation): {sum(bool(s) for s in same)}/{len(same)} runs.",
              f"Load average (1, 5, 15 min) over the runs: from {data['load_start']} to {data['load_end']}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trials", type=int, default=36)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "WORK"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.trials)
        return 0
    import ray

    from profilers import cluster, sweep

    work = Path(tempfile.mkdtemp(prefix="cluster-scaling-"))
    (work / "sweep.yaml").write_text(SWEEP)
    text = (ROOT / "device_configs" / "this-machine.yaml").read_text()
    (work / f"{DEVICE}.yaml").write_text("\n".join(f"name: {DEVICE}" if ln.startswith("name:") else ln
                                                   for ln in text.splitlines()) + "\n")
    sw = sweep.load(work / "sweep.yaml")
    for v in sw.variants:                       # exports and the float32 checkpoint: before any timing
        sweep.export_variant(MODEL, v, print)
    src = cluster.checkpoint_dir(MODEL)
    from edgerun.kv import tune as kvt       # the sensitivity, once (untimed; every run starts from it)

    pre = work / "sensitivity-run"
    kvt.tune(src, pre, **(kv_settings(args.trials) | {"trials": 1}))
    (work / "sensitivity.json").write_bytes((pre / "sensitivity.json").read_bytes())
    data = {"machine": {"cpu": sweep.machine_info()["cpu"], "cpus": os.cpu_count(), "platform": platform.platform(),
                        "ray": ray.__version__},
            "settings": {"sweep": SWEEP, "kv": {k: v for k, v in kv_settings(args.trials).items() if k != "log"}},
            "load_start": load(), "runs": []}
    order = ["local", "ray-1", "ray-2"]
    noop = []
    for rnd in range(args.rounds):
        for cfg in (order if rnd % 2 == 0 else order[::-1]):
            print(f"round {rnd}: {cfg}", flush=True)
            if cfg == "local":
                rec = {"config": cfg, "round": rnd}
                l0 = load()
                rec["sweep"] = run_child("sweep", work, args.trials) | {"load_before": l0, "load_after": load()}
                for d in ("local-sweep",):
                    os.rename(work / d, work / f"{d}-r{rnd}")
                l0 = load()
                rec["kv"] = run_child("kv", work, args.trials) | {"load_before": l0, "load_after": load()}
                os.rename(work / "local-kv", work / f"local-kv-r{rnd}")
            else:
                n = int(cfg[-1])
                rec = {"config": cfg, "round": rnd,
                       **on_cluster(n, work, args.trials, f"{cfg}-r{rnd}", overhead=(n == 2))}
                noop += rec.pop("noop_round_trip_ms", [])
            data["runs"].append(rec)
            print(json.dumps(rec)[:400], flush=True)
    for r in data["runs"]:                      # the cluster's KV search against the local one of its round
        if r["config"] != "local":
            a = json.loads((work / f"local-kv-r{r['round']}" / "trials.json").read_text())["trials"]
            b = json.loads((work / f"kv-{r['config']}-r{r['round']}" / "trials.json").read_text())["trials"]
            r["kv"]["same_trials_as_local"] = a == b
    tasks = len(sweep.todo(sw, set())[0]) + len(sw.variants)
    over = []
    for rnd in range(args.rounds):
        by = {r["config"]: r for r in data["runs"] if r["round"] == rnd}
        over.append((by["ray-1"]["sweep"]["wall_s"] - by["local"]["sweep"]["wall_s"]) / tasks)
    noop.sort()
    q = statistics.quantiles(noop, n=4)
    data["overhead"] = {"noop_ms": {"median": statistics.median(noop), "q1": q[0], "q3": q[2], "n": len(noop)},
                        "sweep_tasks": tasks, "sweep_overhead_per_task_s": over, "bytes": payload_bytes(work)}
    data["load_end"] = load()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster_scaling.json").write_text(json.dumps(data, indent=1, default=str))
    (RESULTS / "cluster_scaling.md").write_text(report(data))
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
