"""edgerun serve under load vs llama-cpp-python's OpenAI server: N concurrent clients on loopback, same run.

Both servers run as child processes on the same GGUF (the default model unless ``--model``), with the same
threads (generation and batch), context, batch size (512) and f16 KV cache, on loopback ports:

- ``edgerun serve PATH --port 0 --ctx-size C --threads T --temperature 0 --seed 0``;
- ``python -m llama_cpp.server --model PATH --n_ctx C --n_threads T --n_threads_batch T --n_batch 512
  --n_ubatch 512 --seed 0 --interrupt_requests false --verbose false``. Its default
  ``interrupt_requests=True`` ends the running stream as soon as another request arrives (``server/app.py``,
  ``get_event_publisher``); with ``false`` requests wait on its lock, one at a time, as edgerun serve's do.

A cell is one server at one concurrency N: N clients (asyncio tasks, one httpx connection each) each
send ``--requests`` streamed chat completions one after another (closed loop), greedy (temperature 0,
seed 0, ``repeat_penalty`` 1.0: llama-cpp-python's server defaults to 1.1, edgerun to off), ``max_tokens``
from ``--max-tokens``. Every request has its own system message
(``Request r.n.c.k.``) and one of a few story prompts, so neither server reuses more than the template's
first tokens from its KV cache, and both get exactly the same requests. Each round runs every N on both
servers, alternating which server goes first from round to round, so load drift on a shared machine hits
both; per-round ratios edgerun / llama-cpp-python are reported next to pooled percentiles.

Timed at the client: TTFT is from sending the request to the first non-empty text piece (queue wait
included); end-to-end latency to the stream's end; aggregate tokens/s is a cell's completion tokens over
its wall time (first request sent to last stream ended). Completion tokens: ``max_tokens`` when
``finish_reason`` is ``length``, else the number of text pieces (each server streams one piece per
token here). The texts of the two servers are compared request by request (same greedy work).

Benchmark-only requirement (not an edgerun dependency), without rebuilding llama-cpp-python::

    pip install 'llama-cpp-python[server]==0.3.36'
    # or just the extras it lacks: pip install 'sse-starlette>=1.6.1' 'starlette-context>=0.3.6,<0.4' pydantic-settings

Usage: python benchmarks/serve_load.py [--clients 1 4 8] [--requests 2] [--rounds 6] [--max-tokens 48]
       [--threads T] [--ctx-size 2048] [--model NAME_OR_PATH]
Writes benchmarks/results/serve_load.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a girl who builds a robot out of old bicycle parts.",
    "Write a long story about a baker whose bread makes people tell the truth.",
    "Write a long story about two astronauts stranded on a quiet moon.",
]
# Greedy on both. repeat_penalty is llama-cpp-python's extension: its server defaults to 1.1 (edgerun's
# sampler to 1.0, off), which changes the greedy text; edgerun serve ignores the unknown field.
SAMPLING = {"temperature": 0, "seed": 0, "repeat_penalty": 1.0}
SERVER_EXTRAS = ("sse_starlette", "starlette_context", "pydantic_settings")
SIDES = ("edgerun", "llama_cpp")
LABELS = {"edgerun": "edgerun serve", "llama_cpp": "llama-cpp-python server"}


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``xs``, linear interpolation between order statistics (numpy's
    default); NaN for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def pcts(xs: list[float]) -> dict:
    """p50/p90/p99, mean and count of ``xs`` (same unit as ``xs``)."""
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90), "p99": percentile(xs, 99),
            "mean": sum(xs) / len(xs) if xs else float("nan"), "n": len(xs)}


def spread(xs: list[float]) -> dict:
    """Median, min and max of per-round values (e.g. ratios)."""
    return {"median": percentile(xs, 50), "min": min(xs), "max": max(xs), "n": len(xs)}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5 and 15 minutes), or the load averages when it is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> str:
    """Poll ``url/v1/models`` until it answers; returns the served model id.

    Raises:
        RuntimeError: the process exited, or no answer within ``timeout_s`` seconds.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}: {' '.join(proc.args)}")
        try:
            return httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} within {timeout_s:.0f} s")


