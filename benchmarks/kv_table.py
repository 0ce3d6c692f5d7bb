"""KVTuner on SmolLM2-135M-Instruct: layout search against uniform layouts at equal bits, cache bytes, llama.cpp types.

1. ``edgerun kv tune --search dp`` in per-token and KIVI mode (group 32, KIVI window 32): end-to-end KL
   sensitivity of each layer at each pair on 2 x 512 calibration tokens, the exact per-layer DP front
   under the additive KL model, 24 of its layouts up to the budget (6.0 average bits) verified by
   the real evaluator: KL to KV16 and perplexity on 2 x 2048 held-out wiki tokens (documents
   concatenated), teacher-forced; uniform KV8 ... KV2 on the same contexts. Each front point is set
   beside the uniform layouts at equal bits (interpolated between the neighbouring uniform layouts:
   KL log-linearly, perplexity linearly), and beside the previous NSGA-II front (4 groups, attention
   error sensitivity; ``kv/<mode>/trials.json`` from the earlier run) where it exists.
2. A downstream task longer than the KIVI window: pass-key retrieval (a 5-digit key planted once in
   ~600 tokens of held-out text; ``profilers.accuracy.passkey_retrieval``, teacher-forced through the
   packed cache, so in KIVI mode the key is read from quantized K/V) for KV16, every uniform layout and
   every verified DP layout on the same items: the key's NLL (nats) per item, compared item by item
   (paired bootstrap 95% intervals) with KV16 and with the uniform layouts at equal bits (per item,
   linearly between the two neighbouring uniform layouts), and digit / whole-key accuracy (Wilson).
3. KV-cache bytes measured on the packed cache (filled at 2048 and 8192 tokens with SmolLM2's
   shape, 30 layers x 3 KV heads x 64) vs the codes-only bytes average bits imply.
4. llama.cpp's uniform KV types on the float32 GGUF of the same model: perplexity on the same
   2 x 2048 tokens and decode tokens/s (flash attention on for every type, so speeds compare).

Decode speed of the packed cache in the torch backend is ``benchmarks/kv_decode.py``. Sections 3 and
4 do not depend on the search: they are kept from the previous run unless ``--all``.

Usage: python benchmarks/kv_table.py [--points 24] [--passkey 40] [--modes per-token,kivi] [--all] [--quick]
A mode left out keeps its previous results; the search resumes from kv/<mode>-dp/ (same settings), and
the pass-key scores resume per layout from kv/<mode>-dp/passkey.json.
Writes benchmarks/results/kv_table.json, kv_table.md and kv/<mode>-dp/ (layouts, trials.json, front.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from profilers.accuracy import paired_difference, passkey_retrieval

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


def _spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (scipy) of predicted and measured KL, or None under 3 points."""
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def interpolate_uniform(uniform: dict, bits: float) -> dict:
    """KL (log-linear) and perplexity (linear) of the uniform layouts at ``bits``, between the two nearest."""
    pts = sorted((v["avg_bits"], v["kl"], v["ppl"]) for u, v in uniform.items() if u != "KV16")
    if bits <= pts[0][0]:
        return {"kl": pts[0][1], "ppl": pts[0][2]}
    for (b0, k0, p0), (b1, k1, p1) in zip(pts, pts[1:]):
        if b0 <= bits <= b1:
            t = (bits - b0) / (b1 - b0)
            kl = math.exp(math.log(max(k0, 1e-12)) * (1 - t) + math.log(max(k1, 1e-12)) * t)
            return {"kl": kl, "ppl": p0 * (1 - t) + p1 * t}
    return {"kl": pts[-1][1], "ppl": pts[-1][2]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=24)
    ap.add_argument("--budget", type=float, default=6.0)
    ap.add_argument("--passkey", type=int, default=40, help="pass-key items per layout")
    ap.add_argument("--calib-windows", type=int, default=2, help="512-token windows of the sensitivity")
    ap.add_argument("--passkey-uniform", default="KV16,KV8,K8V4,KV4,K4V2,KV2",
                    help="uniform layouts scored on the pass-key task (KV16 first: the reference)")
    ap.add_argument("--passkey-dp-bits", default="0,99", help="LOW,HIGH: DP layouts scored on the pass-key task")
    ap.add_argument("--passkey-chars", type=int, default=2400, help="held-out characters per pass-key item")
    ap.add_argument("--modes", default="per-token,kivi", help="KV modes to (re)run, comma-separated")
    ap.add_argument("--all", action="store_true", help="also re-measure the cache bytes and llama.cpp types")
    ap.add_argument("--quick", action="store_true", help="small settings to check the script")
    args = ap.parse_args()
    global RESULTS
    if args.quick:                      # a check of the script: its own directory, the real results untouched
        RESULTS = Path(tempfile.mkdtemp(prefix="kv_table_quick_"))
        print(f"--quick: writing to {RESULTS}")

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
    points = 6 if args.quick else args.points
    previous = json.loads((RESULTS / "kv_table.json").read_text()) if (RESULTS / "kv_table.json").is_file() else {}
    result = {"benchmark": "kv_table", "source": source.label, "date": time.strftime("%Y-%m-%d"), "budget": args.budget,
              "points": points, "calib_windows": args.calib_windows, "passkey_items": args.passkey, "context": ctx, "contexts": n_ctx_windows, "search": "dp", "modes": {},
              "load_before": os.getloadavg()}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode, m in previous.get("modes", {}).items():
        if mode not in modes:
            result["modes"][mode] = m                  # kept from the previous run

    # 1. the search, per mode, against uniform at equal bits and the earlier NSGA-II front
    for mode in modes:
        out = RESULTS / "kv" / f"{mode}-dp"
        t0 = time.perf_counter()
        r = kvt.tune(source.path, out, budget=args.budget, search="dp", points=points, mode=mode,
                     context=ctx, contexts=n_ctx_windows, calib_windows=args.calib_windows, calib_len=512,
                     progress=True, log=print)
        search_s = time.perf_counter() - t0
        kv16 = r.kv16["ppl"]
        record = json.loads((out / "trials.json").read_text())
        verified = []
        for row in sorted(record["trials"], key=lambda x: x["avg_bits"]):
            if "predicted_kl" not in row:
                continue
            u = interpolate_uniform(r.uniform, row["avg_bits"])
            lay = Layout([kvt.PAIRS[p] for p in row["choice"]])
            verified.append({"avg_bits": row["avg_bits"], "kl": row["kl"], "predicted_kl": row["predicted_kl"],
                             "ppl": row["ppl"], "ppl_vs_kv16_pct": (row["ppl"] / kv16 - 1) * 100,
                             "uniform_kl": u["kl"], "uniform_ppl": u["ppl"], "kl_vs_uniform": row["kl"] / u["kl"],
                             "ppl_vs_uniform_pct": (row["ppl"] / u["ppl"] - 1) * 100, "layout": lay.describe(),
                             "choice": row["choice"]})
        nsga = None
        old = RESULTS / "kv" / mode / "trials.json"
        if old.is_file():
            o = json.loads(old.read_text())
            nsga = [{"avg_bits": t["avg_bits"], "kl": t["kl"], "ppl": t["ppl"]}
                    for t in o["trials"] if t["number"] in o["front"]]
        lossless = [v for v in verified if v["ppl"] <= kv16 * 1.01]
        uniform_lossless = [u for u, v in r.uniform.items() if u != "KV16" and v["ppl"] <= kv16 * 1.01]
        before = previous.get("modes", {}).get(mode, {}).get("search_seconds", 0)
        if search_s < before:                       # resumed from kv/<mode>-dp: the search's time is the first run's
            search_s = before
        m = {"search_seconds": search_s, "kv16_ppl": kv16, "uniform": r.uniform,
             "sensitivity_kl": record["sensitivity_kl"], "verified": verified, "nsga2_front_before": nsga,
             "front": [{"name": lay.name, "avg_bits": lay.average_bits, "kl": lay.meta["kl"], "ppl": lay.meta["ppl"],
                        "layout": lay.describe()} for lay in r.front],
             "nearly_lossless_bits": min((v["avg_bits"] for v in lossless), default=None),
             "uniform_nearly_lossless_min_bits": min((r.uniform[u]["avg_bits"] for u in uniform_lossless), default=None),
             "predicted_vs_measured_kl_spearman": _spearman([v["predicted_kl"] for v in verified],
                                                            [v["kl"] for v in verified])}
        result["modes"][mode] = m
        save(result)

        # 2. pass-key retrieval through the packed cache: KV16, the uniform layouts and every verified DP layout
        m["passkey"] = passkey_table(source.path, out, mode, verified, 10 if args.quick else args.passkey,
                                     args.passkey_chars,
                                     tuple(args.passkey_uniform.split(",")),
                                     tuple(float(x) for x in args.passkey_dp_bits.split(",")))
        save(result)

    if not args.all:
        for key in ("bytes", "llama_cpp"):
            if key in previous:
                result[key] = previous[key]
        result["kept_from"] = previous.get("date")
        result["load_after"] = os.getloadavg()
        save(result)
        print(render(result))
        return 0

    # 3. bytes measured vs theoretical at 2k and 8k
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

    # 4. llama.cpp uniform KV types on the F32 GGUF
    gguf = f32_cache(source)
    tok_engine = TorchBackend(source.path, n_ctx=ctx)
    win = data.token_windows(tok_engine.tokenizer, "wiki", "heldout", ctx, n_ctx_windows)
    prompt = tok_engine.tokenize(data.text("wiki", "heldout"))[:512]
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
    result["load_after"] = os.getloadavg()
    save(result)
    print(render(result))
    return 0


