"""KVTuner on SmolLM2-135M-Instruct: layout search, cache bytes, decode speed, llama.cpp's uniform types.

1. ``edgerun kv tune`` in per-token and KIVI mode (group 32, KIVI window 32): sensitivity on 2 x 512
   calibration tokens, 4 layer groups, NSGA-II with 36 trials (3 generations) and population 12, budget 6.0 average
   bits (to reach above the nearly-lossless point), quality = KL to KV16 and perplexity on 2 x 2048
   held-out wiki tokens (documents concatenated), teacher-forced; uniform KV8 ... KV2 on the same
   contexts; ARC-Easy (100 items, log-likelihood) on each Pareto front. The nearly-lossless point
   is the lowest-bit layout with perplexity within 1% of KV16.
2. KV-cache bytes measured on the packed cache (filled at 2048 and 8192 tokens with SmolLM2's
   shape, 30 layers x 3 KV heads x 64) vs the codes-only bytes average bits imply: the overhead
   of the float16 scales, int16 zero points and the KIVI window; and vs KV16 (fp16) and the fp32
   DynamicCache the torch backend uses unquantized.
3. Decode tokens/s in the torch backend (prompt 512 tokens, 64 greedy tokens, median of 3) of
   each uniform layout and the best front layouts vs the unquantized DynamicCache in the same run.
4. llama.cpp's uniform KV types on the float32 GGUF of the same model: perplexity on the same
   2 x 2048 tokens and decode tokens/s (flash attention on for every type, so speeds compare).

Usage: python benchmarks/kv_table.py [--trials 36] [--quick]
Writes benchmarks/results/kv_table.json, kv_table.md and kv/<mode>/ (layouts, trials.json, front.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from profilers.accuracy import kv_front_accuracy

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_TYPES = [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q5_1", "q5_1"), ("q4_1", "q4_1"),
               ("q4_0", "q4_0")]


def windows_nll(logprob_fn, windows) -> float:
    """Mean next-token NLL (nats) over token windows; ``logprob_fn(tokens)`` -> log p of tokens[1:]."""
    total = n = 0
    for w in windows:
        lp = logprob_fn(w)
        total += -float(sum(lp))
        n += len(lp)
    return total / n


def decode_speed(backend, prompt, n=64, repeats=3) -> float:
    from edgerun.backends.base import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    rates = []
    for _ in range(repeats):
        backend._cache, backend._cached_tokens = None, []     # no prefix reuse between repeats
        "".join(backend.stream(prompt, params))
        rates.append(backend.last_stats.decode_tokens_per_s)
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=36)
    ap.add_argument("--budget", type=float, default=6.0)
    ap.add_argument("--quick", action="store_true", help="small settings to check the script")
    args = ap.parse_args()

    import math

    import torch

    from converters.export import f32_cache
    from converters.source import open_source
    from edgerun import data
    from edgerun.backends.base import SamplingParams
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.backends.torch import TorchBackend
    from edgerun.kv import tune as kvt
    from edgerun.kv.cache import QuantizedKVCache
    from edgerun.kv.layout import Layout

    source = open_source("smollm2-135m-instruct", progress=False)
    ctx, n_ctx_windows = (512, 1) if args.quick else (2048, 2)
    trials = 8 if args.quick else args.trials
    result = {"benchmark": "kv_table", "source": source.label, "date": time.strftime("%Y-%m-%d"), "budget": args.budget,
              "trials": trials, "context": ctx, "contexts": n_ctx_windows, "modes": {}}

    # 1. the search, per mode
    for mode in ("per-token", "kivi"):
        out = RESULTS / "kv" / mode
        t0 = time.perf_counter()
        r = kvt.tune(source.path, out, budget=args.budget, trials=trials, population=12, mode=mode, groups=4,
                     context=ctx, contexts=n_ctx_windows, calib_windows=2, calib_len=512, progress=True, log=print)
        search_s = time.perf_counter() - t0
        acc = kv_front_accuracy(source.path, r.front, out, "arc-easy", 20 if args.quick else 100, progress=True)
        kv16 = r.kv16["ppl"]
        lossless = [lay for lay in r.front if lay.meta["ppl"] <= kv16 * 1.01]
        uniform_lossless = [u for u, v in r.uniform.items() if u != "KV16" and v["ppl"] <= kv16 * 1.01]
        result["modes"][mode] = {
            "search_seconds": search_s, "kv16_ppl": kv16, "uniform": r.uniform, "groups": r.groups,
            "candidates": r.candidates,
            "front": [{"name": lay.name, "avg_bits": lay.average_bits, "kl": lay.meta["kl"], "ppl": lay.meta["ppl"],
                       "ppl_vs_kv16_pct": (lay.meta["ppl"] / kv16 - 1) * 100, "layout": lay.describe()}
                      for lay in r.front],
            "accuracy": acc,
            "nearly_lossless": (min(lossless, key=lambda x: x.average_bits).name if lossless else None),
            "nearly_lossless_bits": (min(x.average_bits for x in lossless) if lossless else None),
            "uniform_nearly_lossless_min_bits": (min(r.uniform[u]["avg_bits"] for u in uniform_lossless)
                                                 if uniform_lossless else None),
        }
        print(json.dumps(result["modes"][mode]["front"], indent=1))
        save(result)

    # 2. bytes measured vs theoretical at 2k and 8k
    rows = []
    shape = (1, 3)
    for tokens in (2048, 8192):
        for mode in ("per-token", "kivi"):
            lays = [Layout.uniform(u, 30, mode) for u in ("KV16", "KV8", "K8V4", "KV4", "K4V2", "KV2")]
            for lay in lays:
                cache = QuantizedKVCache(lay.specs())
                torch.manual_seed(0)
                for i in range(30):
                    k = torch.randn(*shape, tokens, 64).half()
                    cache.update(k, k.clone(), i)
                measured = cache.nbytes()
                codes_only = lay.average_bits / 8 * 2 * 30 * 3 * 64 * tokens
                rows.append({"tokens": tokens, "mode": mode, "layout": lay.name, "avg_bits": lay.average_bits,
                             "measured_bytes": measured, "codes_only_bytes": codes_only,
                             "formula_bytes": lay.cache_bytes(tokens, 3, 64, fp_bits=16),
                             "overhead_pct": (measured / codes_only - 1) * 100,
                             "vs_fp16_cache": measured / (2 * 30 * 3 * 64 * tokens * 2)})
    result["bytes"] = rows
    save(result)

    # 3. decode speed in the torch backend
    engine = TorchBackend(source.path, n_ctx=1024)
    prompt = engine.tokenize(data.text("wiki", "heldout"))[:512]
    speed = {"DynamicCache (fp32)": decode_speed(engine, prompt)}
    for mode in ("per-token", "kivi"):
        for u in ("KV16", "KV8", "KV4", "KV2"):
            engine.set_kv_layout(Layout.uniform(u, 30, mode))
            speed[f"{u} {mode}"] = decode_speed(engine, prompt)
        engine.set_kv_layout(None)
    base = speed["DynamicCache (fp32)"]
    result["decode_tokens_per_s"] = {k: {"tokens_per_s": v, "vs_dynamic_cache": v / base} for k, v in speed.items()}
    print(json.dumps(result["decode_tokens_per_s"], indent=1))
    del engine
    save(result)

    # 4. llama.cpp uniform KV types on the F32 GGUF
    gguf = f32_cache(source)
    tok_engine = TorchBackend(source.path, n_ctx=ctx)
    win = data.token_windows(tok_engine.tokenizer, "wiki", "heldout", ctx, n_ctx_windows)
    del tok_engine
    llama_rows = []
    for tk, tv in LLAMA_TYPES:
        b = LlamaCppBackend(gguf, n_ctx=max(ctx, 1024) + 8, flash_attn=True, cache_type_k=tk, cache_type_v=tv)
        nll = windows_nll(b.token_logprobs, win)
        rates = []
        for _ in range(3):
            "".join(b.stream(prompt, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)))
            rates.append(b.last_stats.decode_tokens_per_s)
        llama_rows.append({"type_k": tk, "type_v": tv, "ppl": math.exp(nll), "decode_tokens_per_s": statistics.median(rates)})
        b.close()
        print(llama_rows[-1])
    f16 = llama_rows[0]
    for r in llama_rows:
        r["ppl_vs_f16_pct"] = (r["ppl"] / f16["ppl"] - 1) * 100
        r["speed_vs_f16"] = r["decode_tokens_per_s"] / f16["decode_tokens_per_s"]
    result["llama_cpp"] = llama_rows

    save(result)
    print(render(result))
    return 0


def save(result: dict) -> None:
    """Write what is measured so far (a later section failing loses nothing before it)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_table.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "kv_table.md").write_text(render(result))