async def one_request(client, url: str, model_id: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion; times (s, from sending) of the first text piece and the end, the text,
    the number of text pieces and the finish reason.

    Raises:
        httpx.HTTPStatusError: the server answered with an error status.
    """
    body = {"model": model_id, "messages": messages, "max_tokens": max_tokens, **SAMPLING, "stream": True}
    pieces, finish, first = [], None, None
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.aiter_lines():
            if not raw.startswith("data: ") or raw == "data: [DONE]":
                continue
            chunk = json.loads(raw[6:])
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                if first is None:
                    first = time.perf_counter() - t0
                pieces.append(text)
            finish = choice.get("finish_reason") or finish
    end = time.perf_counter() - t0
    tokens = max_tokens if finish == "length" else len(pieces)
    return {"ttft_s": first if first is not None else end, "e2e_s": end, "text": "".join(pieces),
            "pieces": len(pieces), "tokens": tokens, "finish": finish}


async def run_cell(url: str, model_id: str, n_clients: int, per_client: int, max_tokens: int, tag: str) -> dict:
    """N clients, each sending ``per_client`` requests in turn; every request's timings and the cell's
    wall time (s) and aggregate completion tokens/s."""
    import httpx

    async def client_loop(c: int) -> list[dict]:
        out = []
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
            for k in range(per_client):
                key = f"{tag}.{c}.{k}"
                messages = [{"role": "system", "content": f"Request {key}."},
                            {"role": "user", "content": PROMPTS[(c + k) % len(PROMPTS)]}]
                out.append({"key": key, **await one_request(client, url, model_id, messages, max_tokens)})
        return out

    t0 = time.perf_counter()
    per = await asyncio.gather(*(client_loop(c) for c in range(n_clients)))
    wall = time.perf_counter() - t0
    reqs = [r for rs in per for r in rs]
    tokens = sum(r["tokens"] for r in reqs)
    return {"clients": n_clients, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "requests": reqs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="catalog name or GGUF path (default: the default model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels N")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per cell")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (every N on both servers per round)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="generation and batch threads (default: the CPUs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    missing = [m.replace("_", "-") for m in SERVER_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        print(f"serve_load.py: llama-cpp-python's server extras are missing ({', '.join(missing)}): "
              "pip install 'llama-cpp-python[server]==0.3.36'", file=sys.stderr)
        return 2

    import httpx
    import llama_cpp

    import edgerun
    from edgerun import catalog

    path = Path(args.model) if args.model and Path(args.model).is_file() else \
        catalog.pull(args.model or catalog.DEFAULT_MODEL, progress=False)
    threads = args.threads or os.cpu_count() or 1
    ctx = str(args.ctx_size)
    llama_port = free_port()
    cmds = {
        "edgerun": [sys.executable, "-m", "edgerun.cli", "serve", str(path), "--port", "0", "--ctx-size", ctx,
                    "--threads", str(threads), "--temperature", "0", "--seed", "0", "--max-queue", "64"],
        "llama_cpp": [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_ctx", ctx,
                      "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_batch", "512",
                      "--n_ubatch", "512", "--seed", "0", "--interrupt_requests", "false", "--verbose", "false",
                      "--host", "127.0.0.1", "--port", str(llama_port)],
    }
    uptime0, load0 = uptime(), os.getloadavg()
    t_start = time.perf_counter()
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["edgerun"] = subprocess.Popen(cmds["edgerun"], stderr=subprocess.PIPE, text=True,
                                            start_new_session=True)
        procs["llama_cpp"] = subprocess.Popen(cmds["llama_cpp"], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, start_new_session=True)
        line = procs["edgerun"].stderr.readline()
        if "edgerun serve:" not in line:
            raise RuntimeError(f"edgerun serve did not start: {line}{procs['edgerun'].stderr.read()}")
        threading.Thread(target=procs["edgerun"].stderr.read, daemon=True).start()   # never let the pipe fill
        urls = {"edgerun": line.split(" on ")[1].split("/v1")[0], "llama_cpp": f"http://127.0.0.1:{llama_port}"}
        ids = {s: wait_ready(urls[s], procs[s]) for s in SIDES}

        # warm-up (not timed): page in the weights, first-context costs; prompt tokens from a non-streamed reply
        warm = {}
        for s in SIDES:
            body = {"model": ids[s], "max_tokens": args.max_tokens, **SAMPLING,
                    "messages": [{"role": "system", "content": "Request warm-up."},
                                 {"role": "user", "content": PROMPTS[0]}]}
            r = httpx.post(urls[s] + "/v1/chat/completions", json=body, timeout=900)
            r.raise_for_status()
            warm[s] = {"prompt_tokens": r.json()["usage"]["prompt_tokens"],
                       "completion_tokens": r.json()["usage"]["completion_tokens"],
                       "text": r.json()["choices"][0]["message"]["content"]}
            if s == "edgerun":   # the engine settings edgerun's plan ran with (threads, batch threads, KV types)
                warm[s]["plan_settings"] = r.json()["edgerun"]["plan"]["settings"]

        cells = []
        for rnd in range(args.rounds):
            order = SIDES if rnd % 2 == 0 else SIDES[::-1]
            for n in args.clients:
                for s in order:
                    cell = asyncio.run(run_cell(urls[s], ids[s], n, args.requests, args.max_tokens,
                                                f"{rnd}.{n}"))
                    cells.append({"round": rnd, "server": s, "first": s == order[0], **cell})
                    print(f"round {rnd} N={n} {s:9s} {cell['tokens_per_s']:6.1f} tokens/s, "
                          f"wall {cell['wall_s']:.1f} s", file=sys.stderr, flush=True)
        uptime1, load1 = uptime(), os.getloadavg()
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    runtime_s = time.perf_counter() - t_start

    # same work: texts equal request by request
    texts = {}
    for c in cells:
        for r in c["requests"]:
            texts.setdefault(r["key"], {})[c["server"]] = r["text"]
    same = sum(1 for t in texts.values() if t.get("edgerun") == t.get("llama_cpp"))

    levels = {}
    for n in args.clients:
        row = {}
        for s in SIDES:
            mine = [c for c in cells if c["clients"] == n and c["server"] == s]
            reqs = [r for c in mine for r in c["requests"]]
            row[s] = {"ttft_ms": pcts([r["ttft_s"] * 1e3 for r in reqs]),
                      "e2e_ms": pcts([r["e2e_s"] * 1e3 for r in reqs]),
                      "tokens_per_s": spread([c["tokens_per_s"] for c in mine]),
                      "tokens": sum(r["tokens"] for r in reqs),
                      "finish_length": sum(r["finish"] == "length" for r in reqs), "requests": len(reqs)}
        per_round = []
        for rnd in range(args.rounds):
            e, ll = (next(c for c in cells if c["clients"] == n and c["round"] == rnd and c["server"] == s)
                     for s in SIDES)
            per_round.append({
                "tokens_per_s": e["tokens_per_s"] / ll["tokens_per_s"],
                "e2e_p50": percentile([r["e2e_s"] for r in e["requests"]], 50)
                / percentile([r["e2e_s"] for r in ll["requests"]], 50),
                "ttft_p50": percentile([r["ttft_s"] for r in e["requests"]], 50)
                / percentile([r["ttft_s"] for r in ll["requests"]], 50)})
        row["ratio_edgerun_over_llama_cpp"] = {k: spread([p[k] for p in per_round]) for k in per_round[0]}
        row["ratio_per_round"] = per_round
        levels[str(n)] = row

    loaded = max(load0[0], load1[0]) > 3
    result = {
        "benchmark": "serve_load", "model": str(args.model or catalog.DEFAULT_MODEL), "file": path.name,
        "threads": threads, "ctx_size": args.ctx_size, "n_batch": 512, "max_tokens": args.max_tokens,
        "clients": args.clients, "requests_per_client": args.requests, "rounds": args.rounds,
        "prompts": PROMPTS, "sampling": SAMPLING, "commands": {s: [str(x) for x in cmds[s][1:]] for s in SIDES},
        "llama_cpp_server_settings": {"interrupt_requests": False,
                                      "why": "the default (True) ends a running stream when a new request arrives"},
        "warmup": warm, "same_text": {"equal": same, "requests": len(texts)},
        "levels": levels,
        "uptime": {"before": uptime0, "after": uptime1},
        "load_average": {"before": list(load0), "after": list(load1)},
        "loaded_machine": loaded, "cpus": os.cpu_count(), "runtime_s": runtime_s,
        "cells": [{k: v for k, v in c.items() if k != "requests"}
                  | {"requests": [{k: v for k, v in r.items() if k != "text"} for r in c["requests"]]}
                  for c in cells],
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "llama_cpp_python": llama_cpp.__version__, "edgerun": edgerun.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "serve_load.md").write_text(md)
    print(md)
    return 0


def markdown(result: dict) -> str:
    """The results as a Markdown page (tables per concurrency level, conditions, per-round ratios)."""
    r = result
    lb, la = r["load_average"]["before"], r["load_average"]["after"]
    cond = (f"**Loaded machine**: 1-minute load average {lb[0]:.1f} before and {la[0]:.1f} after on {r['cpus']} "
            "CPUs (other engineers' jobs ran at the same time), so absolute numbers are low and noisy; the per-round "
            "ratios (both servers measured back to back in each round) are the comparison."
            if r["loaded_machine"] else
            f"1-minute load average {lb[0]:.1f} before and {la[0]:.1f} after on {r['cpus']} CPUs.")
    st = r["same_text"]
    lines = [
        "# edgerun serve vs llama-cpp-python's server under concurrent load",
        "",
        f"{r['date']}, {r['file']}, {r['threads']} threads (generation and batch), context {r['ctx_size']}, batch "
        "512, greedy (repeat_penalty 1.0 on both: llama-cpp-python's server defaults to 1.1), max_tokens "
        f"{r['max_tokens']}; N concurrent streaming clients (httpx, loopback), "
        f"{r['requests_per_client']} requests each per cell, {r['rounds']} rounds alternating which server goes "
        f"first; llama-cpp-python {r['machine']['llama_cpp_python']} server with `--interrupt_requests false` "
        "(its default cuts a running stream short when a new request arrives). Both servers run one request "
        f"at a time. Prompt tokens per request: edgerun {r['warmup']['edgerun']['prompt_tokens']}, "
        f"llama-cpp-python {r['warmup']['llama_cpp']['prompt_tokens']} (warm-up request). Identical text "
        f"from both servers in {st['equal']}/{st['requests']} requests. Total runtime {r['runtime_s']:.0f} s.",
        "",
        cond,
        "",
        f"`uptime` before: `{r['uptime']['before']}`; after: `{r['uptime']['after']}`.",
        "",
        "| N | server | TTFT ms p50 / p90 / p99 | end-to-end ms p50 / p90 / p99 | aggregate tokens/s "
        "(median of rounds [min-max]) | requests (hit max_tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in r["levels"].items():
        for s in SIDES:
            x = row[s]
            t, e, a = x["ttft_ms"], x["e2e_ms"], x["tokens_per_s"]
            lines.append(f"| {n} | {LABELS[s]} | {t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | "
                         f"{e['p50']:.0f} / {e['p90']:.0f} / {e['p99']:.0f} | {a['median']:.1f} "
                         f"[{a['min']:.1f}-{a['max']:.1f}] | {x['requests']} ({x['finish_length']}) |")
    lines += ["", "Per-round ratios edgerun serve / llama-cpp-python server (median [min-max] over rounds; "
              "tokens/s above 1 and latency below 1 favour edgerun):", "",
              "| N | aggregate tokens/s | end-to-end p50 | TTFT p50 |", "|---|---|---|---|"]
    for n, row in r["levels"].items():
        q = row["ratio_edgerun_over_llama_cpp"]
        lines.append(f"| {n} | " + " | ".join(f"{q[k]['median']:.3f} [{q[k]['min']:.3f}-{q[k]['max']:.3f}]"
                                              for k in ("tokens_per_s", "e2e_p50", "ttft_p50")) + " |")
    lines += ["", "TTFT includes the time a request waits for the one at a time slot, so it grows with N on both "
              "servers; p99 over this few requests is close to the maximum.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