def passkey_table(model_dir, out: Path, mode: str, verified: list[dict], n: int,
                  chars: int = 2400, uniform_names=("KV16", "KV8", "K8V4", "KV4", "K4V2", "KV2"),
                  dp_range: tuple[float, float] = (0.0, 99.0)) -> dict:
    """Teacher-forced pass-key scores of KV16, the uniform layouts and the verified DP layouts with average
    bits in ``dp_range`` on the same ``n`` items (resumable per layout in ``out/passkey.json``), with
    paired comparisons per DP layout (against the uniform layouts scored, interpolated at equal bits)."""
    from edgerun.atomic import atomic_file
    from edgerun.backends.torch import TorchBackend
    from edgerun.kv.layout import Layout
    from edgerun.kv.tune import PAIRS, UNIFORM

    layouts = [Layout.uniform(u, 30, mode) for u in uniform_names]
    for v in verified:
        if dp_range[0] <= v["avg_bits"] <= dp_range[1] and not any(v["choice"] == [u] * 30 for u in UNIFORM):
            layouts.append(Layout([PAIRS[p] for p in v["choice"]], mode, name=f"DP {v['avg_bits']:.2f} bits"))
    memo_path = out / "passkey.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    if memo.get("n") != n or memo.get("chars") != chars:
        memo = {"n": n, "chars": chars, "layouts": {}}
    engine = TorchBackend(model_dir, n_ctx=1024, threads=1)   # 1 thread: robust when other work shares the cores
    for lay in layouts:
        key = ",".join(f"K{k}V{v}" for k, v in lay.pairs)
        if key in memo["layouts"]:
            continue
        engine.set_kv_layout(lay)
        t0 = time.perf_counter()
        a = passkey_retrieval(engine, n, chars=chars, progress=True)
        memo["layouts"][key] = {"name": lay.name, "avg_bits": lay.average_bits, "seconds": time.perf_counter() - t0, **a}
        print({k: v for k, v in memo["layouts"][key].items() if k != "key_nll_items"}, flush=True)
        with atomic_file(memo_path, force=True) as tmp:
            tmp.write_text(json.dumps(memo, indent=1))
    engine.close()
    rows = [memo["layouts"][",".join(f"K{k}V{v}" for k, v in lay.pairs)] for lay in layouts]
    base = rows[0]["key_nll_items"]
    uni = sorted((r for r in rows[1:len(uniform_names)]), key=lambda r: r["avg_bits"])
    for r in rows:
        r["vs_kv16"] = paired_difference(r["key_nll_items"], base)
        if r["name"].startswith("DP"):
            b = r["avg_bits"]
            lo = max((u for u in uni if u["avg_bits"] <= b), key=lambda u: u["avg_bits"])
            hi = min((u for u in uni if u["avg_bits"] >= b), key=lambda u: u["avg_bits"])
            t = 0.0 if hi is lo else (b - lo["avg_bits"]) / (hi["avg_bits"] - lo["avg_bits"])
            ref = [(1 - t) * x + t * y for x, y in zip(lo["key_nll_items"], hi["key_nll_items"])]
            r["uniform_key_nll"] = float(sum(ref) / len(ref))
            r["vs_uniform"] = paired_difference(r["key_nll_items"], ref)
    return {"n": n, "chars": chars, "rows": rows}


