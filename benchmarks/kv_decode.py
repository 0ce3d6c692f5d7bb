"""Decode speed and memory of the packed KV cache vs the unquantized DynamicCache (torch backend).

SmolLM2-135M-Instruct (float32, the torch backend's default dtype), 2 threads. For each context
length (512 and 2,048 tokens of held-out wiki text) the prompt is prefilled once into a DynamicCache;
each configuration then gets a fresh cache filled with those K/V in one update per layer (what a
prefill stores; the quantized configurations quantize them as a prefill would) and decodes
``--steps`` greedy tokens through the model. Configurations: the uniform layouts KV16, KV8, KV4,
KV2 in per-token and KIVI mode with the ``model`` working copy (each token dequantized once, kept at
float32), plus KV4 with a float16 working copy and with none (the whole history dequantized at every
step: the previous behaviour).

Every configuration is paired with a DynamicCache decode of the same tokens, step by step (A B A B:
one step of each in turn), so both see the same load; its ratio is the DynamicCache's decode time
over its own. Rounds run every configuration once in a shuffled order; ratios are reported as median
[IQR] n over rounds, so load from other processes on the machine (recorded with ``uptime`` before and
after) mostly cancels. Memory: the packed bytes the cache must hold (``nbytes()``) and the
working copy (``working_nbytes()``), after the decode, against the DynamicCache's float32 bytes.

Also a micro-benchmark of unpacking one (1, 3, 2048, 64) tensor: shifts to int64 (the previous
code), shifts to float32 directly (the current code) and a 256-entry lookup table per bit width.

Usage: python benchmarks/kv_decode.py [--rounds 5] [--steps 16] [--quick]
Writes benchmarks/results/kv_decode.json and kv_decode.md.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

from profilers.report import quartiles

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = ("KV16", "KV8", "KV4", "KV2")
LOW_COPIES = ("KV4",)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def configs() -> list[tuple[str, str | None, str, str]]:
    """(label, layout name, mode, working copy) of every configuration compared with the DynamicCache."""
    out = []
    for mode in ("per-token", "kivi"):
        for u in LAYOUTS:
            out.append((f"{u} {mode}", u, mode, "model"))
        for copy in ("float16", "none"):
            for u in LOW_COPIES:
                out.append((f"{u} {mode} copy={copy}", u, mode, copy))
    return out


def unpack_micro(repeats: int = 200) -> list[dict]:
    """ms per unpack of a (1, 3, 2048, 64) tensor: int64 shifts, float32 shifts, a 256-entry table."""
    import torch

    from edgerun.kv import quant

    x = torch.randn(1, 3, 2048, 64, generator=torch.Generator().manual_seed(0))
    rows = []
    for bits in (2, 4, 8):
        p = quant.quantize(x, bits, axis=-1, group=32)
        per, mask = 8 // bits, (1 << bits) - 1
        table = torch.tensor([[(b >> (bits * i)) & mask for i in range(per)] for b in range(256)], dtype=torch.float32)

        def old():
            if bits == 8:
                return p.codes.to(torch.int64).float()
            parts = [((p.codes >> (bits * i)) & mask) for i in range(per)]
            return torch.stack(parts, dim=-1).reshape(*p.codes.shape[:-1], 64).to(torch.int64).float()

        def new():
            return quant.unpack_float(p.codes, bits, 64)

        def lut():
            return table[p.codes.long()].reshape(*p.codes.shape[:-1], 64)

        def lut_embedding():
            return torch.nn.functional.embedding(p.codes.int(), table).reshape(*p.codes.shape[:-1], 64)

        ref = old()
        row = {"bits": bits}
        for name, f in (("shifts_int64", old), ("shifts_float32", new), ("table_index", lut),
                        ("table_embedding", lut_embedding)):
            assert torch.equal(f(), ref)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(repeats // 5):
                    f()
                times.append((time.perf_counter() - t0) / (repeats // 5) * 1e3)
            row[name + "_ms"] = sorted(times)[2]
        row["dequantize_ms"] = None
        t0 = time.perf_counter()
        for _ in range(repeats):
            quant.dequantize(p)
        row["dequantize_ms"] = (time.perf_counter() - t0) / repeats * 1e3
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--quick", action="store_true", help="2 rounds, 8 steps: check the script")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 8

    import torch
    from transformers import DynamicCache

    from converters.source import open_source
    from edgerun import data
    from edgerun.backends.torch import TorchBackend
    from edgerun.kv.cache import QuantizedKVCache
    from edgerun.kv.layout import Layout

    load_before = uptime()
    source = open_source("smollm2-135m-instruct", progress=False)
    engine = TorchBackend(source.path, n_ctx=max(args.contexts) + args.steps + 8, threads=2)
    cfg = engine.model.config
    n_layers = cfg.num_hidden_layers
    text = data.text("wiki", "heldout")
    all_tokens = engine.tokenize(text)
    result = {"benchmark": "kv_decode", "source": source.label, "date": time.strftime("%Y-%m-%d"),
              "threads": engine.threads, "rounds": args.rounds, "steps": args.steps, "uptime_before": load_before,
              "contexts": {}, "torch": torch.__version__}
    rng = random.Random(0)

    for ctx in args.contexts:
        prompt = all_tokens[:ctx]
        assert len(prompt) == ctx, f"held-out text has only {len(all_tokens)} tokens"
        base = DynamicCache(config=cfg)
        logits, base = engine._forward(prompt, base, 0)
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in base.layers]
        first = int(torch.argmax(logits[-1]))
        del base

        def fresh(layout, mode, copy):
            if layout is None:
                cache = DynamicCache(config=cfg)
            else:
                cache = QuantizedKVCache(Layout.uniform(layout, n_layers, mode).specs(), copy)
            with torch.inference_mode():
                for i, (k, v) in enumerate(kv):
                    cache.update(k.clone(), v.clone(), i)
            return cache

        def paired(cache) -> tuple[float, float, object]:
            """Decode ``cache`` and a fresh DynamicCache step by step in turn: (their tokens/s, ours, cache)."""
            base = fresh(None, "", "")
            toks, times = [first, first], [0.0, 0.0]
            caches = [base, cache]
            for step in range(args.steps):
                for j in (0, 1) if step % 2 == 0 else (1, 0):
                    t0 = time.perf_counter()
                    out, caches[j] = engine._forward([toks[j]], caches[j], ctx + step)
                    times[j] += time.perf_counter() - t0
                    toks[j] = int(torch.argmax(out[-1]))
            return args.steps / times[0], args.steps / times[1], caches

        rates: dict[str, list[float]] = {c[0]: [] for c in configs()}
        base_rates: list[float] = []
        ratios: dict[str, list[float]] = {c[0]: [] for c in configs()}
        memory: dict[str, dict] = {}
        paired(fresh("KV4", "per-token", "model"))                   # warm-up
        for r in range(args.rounds):
            order = configs()
            rng.shuffle(order)
            for label, layout, mode, copy in order:
                base_rate, rate, (base, cache) = paired(fresh(layout, mode, copy))
                rates[label].append(rate)
                base_rates.append(base_rate)
                ratios[label].append(rate / base_rate)
                if "DynamicCache (fp32)" not in memory:
                    held = sum(t.numel() * t.element_size() for layer in base.layers for t in (layer.keys, layer.values))
                    memory["DynamicCache (fp32)"] = {"packed_bytes": held, "working_bytes": 0}
                memory.setdefault(label, {"packed_bytes": cache.nbytes(), "working_bytes": cache.working_nbytes()})
                del cache, base
            print(f"ctx {ctx} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]:.2f}" for k, v in ratios.items()), flush=True)
        rates["DynamicCache (fp32)"], ratios["DynamicCache (fp32)"] = base_rates, [1.0] * len(base_rates)
        dyn = memory["DynamicCache (fp32)"]["packed_bytes"]
        rows = []
        for label, layout, mode, copy in [("DynamicCache (fp32)", None, "", "")] + configs():
            q1, med, q3 = quartiles(ratios[label])
            t1, tmed, t3 = quartiles(rates[label])
            m = memory[label]
            rows.append({"config": label, "layout": layout or "DynamicCache", "mode": mode, "working_copy": copy,
                         "tokens_per_s": {"median": tmed, "q1": t1, "q3": t3},
                         "vs_dynamic_cache": {"median": med, "q1": q1, "q3": q3, "n": len(ratios[label])},
                         "packed_bytes": m["packed_bytes"], "working_bytes": m["working_bytes"],
                         "held_vs_dynamic_cache": (m["packed_bytes"] + m["working_bytes"]) / dyn,
                         "packed_vs_dynamic_cache": m["packed_bytes"] / dyn})
        result["contexts"][str(ctx)] = rows
        save(result)
    result["unpack"] = unpack_micro()
    result["uptime_after"] = uptime()
    save(result)
    print((RESULTS / "kv_decode.md").read_text())
    return 0


def save(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_decode.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "kv_decode.md").write_text(render(result))


def render(r: dict) -> str:
    mib = 2 ** 20
    lines = ["# Packed KV cache: decode speed and memory (torch backend)", "",
             f"{r['source']}, float32, {r['threads']} threads, torch {r['torch']}; {r['date']}. "
             f"Per context: {r['rounds']} interleaved rounds of every configuration (shuffled order), "
             f"{r['steps']} greedy decode steps each after a prefill of held-out wiki text, paired step by step "
             "with a DynamicCache decode (A B A B); speed as the ratio to that DynamicCache, median [IQR] n over rounds "
             "(the DynamicCache row: every pairing). Bytes after the decode: *packed* is what the "
             "cache must hold (`nbytes()`: codes, scales, zeros, full-precision tokens), *working copy* what "
             "the dequantized copy adds (`working_nbytes()`, including spare capacity up to the next 64 tokens); "
             "*held* = packed + working copy, vs the float32 DynamicCache.", "",
             f"Load (`uptime`) before: `{r.get('uptime_before', '')}`; after: `{r.get('uptime_after', '')}`. "
             "Other processes shared this 2-core machine: absolute tokens/s vary with them, the step-paired ratios much less.",
             ""]
    for ctx, rows in r["contexts"].items():
        lines += [f"## {ctx}-token context", "",
                  "| cache | working copy | tokens/s | vs DynamicCache | packed MiB | working copy MiB | held vs DynamicCache |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for x in rows:
            v = x["vs_dynamic_cache"]
            lines.append(f"| {x['layout']} {x['mode']} | {x['working_copy'] or '-'} | {x['tokens_per_s']['median']:.1f} | "
                         f"{v['median']:.2f} [{v['q1']:.2f}-{v['q3']:.2f}] {v['n']} | {x['packed_bytes'] / mib:.2f} | "
                         f"{x['working_bytes'] / mib:.2f} | {x['held_vs_dynamic_cache']:.2f} |")
        lines.append("")
    if r.get("unpack"):
        lines += ["## Unpacking one (1, 3, 2048, 64) tensor, ms (median of 5 batches)", "",
                  "| bits | shifts -> int64 (before) | shifts -> float32 (now) | 256-entry table, index | table, embedding | whole dequantize |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for x in r["unpack"]:
            lines.append(f"| {x['bits']} | {x['shifts_int64_ms']:.3f} | {x['shifts_float32_ms']:.3f} | "
                         f"{x['table_index_ms']:.3f} | {x['table_embedding_ms']:.3f} | {x['dequantize_ms']:.3f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
