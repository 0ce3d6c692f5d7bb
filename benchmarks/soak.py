"""Soak: many chat turns through the Python API; RSS, open file descriptors and threads sampled every turn.

    python benchmarks/soak.py --turns 1000          # writes benchmarks/results/soak.{json,md}

One session on the default model (``edgerun.load()``) with a small context (``n_ctx`` 256) so the
history rolls over (the session trims the oldest turns) again and again, short replies (``max_tokens``
8), ``session.clear()`` every 50 turns, and a cancelled reply every 7th turn (the stream iterator is
closed after its first piece). After a warm-up (the first ``--warmup`` turns) the RSS must stay within
``--bound`` MiB of its warm-up value; the least-squares slope over the remaining turns is reported in
KiB per turn, with the threads and file descriptors (their set of values after warm-up). ``run()`` is the
same loop for the test suite's 50-turn version.

``--adaptive CARVED --patterns DIR``: the same loop on a carved MoE with per-message expert loading
(PreMoe TAER on the torch engine: each task's pruned expert store built once, the model rebuilt
whenever the retrieved task changes); the prompts alternate between code and wiki text every
``--switch-every`` turns; the task switches are counted.
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



def _sample(samples: list[dict], proc, turn: int, t0: float, log, label: str, whose: str = "") -> None:
    """Append one sample of ``proc`` (psutil.Process): RSS bytes, open fds, threads, seconds since ``t0``;
    log it every 100 turns."""
    mem = proc.memory_info()
    # file-backed pages (mmap'd weights: llama.cpp's GGUF, safetensors) count in RSS as they are first
    # touched (a MoE touches more experts' pages as more prompts arrive): resident, not leaked
    samples.append({"turn": turn, "rss": mem.rss, "rss_file": getattr(mem, "shared", 0),
                    "fds": proc.num_fds(), "threads": proc.num_threads(),
                    "t": round(time.perf_counter() - t0, 3)})
    if log and turn % 100 == 0:
        log(f"{label} {turn}: {whose}rss {mem.rss / 2**20:.1f} MiB, fds {samples[-1]['fds']}, "
            f"threads {samples[-1]['threads']}, {samples[-1]['t']:.0f} s")

def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def adaptive_prompts(switch_every: int = 3):
    """Prompts for the adaptive soak: short code or wiki passages (held-out text), alternating task every
    ``switch_every`` turns; a different passage each turn."""
    from edgerun.moe import calibrate as cal

    texts = {"code": cal.task_text("code"), "wiki": cal.task_text("wiki")}

    def prompt(turn: int) -> str:
        task = ("code", "wiki")[(turn // switch_every) % 2]
        t = texts[task]
        start = (turn * 997) % max(1, len(t) - 400)
        return t[start:start + 300]
    return prompt


def run(turns: int, warmup: int, n_ctx: int = 256, max_tokens: int = 8, clear_every: int = 50,
        cancel_every: int = 7, session=None, log=print, threads: int | None = None,
        max_seconds: float | None = None, prompt_of=None) -> dict:
    """The soak loop; returns the per-turn samples and the summary (see the module docstring).

    ``prompt_of(turn)`` -> prompt text (default: the short questions of :data:`PROMPTS`)."""
    import edgerun

    proc = psutil.Process()
    s = session or edgerun.load(n_ctx=n_ctx, max_tokens=max_tokens, temperature=0.7, seed=0, threads=threads)
    samples, counts = [], {"full": 0, "cancelled": 0, "clear": 0, "trimmed_turns": 0}
    last_task = None
    t0 = time.perf_counter()
    for turn in range(turns):
        if max_seconds and time.perf_counter() - t0 > max_seconds and turn > warmup + 10:
            log(f"stopped at turn {turn}: the --max-seconds budget is spent")
            break
        if turn and turn % clear_every == 0:
            s.clear()
            counts["clear"] += 1
        prompt = prompt_of(turn) if prompt_of else PROMPTS[turn % len(PROMPTS)] + f" (turn {turn})"
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
        plan = getattr(getattr(s, "last_turn", None), "plan", None)
        task = getattr(getattr(plan, "experts", None), "task", None)
        if task is not None:
            counts.setdefault("tasks", {})
            counts["tasks"][task] = counts["tasks"].get(task, 0) + 1
            if last_task is not None and task != last_task:
                counts["task_switches"] = counts.get("task_switches", 0) + 1
            last_task = task
        if turn % 25 == 0:
            gc.collect()
        _sample(samples, proc, turn, t0, log, "turn")
    summary = _summary(samples, warmup, turns, n_ctx, max_tokens, counts, threads, t0)
    return {"summary": summary, "samples": samples}


def run_server(requests: int, warmup: int, n_ctx: int = 256, max_tokens: int = 8, cancel_every: int = 7,
               threads: int | None = None, max_seconds: float | None = None, log=print) -> dict:
    """The soak through ``edgerun serve`` (a child process): OpenAI chat requests over HTTP, streamed and not.

    A conversation grows by one exchange per request (the client resends the history, as OpenAI clients do)
    (a sliding window of its last 3 exchanges is sent, so the prompt's head keeps changing) and restarts every 50 requests; every 7th request is
    streamed and abandoned after its first event (the connection closed: the server stops that generation).
    The server process's RSS, descriptors and threads are sampled after every request.
    """
    import re
    import subprocess
    import urllib.request

    cmd = [sys.executable, "-m", "edgerun.cli", "serve", "--port", "0", "--ctx-size", str(n_ctx),
           "--max-tokens", str(max_tokens), "--seed", "0"] + (["--threads", str(threads)] if threads else [])
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = None
    for line in srv.stderr:
        m = re.search(r"on (http://\S+)/v1", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        raise RuntimeError("edgerun serve did not start")
    proc = psutil.Process(srv.pid)
    with urllib.request.urlopen(url + "/v1/models", timeout=60) as r:
        model_id = json.loads(r.read())["data"][0]["id"]
    samples, counts = [], {"full": 0, "cancelled": 0, "restarts": 0, "errors": 0}
    history: list[dict] = []
    t0 = time.perf_counter()
    try:
        for i in range(requests):
            if max_seconds and time.perf_counter() - t0 > max_seconds and i > warmup + 10:
                log(f"stopped at request {i}: the --max-seconds budget is spent")
                break
            if i and i % 50 == 0:
                history = []
                counts["restarts"] += 1
            history.append({"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (request {i})"})
            stream = i % cancel_every == cancel_every - 1
            # a sliding window of the last 3 exchanges: the server refuses (400) what overflows its context,
            # so the client rolls the context over, as OpenAI clients do
            body = json.dumps({"model": model_id, "messages": history[-7:], "max_tokens": max_tokens,
                               "temperature": 0.7, "stream": stream}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    if stream:
                        r.readline()                     # the first event, then the client leaves
                        counts["cancelled"] += 1
                        history.pop()
                    else:
                        reply = json.loads(r.read())["choices"][0]["message"]["content"]
                        history.append({"role": "assistant", "content": reply})
                        counts["full"] += 1
            except Exception as e:  # noqa: BLE001 - counted, the soak goes on
                counts["errors"] += 1
                history.pop()
                if counts["errors"] <= 5:
                    detail = e.read()[:300] if hasattr(e, "read") else b""
                    log(f"request {i}: {type(e).__name__}: {e} {detail!r}")
                if counts["errors"] > 20 and counts["errors"] > i // 2:
                    raise RuntimeError(f"most requests fail ({counts['errors']} of {i + 1}); the soak stops") from e
            _sample(samples, proc, i, t0, log, "request", "server ")
    finally:
        srv.send_signal(2)
        try:
            srv.wait(timeout=60)
        except subprocess.TimeoutExpired:
            srv.kill()
    return {"summary": _summary(samples, warmup, requests, n_ctx, max_tokens, counts, threads, t0), "samples": samples}


def drift(samples: list[dict], warmup: int) -> dict:
    """Median RSS (MiB) over the first and the last quarter of the turns after warm-up, and their difference.

    Robust to the turn-to-turn swing (which model is loaded, a reply's transient buffers), which the
    max-minus-base growth is not; a leak shows as a difference that grows with the number of turns."""
    import statistics

    after = [x["rss"] / 2**20 for x in samples[warmup:]]
    q = max(1, len(after) // 4)
    first, last = statistics.median(after[:q]), statistics.median(after[-q:])
    out = {"rss_median_first_quarter_mib": round(first, 2), "rss_median_last_quarter_mib": round(last, 2),
           "rss_drift_mib": round(last - first, 2), "rss_sd_after_warmup_mib": round(statistics.pstdev(after), 2)}
    if all("rss_file" in x for x in samples):
        anon = [(x["rss"] - x["rss_file"]) / 2**20 for x in samples[warmup:]]
        out["anon_drift_mib"] = round(statistics.median(anon[-q:]) - statistics.median(anon[:q]), 2)
        out["file_drift_mib"] = round(last - first - out["anon_drift_mib"], 2)
    return out


def _summary(samples, warmup, asked, n_ctx, max_tokens, counts, threads, t0) -> dict:
    after = samples[warmup:]
    base = after[0]["rss"]
    return {**drift(samples, warmup),
        "turns": len(samples), "turns_asked": asked, "threads": threads, "warmup": warmup, "n_ctx": n_ctx,
        "max_tokens": max_tokens, "counts": counts, "seconds": round(time.perf_counter() - t0, 1),
        "rss_start_mib": round(samples[0]["rss"] / 2**20, 2), "rss_after_warmup_mib": round(base / 2**20, 2),
        "rss_max_after_warmup_mib": round(max(x["rss"] for x in after) / 2**20, 2),
        "rss_end_mib": round(samples[-1]["rss"] / 2**20, 2),
        "rss_growth_after_warmup_mib": round((max(x["rss"] for x in after) - base) / 2**20, 2),
        "rss_slope_kib_per_turn": round(slope([x["turn"] for x in after], [x["rss"] for x in after]) / 1024, 3),
        "rss_slope_second_half_kib_per_turn": round(slope([x["turn"] for x in after[len(after) // 2:]],
                                                          [x["rss"] for x in after[len(after) // 2:]]) / 1024, 3),
        "fds_after_warmup": sorted({x["fds"] for x in after}),
        "threads_after_warmup": sorted({x["threads"] for x in after}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--bound", type=float, default=16.0, help="allowed RSS growth after warm-up, MiB (default 16)")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop early after this long (reported)")
    ap.add_argument("--server", action="store_true", help="requests through 'edgerun serve' instead of the API")
    ap.add_argument("--adaptive", default=None, metavar="CARVED",
                    help="a carved MoE: per-message expert loading (PreMoe TAER; --backend picks the engine), tasks alternating")
    ap.add_argument("--patterns", default=None, help="--adaptive: expert patterns directory (code and wiki tasks)")
    ap.add_argument("--switch-every", type=int, default=3, help="--adaptive: turns per task before switching")
    ap.add_argument("--backend", default="torch", choices=("torch", "llama.cpp"),
                    help="--adaptive: torch (the carved expert store, exact routing) or llama.cpp (Q8_0 GGUFs "
                         "assembled per task from the carve's host; patterns calibrated on the host)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/soak (soak_server with --server, soak_adaptive with --adaptive)")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="write the report of a saved run (its .json) again, with the same other options")
    args = ap.parse_args()
    load0 = os.getloadavg()
    if args.render:
        r = json.loads(args.render.read_text())
        r["summary"].update(drift(r["samples"], r["summary"]["warmup"]))
        load0 = r["summary"]["machine"]["loadavg_start"]
    name = ("soak_server" if args.server else "soak" if not args.adaptive
            else "soak_adaptive" if args.backend == "torch" else "soak_adaptive_llamacpp")
    args.out = args.out or ROOT / "benchmarks" / "results" / name
    if args.render:
        pass
    elif args.adaptive:
        import edgerun

        # the torch engine: patterns calibrated on the carved checkpoint itself (`edgerun experts calibrate
        # CARVED`); the llama.cpp path retrieves with the carve's GGUF host model and needs patterns
        # calibrated on that host (docs/experts.md; others are refused)
        assembler = None
        if args.backend == "llama.cpp":
            from converters.assemble import GGUFAssembler

            assembler = GGUFAssembler("Q8_0")
        session = edgerun.load(args.adaptive, backend=args.backend, adaptive_experts=True, keep="2/4",
                               patterns=args.patterns, assembler=assembler, chat_template="chatml", n_ctx=args.n_ctx,
                               max_tokens=args.max_tokens, temperature=0.7, seed=0, threads=args.threads)
        r = run(args.turns, args.warmup, n_ctx=args.n_ctx, max_tokens=args.max_tokens, session=session,
                threads=args.threads, max_seconds=args.max_seconds, prompt_of=adaptive_prompts(args.switch_every))
    else:
        r = (run_server if args.server else run)(args.turns, args.warmup, n_ctx=args.n_ctx,
                                                 max_tokens=args.max_tokens, threads=args.threads,
                                                 max_seconds=args.max_seconds)
    s = r["summary"]
    s["bound_mib"] = args.bound
    s["within_bound"] = s["rss_growth_after_warmup_mib"] <= args.bound
    s["fds_constant"] = len(s["fds_after_warmup"]) == 1
    s["threads_constant"] = len(s["threads_after_warmup"]) == 1
    if not args.render:
        s["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load0,
                        "loadavg_end": os.getloadavg()}
    load1 = s["machine"]["loadavg_end"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(r, indent=0) + "\n")
    c = s["counts"]
    if args.server:
        head = (f"# Soak: {s['turns']} requests through `edgerun serve`\n\n`python benchmarks/soak.py --server --turns "
                f"{s['turns_asked']}`: `edgerun serve` (default model, llama.cpp) in a child process, --ctx-size "
                f"{s['n_ctx']}, max_tokens {s['max_tokens']}, threads {s['threads'] or 'default'}; {s['turns']} of "
                f"{s['turns_asked']} requests run; {c['full']} complete (non-streamed) replies, {c['cancelled']} streamed "
                f"and abandoned after the first event, the conversation restarted {c['restarts']} times, "
                f"{c['errors']} errors. RSS, descriptors and threads are the server process's.")
    elif args.adaptive:
        head = (f"# Soak: {s['turns']} chat turns with per-message expert loading\n\n`python benchmarks/soak.py "
                f"--adaptive {Path(args.adaptive).name} --patterns DIR --backend {args.backend} --turns {s['turns_asked']} "
                f"--switch-every {args.switch_every}`: a carved MoE with PreMoe TAER on the {args.backend} engine "
                + ("(each task's 2-of-4 pruned expert store built once, " if args.backend == "torch" else
                   "(each task's 2-of-4 Q8_0 GGUF assembled once from the host, ")
                + f"the model rebuilt when the retrieved task changes), prompts alternating "
                f"between code and wiki passages, n_ctx {s['n_ctx']}, max_tokens {s['max_tokens']}, threads "
                f"{s['threads'] or 'default'}; {s['turns']} of {s['turns_asked']} turns run; {c['full']} full replies, "
                f"{c['cancelled']} cancelled, {c['clear']} `clear()`; retrieved tasks {c.get('tasks', {})}, "
                f"**{c.get('task_switches', 0)} task switches** (engine closed and reopened).")
    else:
        head = (f"# Soak: {s['turns']} chat turns through the Python API\n\n`python benchmarks/soak.py --turns "
                f"{s['turns_asked']}`: `edgerun.load()` (SmolLM2-135M-Instruct, llama.cpp), n_ctx {s['n_ctx']}, "
                f"max_tokens {s['max_tokens']}, threads {s['threads'] or 'default'}; {s['turns']} of {s['turns_asked']} "
                f"turns run; {c['full']} full replies, {c['cancelled']} cancelled after the first piece (stream "
                f"closed), {c['clear']} `clear()`, the history trimmed by the context on {c['trimmed_turns']} turns.")
    md = head + f""" {s['seconds']:.0f} s on {os.cpu_count()} CPUs, load average {load0[0]:.2f} at the start and
{load1[0]:.2f} at the end (other work shared the machine).

| measure | value |
|---|---|
| RSS at turn 0 | {s['rss_start_mib']} MiB |
| RSS after warm-up ({s['warmup']} turns) | {s['rss_after_warmup_mib']} MiB |
| RSS max after warm-up | {s['rss_max_after_warmup_mib']} MiB |
| RSS at the end | {s['rss_end_mib']} MiB |
| growth after warm-up (bound {args.bound:g} MiB) | {s['rss_growth_after_warmup_mib']} MiB ({'within' if s['within_bound'] else 'OVER'} the bound) |
| RSS slope after warm-up | {s['rss_slope_kib_per_turn']} KiB/turn |
| RSS slope over the second half of that | {s['rss_slope_second_half_kib_per_turn']} KiB/turn |
| median RSS, first -> last quarter after warm-up (drift) | {s['rss_median_first_quarter_mib']} -> {s['rss_median_last_quarter_mib']} MiB ({s['rss_drift_mib']:+.2f} MiB; turn-to-turn SD {s['rss_sd_after_warmup_mib']} MiB) |
{f"| of which anonymous memory / file-backed pages (mmap'd weights first touched) | {s['anon_drift_mib']:+.2f} / {s['file_drift_mib']:+.2f} MiB |" + chr(10) if 'anon_drift_mib' in s else ''}| open file descriptors after warm-up | {s['fds_after_warmup']} |
| threads after warm-up | {s['threads_after_warmup']} |
"""
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if s["within_bound"] and s["fds_constant"] and s["threads_constant"] else 1


if __name__ == "__main__":
    sys.exit(main())