def save(result: dict) -> None:
    """Write what is measured so far (a later section failing loses nothing before it)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_table.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "kv_table.md").write_text(render(result))


def render(r: dict) -> str:
    lines = [f"# KVTuner on {r['source']} ({r['date']})", "",
             f"Search: exact per-layer DP over the end-to-end KL sensitivities ({r.get('calib_windows', 2)} x 512 "
             f"calibration tokens; additive model), {r['points']} "
             f"layouts up to {r['budget']} average bits verified teacher-forced on {r['contexts']} x {r['context']} "
             f"held-out wiki tokens; uniform layouts on the same tokens. Load average before "
             f"{', '.join(f'{x:.1f}' for x in r.get('load_before', []))} (2 cores; quality numbers do not depend on it).", ""]
    for mode, m in r["modes"].items():
        lines += [f"## {mode}: KV16 perplexity {m['kv16_ppl']:.3f}, search {m['search_seconds'] / 60:.1f} min", "",
                  "| layout | avg bits | KL (nats/token) | perplexity | vs KV16 |", "|---|---:|---:|---:|---:|"]
        for u, v in m["uniform"].items():
            lines.append(f"| uniform {u} | {v['avg_bits']:.2f} | {v['kl']:.2e} | {v['ppl']:.3f} | "
                         f"{(v['ppl'] / m['kv16_ppl'] - 1) * 100:+.2f}% |")
        lines += ["", "Verified DP layouts against the uniform layouts at equal bits (interpolated: KL log-linearly, "
                      "perplexity linearly between the neighbouring uniform layouts):", "",
                  "| avg bits | KL | uniform KL at equal bits | KL ratio | perplexity | vs KV16 | vs uniform at equal bits | predicted KL (sum) | layout |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for v in m["verified"]:
            lines.append(f"| {v['avg_bits']:.2f} | {v['kl']:.2e} | {v['uniform_kl']:.2e} | {v['kl_vs_uniform']:.2f} | "
                         f"{v['ppl']:.3f} | {v['ppl_vs_kv16_pct']:+.2f}% | {v['ppl_vs_uniform_pct']:+.2f}% | "
                         f"{v['predicted_kl']:.2e} | {v['layout']} |")
        rho = m.get("predicted_vs_measured_kl_spearman")
        lines += ["", f"Predicted (sum of one-layer KLs) vs measured KL over the verified layouts: Spearman "
                      f"{rho:.3f}." if rho is not None else "",
                  f"Nearly lossless (perplexity within 1% of KV16): DP {m['nearly_lossless_bits']} average bits; best "
                  f"uniform {m['uniform_nearly_lossless_min_bits']} bits.", ""]
        if m.get("nsga2_front_before"):
            lines += ["Previous NSGA-II front (4 groups, attention-error sensitivity), same evaluator, for reference:", "",
                      "| avg bits | KL | perplexity |", "|---:|---:|---:|"]
            for f in sorted(m["nsga2_front_before"], key=lambda x: x["avg_bits"]):
                lines.append(f"| {f['avg_bits']:.2f} | {f['kl']:.2e} | {f['ppl']:.3f} |")
            lines.append("")
        pk = m.get("passkey")
        if isinstance(pk, dict) and pk.get("rows"):
            lines += [f"Pass-key retrieval, teacher-forced ({pk['n']} items of ~{pk['rows'][0]['prompt_tokens']:.0f} tokens "
                      f"({pk.get('chars', 2400)} characters of held-out text), "
                      "a 5-digit key once at a random depth in held-out text; the same items for every layout): the "
                      "key's NLL in nats (lower is better) with paired bootstrap 95% intervals of the per-item "
                      "difference against KV16 and against the uniform layouts at equal bits (per item, linear "
                      "between the neighbouring uniform layouts; negative = the DP layout retrieves better); digit "
                      "accuracy (true digit first among the ten digit tokens, chance 0.1) and whole-key accuracy, "
                      "Wilson 95%.", "",
                      "| layout | avg bits | key NLL | vs KV16 | vs uniform at equal bits | digit acc. | key acc. |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for a in pk["rows"]:
                d = a["vs_kv16"]
                u = a.get("vs_uniform")
                us = (f"{u['mean']:+.3f} [{u['ci95'][0]:+.3f}, {u['ci95'][1]:+.3f}]" if u else "")
                lines.append(f"| {a['name']} | {a['avg_bits']:.2f} | {a['key_nll']:.3f} | {d['mean']:+.3f} "
                             f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {us} | {a['digit_accuracy']:.3f} "
                             f"({a['digit_ci95'][0]:.2f}-{a['digit_ci95'][1]:.2f}) | {a['key_accuracy']:.2f} "
                             f"({a['key_ci95'][0]:.2f}-{a['key_ci95'][1]:.2f}) |")
            lines.append("")
    lines += ["## KV-cache bytes: measured on the packed cache vs codes only", "",
              "| tokens | mode | layout | avg bits | measured MiB | codes-only MiB | overhead | vs fp16 cache |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for b in r.get("bytes", []):
        lines.append(f"| {b['tokens']} | {b['mode']} | {b['layout']} | {b['avg_bits']:.1f} | "
                     f"{b['measured_bytes'] / 2**20:.2f} | {b['codes_only_bytes'] / 2**20:.2f} | {b['overhead_pct']:+.1f}% | "
                     f"{b['vs_fp16_cache']:.3f} |")
    if r.get("kept_from"):
        lines += ["", f"(Cache bytes and llama.cpp types below are from the run of {r['kept_from']}; they do not "
                      "depend on the search.)"]
    lines += ["", "Decode speed of the packed cache in the torch backend: [kv_decode.md](kv_decode.md).", "",
              "## llama.cpp uniform KV types (F32 weights, flash attention on)", "",
              "| type_k | type_v | perplexity | vs f16 | decode tokens/s | vs f16 |", "|---|---|---:|---:|---:|---:|"]
    for x in r.get("llama_cpp", []):
        lines.append(f"| {x['type_k']} | {x['type_v']} | {x['ppl']:.3f} | {x['ppl_vs_f16_pct']:+.2f}% | "
                     f"{x['decode_tokens_per_s']:.1f} | {x['speed_vs_f16']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
