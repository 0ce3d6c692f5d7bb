"""edgerun chat's overhead: decode tokens/s of the session path vs raw llama_cpp.Llama on the same GGUF.

Both sides run in this process on the same file with the same threads, context, batch size,
attention settings and greedy sampler, on the same prompt tokens (the chat template's output),
interleaved run by run (alternating which goes first) so machine drift hits both equally. Every run
is cold: both KV caches are emptied first, and llama.cpp's own counter confirms that every prompt
token was evaluated (a run that reused a cached prefix would make TTFT a cache hit).
Decode tokens/s is measured the same way on both sides: wall clock from the first streamed piece
to the last, over the tokens decoded in between; llama.cpp's own counters are reported too.

Usage: python benchmarks/chat_overhead.py [--runs 10] [--max-tokens 128] [--model NAME_OR_PATH]
Writes benchmarks/results/chat_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from profilers.report import quartiles

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def timed_stream(pieces, count_tokens) -> dict:
    """Consume a stream of text pieces; return wall-clock TTFT and decode tokens/s."""
    t0 = time.perf_counter()
    first = last = None
    for _ in pieces:
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
    n = count_tokens()
    return {"ttft_ms": (first - t0) * 1e3, "tokens": n,
            "decode_tokens_per_s": (n - 1) / (last - first) if n > 1 and last > first else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="catalog name or GGUF path (default: the default model)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import llama_cpp

    import edgerun
    from edgerun import catalog
    from edgerun.backends.llamacpp import clear_cache

    session = edgerun.load(args.model, temperature=0.0, max_tokens=args.max_tokens, n_ctx=args.ctx_size, seed=0)
    backend = session.backend
    raw = llama_cpp.Llama(model_path=str(backend.path), n_ctx=args.ctx_size, n_batch=512, n_ubatch=512,
                          n_threads=backend.threads, n_threads_batch=backend.batch_threads, flash_attn=False,
                          verbose=False, seed=0)
    prompt_tokens = backend.encode_prompt(session.format_prompt([{"role": "user", "content": PROMPT}]))
    sampler = dict(max_tokens=args.max_tokens, temperature=0.0, top_p=0.95, top_k=40, min_p=0.05,
                   repeat_penalty=1.0, seed=0, stop=[])

    def run_edgerun():
        session.clear()
        backend.reset()                               # cold: no prefix of the previous run is reused
        return timed_stream(session.chat(PROMPT, stream=True), lambda: session.stats.generated_tokens)

    raw_count = {}

    def run_raw():
        clear_cache(raw)

        def pieces():
            n = 0
            for chunk in raw.create_completion(prompt=list(prompt_tokens), stream=True, **sampler):
                n += 1
                yield chunk["choices"][0]["text"]
            raw_count["n"] = raw.n_tokens - len(prompt_tokens) + 1
        return timed_stream(pieces(), lambda: raw_count["n"])

    def counters(llm):
        p = llama_cpp.llama_perf_context(llm.ctx)
        if p.n_p_eval != len(prompt_tokens):
            raise RuntimeError(f"a run evaluated {p.n_p_eval} of {len(prompt_tokens)} prompt tokens: not cold")
        return p.n_eval / (p.t_eval_ms / 1e3) if p.t_eval_ms > 0 else float("nan")

    def spread(xs):
        q1, median, q3 = quartiles(xs)
        return {"median": median, "q1": q1, "q3": q3, "n": len(xs)}

    run_edgerun(), run_raw()  # warm-up: page in weights, first-context costs
    rows = {"edgerun": [], "raw": []}
    engine = {"edgerun": [], "raw": []}
    for i in range(args.runs):
        order = ("edgerun", "raw") if i % 2 == 0 else ("raw", "edgerun")
        for side in order:
            if side == "edgerun":
                rows[side].append(run_edgerun())
                engine[side].append(counters(backend.llm))
            else:
                llama_cpp.llama_perf_context_reset(raw.ctx)
                rows[side].append(run_raw())
                engine[side].append(counters(raw))

    med = {s: statistics.median(r["decode_tokens_per_s"] for r in rows[s]) for s in rows}
    ratios = [e["decode_tokens_per_s"] / r["decode_tokens_per_s"] for e, r in zip(rows["edgerun"], rows["raw"])]
    result = {
        "benchmark": "chat_overhead",
        "model": str(args.model or catalog.DEFAULT_MODEL),
        "file": backend.path.name,
        "threads": backend.threads, "ctx_size": args.ctx_size, "max_tokens": args.max_tokens,
        "runs": args.runs, "prompt_tokens": len(prompt_tokens),
        "tokens_per_run": [r["tokens"] for r in rows["edgerun"]],
        "decode_tokens_per_s_median": med,
        "engine_counter_decode_tokens_per_s_median": {s: statistics.median(v) for s, v in engine.items()},
        "ttft_ms_median": {s: statistics.median(r["ttft_ms"] for r in rows[s]) for s in rows},
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "decode_tokens_per_s": {s: spread([r["decode_tokens_per_s"] for r in rows[s]]) for s in rows},
        "ttft_ms_cold": {s: spread([r["ttft_ms"] for r in rows[s]]) for s in rows},
        "ratio": spread(ratios),
        "ttft_ratio": spread([e["ttft_ms"] / r["ttft_ms"] for e, r in zip(rows["edgerun"], rows["raw"])]),
        "target_ratio": 0.97,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "llama_cpp_python": llama_cpp.__version__, "edgerun": edgerun.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# edgerun chat overhead vs raw llama-cpp-python",
        "",
        f"{result['date']}, {result['file']}, {result['threads']} threads, greedy, {args.max_tokens} new tokens, "
        f"{args.runs} interleaved runs per side after one warm-up.",
        "",
        "Every run cold (both KV caches emptied; llama.cpp's counter: all prompt tokens evaluated).",
        "",
        "| path | decode tokens/s (wall) median [IQR] | decode tokens/s (llama.cpp counters, median) | "
        "cold TTFT ms median [IQR] |",
        "|---|---|---|---|",
    ]
    for s, label in (("edgerun", "edgerun session.chat (stream)"), ("raw", "llama_cpp.Llama.create_completion (stream)")):
        d, t = result["decode_tokens_per_s"][s], result["ttft_ms_cold"][s]
        md.append(f"| {label} | {d['median']:.1f} [{d['q1']:.1f}-{d['q3']:.1f}] | "
                  f"{result['engine_counter_decode_tokens_per_s_median'][s]:.1f} | "
                  f"{t['median']:.1f} [{t['q1']:.1f}-{t['q3']:.1f}] |")
    r, tr = result["ratio"], result["ttft_ratio"]
    md += ["", f"Ratio edgerun / raw decode tokens/s (per interleaved pair): median **{r['median']:.3f}** "
               f"[IQR {r['q1']:.3f}-{r['q3']:.3f}], min {result['ratio_min']:.3f}, max {result['ratio_max']:.3f}, "
               f"n {r['n']} (target >= 0.97). Cold TTFT ratio: median {tr['median']:.3f} "
               f"[{tr['q1']:.3f}-{tr['q3']:.3f}].", ""]
    (args.out / "chat_overhead.md").write_text("\n".join(md))
    print("\n".join(md))
    backend.close()
    raw.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
