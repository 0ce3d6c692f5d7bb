"""edgerun serve's overhead: TTFT and decode tokens/s through the HTTP server vs the Python API, same run.

The server is the real command (``edgerun serve --port 0``) in a child process; the Python API side is
``edgerun.load`` in this process, on the same GGUF with the same threads, context and greedy sampler.
Both decode exactly ``--max-tokens`` tokens (``ignore_eos``) of the same conversation, streamed, and are
timed the same way at the caller: TTFT is wall clock from the call (the HTTP request, or
``session.chat``) to the first text piece; decode tokens/s is (tokens - 1) over the time from the first
piece to the last. Every run has its own system message (``Request <i>.``), so neither side reuses more
than the template's first tokens from its KV cache (the prefill token counts are recorded and checked
equal). Runs are interleaved pairs, alternating which side goes first, so machine drift hits both;
ratios are taken pair by pair. The machine's load average before and after is recorded: on a shared
machine other processes take CPU from both sides alike, but absolute numbers drop.

Usage: python benchmarks/serve_overhead.py [--pairs 10] [--max-tokens 64] [--model NAME_OR_PATH]
Writes benchmarks/results/serve_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from profilers.report import quartiles

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def timed(pieces) -> dict:
    """Consume (monotonic arrival time, text) of a stream started at time 0; TTFT and the decode span."""
    times = [t for t, text in pieces if text]
    return {"first": times[0], "last": times[-1], "pieces": len(times)}


def spread(xs: list[float]) -> dict:
    q1, median, q3 = quartiles(xs)
    return {"median": median, "q1": q1, "q3": q3, "n": len(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="catalog name or GGUF path (default: the default model)")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import httpx
    import llama_cpp

    import edgerun
    from edgerun import catalog

    model = args.model or catalog.DEFAULT_MODEL
    session = edgerun.load(model, temperature=0.0, seed=0, n_ctx=args.ctx_size, threads=args.threads,
                           max_tokens=args.max_tokens)
    backend = session.backend
    threads = backend.threads
    cmd = [sys.executable, "-m", "edgerun.cli", "serve", str(model), "--port", "0", "--ctx-size", str(args.ctx_size),
           "--threads", str(threads), "--temperature", "0", "--seed", "0"]
    load0 = os.getloadavg()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stderr.readline()
        if "edgerun serve:" not in line:
            raise RuntimeError(f"the server did not start: {line}{proc.stderr.read()}")
        url = line.split(" on ")[1].split("/v1")[0]
        model_id = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        client = httpx.Client(timeout=300)

        def messages(i):
            return [{"role": "system", "content": f"Request {i}."}, {"role": "user", "content": PROMPT}]

        def run_api(i):
            msgs = messages(i)
            session.sampling.ignore_eos = True
            session.messages = msgs[:-1]
            t0 = time.perf_counter()
            pieces = [(time.perf_counter() - t0, p) for p in session.chat(msgs[-1]["content"], stream=True)]
            st = session.stats
            return {**timed(pieces), "tokens": st.generated_tokens, "prefill_tokens": st.prefill_tokens,
                    "engine_decode_tokens_per_s": st.decode_tokens_per_s, "engine_ttft_ms": st.ttft_ms}

        def run_server(i):
            body = {"model": model_id, "messages": messages(i), "max_tokens": args.max_tokens, "temperature": 0,
                    "seed": 0, "ignore_eos": True, "stream": True}
            pieces, tail = [], None
            t0 = time.perf_counter()
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for raw in r.iter_lines():
                    if not raw.startswith("data: ") or raw == "data: [DONE]":
                        continue
                    chunk = json.loads(raw[6:])
                    now = time.perf_counter() - t0
                    choice = chunk["choices"][0]
                    pieces.append((now, choice["delta"].get("content", "")))
                    if choice["finish_reason"]:
                        tail = chunk["edgerun"]["stats"]
            return {**timed(pieces), "tokens": tail["generated_tokens"], "prefill_tokens": tail["prefill_tokens"],
                    "engine_decode_tokens_per_s": tail["decode_tokens_per_s"], "engine_ttft_ms": tail["ttft_ms"]}

        run_api(-1), run_server(-1)  # warm-up: page in weights, first-context costs, the HTTP connection
        rows = {"api": [], "server": []}
        for i in range(args.pairs):
            order = ("api", "server") if i % 2 == 0 else ("server", "api")
            for side in order:
                rows[side].append((run_api if side == "api" else run_server)(i))
        load1 = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        backend.close()

    for side in rows:
        for r in rows[side]:
            r["ttft_ms"] = r["first"] * 1e3
            r["decode_tokens_per_s"] = (r["tokens"] - 1) / (r["last"] - r["first"]) if r["last"] > r["first"] \
                else float("nan")
    for a, s in zip(rows["api"], rows["server"]):
        if a["prefill_tokens"] != s["prefill_tokens"] or a["tokens"] != s["tokens"]:
            raise RuntimeError(f"the sides ran different work: {a} vs {s}")
    dec = [s["decode_tokens_per_s"] / a["decode_tokens_per_s"] for a, s in zip(rows["api"], rows["server"])]
    ttft = [s["ttft_ms"] / a["ttft_ms"] for a, s in zip(rows["api"], rows["server"])]
    ttft_diff = [s["ttft_ms"] - a["ttft_ms"] for a, s in zip(rows["api"], rows["server"])]
    result = {
        "benchmark": "serve_overhead", "model": str(model), "file": backend.path.name, "threads": threads,
        "ctx_size": args.ctx_size, "max_tokens": args.max_tokens, "pairs": args.pairs,
        "prefill_tokens": rows["api"][0]["prefill_tokens"], "tokens_per_run": rows["api"][0]["tokens"],
        "ttft_ms": {s: spread([r["ttft_ms"] for r in rows[s]]) for s in rows},
        "decode_tokens_per_s": {s: spread([r["decode_tokens_per_s"] for r in rows[s]]) for s in rows},
        "engine_decode_tokens_per_s": {s: spread([r["engine_decode_tokens_per_s"] for r in rows[s]]) for s in rows},
        "engine_ttft_ms": {s: spread([r["engine_ttft_ms"] for r in rows[s]]) for s in rows},
        "decode_ratio_server_over_api": spread(dec),
        "ttft_ratio_server_over_api": spread(ttft),
        "ttft_added_ms": spread(ttft_diff),
        "load_average_1m": {"before": load0[0], "after": load1[0]},
        "cpus": os.cpu_count(),
        "runs": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "llama_cpp_python": llama_cpp.__version__, "edgerun": edgerun.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_overhead.json").write_text(json.dumps(result, indent=2) + "\n")

    def fmt(d, spec=".1f"):
        return f"{d['median']:{spec}} [{d['q1']:{spec}}-{d['q3']:{spec}}] n {d['n']}"

    md = [
        "# edgerun serve overhead vs the Python API",
        "",
        f"{result['date']}, {result['file']}, {threads} threads, context {args.ctx_size}, greedy, "
        f"{result['tokens_per_run']} new tokens (ignore_eos) after a {result['prefill_tokens']}-token prefill, "
        f"{args.pairs} interleaved pairs after one warm-up each. Server: `edgerun serve` in a child process, "
        "streamed over loopback HTTP (httpx); API: `session.chat(stream=True)` in the benchmark process. "
        f"Load average (1 min) {load0[0]:.1f} before, {load1[0]:.1f} after on {os.cpu_count()} CPUs: "
        + ("other processes shared the CPU during the run, so absolute speeds are low; the pair ratios are the "
           "comparison." if max(load0[0], load1[0]) > (os.cpu_count() or 1) else "a quiet machine."),
        "",
        "| path | TTFT ms (caller) | decode tokens/s (caller) | decode tokens/s (engine) | TTFT ms (engine) |",
        "|---|---|---|---|---|",
    ]
    for s, label in (("api", "Python API, session.chat"), ("server", "edgerun serve, HTTP + SSE")):
        md.append(f"| {label} | {fmt(result['ttft_ms'][s])} | {fmt(result['decode_tokens_per_s'][s])} | "
                  f"{fmt(result['engine_decode_tokens_per_s'][s])} | {fmt(result['engine_ttft_ms'][s])} |")
    md += ["", f"Per pair, server / API: decode tokens/s **{fmt(result['decode_ratio_server_over_api'], '.3f')}**; "
               f"TTFT {fmt(result['ttft_ratio_server_over_api'], '.3f')}; TTFT added by the server "
               f"{fmt(result['ttft_added_ms'])} ms.", ""]
    (args.out / "serve_overhead.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