def render(r: dict) -> str:
    lines = [f"# KVTuner on {r['source']} ({r['date']})", "",
             f"Search: budget {r['budget']} average bits, {r['trials']} NSGA-II trials (population 12), 4 layer "
             f"groups; quality teacher-forced on {r['contexts']} x {r['context']} held-out wiki tokens.", ""]
    for mode, m in r["modes"].items():
        lines += [f"## {mode}: KV16 perplexity {m['kv16_ppl']:.3f}, search {m['search_seconds'] / 60:.1f} min", "",
                  "| layout | avg bits | KL (nats/token) | perplexity | vs KV16 |", "|---|---:|---:|---:|---:|"]
        for u, v in m["uniform"].items():
            lines.append(f"| uniform {u} | {v['avg_bits']:.2f} | {v['kl']:.2e} | {v['ppl']:.3f} | "
                         f"{(v['ppl'] / m['kv16_ppl'] - 1) * 100:+.2f}% |")
        for f in m["front"]:
            lines.append(f"| {f['name']} ({f['layout']}) | {f['avg_bits']:.2f} | {f['kl']:.2e} | {f['ppl']:.3f} | "
                         f"{f['ppl_vs_kv16_pct']:+.2f}% |")
        lines += ["", f"Nearly lossless (perplexity within 1% of KV16): searched front "
                      f"{m['nearly_lossless_bits'] if m['nearly_lossless_bits'] is not None else 'none'} average bits "
                      f"({m['nearly_lossless']}); best uniform {m['uniform_nearly_lossless_min_bits']} bits.", "",
                  "ARC-Easy (log-likelihood, n items, 95% Wilson CI):", "",
                  "| layout | avg bits | accuracy | 95% CI |", "|---|---:|---:|---|"]
        for a in m["accuracy"]:
            lines.append(f"| {a['name']} | {a['avg_bits']:.2f} | {a['accuracy']:.3f} (n={a['n']}) | "
                         f"{a['ci95'][0]:.3f}-{a['ci95'][1]:.3f} |")
        lines.append("")
    lines += ["## KV-cache bytes: measured on the packed cache vs codes only", "",
              "| tokens | mode | layout | avg bits | measured MiB | codes-only MiB | overhead | vs fp16 cache |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for b in r.get("bytes", []):
        lines.append(f"| {b['tokens']} | {b['mode']} | {b['layout']} | {b['avg_bits']:.1f} | "
                     f"{b['measured_bytes'] / 2**20:.2f} | {b['codes_only_bytes'] / 2**20:.2f} | {b['overhead_pct']:+.1f}% | "
                     f"{b['vs_fp16_cache']:.3f} |")
    lines += ["", "## Decode speed, torch backend (512-token prompt, 64 tokens, median of 3)", "",
              "| cache | tokens/s | vs DynamicCache |", "|---|---:|---:|"]
    for k, v in r.get("decode_tokens_per_s", {}).items():
        lines.append(f"| {k} | {v['tokens_per_s']:.1f} | {v['vs_dynamic_cache']:.2f} |")
    lines += ["", "## llama.cpp uniform KV types (F32 weights, flash attention on)", "",
              "| type_k | type_v | perplexity | vs f16 | decode tokens/s | vs f16 |", "|---|---|---:|---:|---:|---:|"]
    for x in r.get("llama_cpp", []):
        lines.append(f"| {x['type_k']} | {x['type_v']} | {x['ppl']:.3f} | {x['ppl_vs_f16_pct']:+.2f}% | "
                     f"{x['decode_tokens_per_s']:.1f} | {x['speed_vs_f16']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
