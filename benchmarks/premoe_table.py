"""PreMoe on the carved SmolLM2 MoE: specialization, retrieval, memory and speed, score-function ablation.

The carved model is the carve benchmark's best 50%-active configuration (``cmoe_table.json``), carved
on 16,384 wiki calibration tokens. Patterns come from 4,096 calibration tokens of each task under
exact CMoE routing (torch). Per task, held-out perplexity (2 x 512 tokens of the task's held-out
split) with: its own pattern, each other task's pattern, random expert subsets (3 seeds), and the
full model, at b = 75% and 50% of the routed experts (rounded up; a = min(active, b)). Retrieval:
TAER's choice for 10 held-out prompts per task (the first 400 characters of held-out documents),
with key layer 0 and a deeper key layer. Memory and speed: llama.cpp Q8_0 GGUFs assembled for one
task at each b against the full carved GGUF (model bytes, peak RSS, decode tokens/s). Score-function
ablation: own-pattern perplexity at b = 50% under each TCESS contribution.

Usage: python benchmarks/premoe_table.py [--config S2A6E16]
Writes benchmarks/results/premoe_table.json and .md.

``--retrieval`` (issue 16) measures only retrieval, for every key kind (:data:`edgerun.moe.tcess.KEYS`:
layer-0 TCESS as in PreMoe, all-layer normalised expert mass, all-layer frequency, mean layer-0 input):
accuracy over 10 held-out prompts per task (the first 400 characters of held-out documents, never used
for the patterns), the confusion matrix, and the cost per query (median and 90th percentile ms, one
thread). Writes benchmarks/results/premoe_retrieval.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("wiki", "c4", "tiny", "code", "multilingual", "technical", "math")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--retrieval", action="store_true", help="measure retrieval only, every key kind (issue 16)")
    ap.add_argument("--prompts", type=int, default=10, help="with --retrieval: held-out prompts per task")
    ap.add_argument("--depths", nargs="*", type=int, default=[4, 8],
                    help="with --retrieval: also mass keys over the first N MoE layers")
    ap.add_argument("--keys", nargs="*", default=None, help="with --retrieval: only these keys (e.g. layer mass@8)")
    ap.add_argument("--patterns-cache", type=Path, default=None,
                    help="with --retrieval: save the calibrated patterns here, or reuse them")
    ap.add_argument("--specialization", action="store_true",
                    help="own pattern vs 10+ random expert sets vs a pooled generic pattern, per held-out window, "
                         "paired bootstrap (issue 16)")
    ap.add_argument("--windows", type=int, default=16, help="with --specialization: held-out windows of 512 per task")
    ap.add_argument("--seeds", type=int, default=10, help="with --specialization: random expert sets")
    ap.add_argument("--b", type=int, default=None, help="with --specialization: routed experts kept (default half)")
    ap.add_argument("--domains", default="", metavar="A,B,...",
                    help="with --specialization: carve with the domain-aware grouping on these catalog texts "
                         "(issue 16 item 4; 'tasks' = the 7 tasks), written as premoe_specialization_<config>_dom.*")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="with --specialization: the carve's calibration tokens")
    args = ap.parse_args(argv)
    if args.retrieval:
        return retrieval_main(args)
    if args.specialization:
        return specialization_main(args)

    import torch

    from converters.export import carved_cache, granite_cache
    from converters.source import open_source
    from edgerun import data
    from edgerun.backends.torch import TorchBackend
    from edgerun.moe import adapters, tcess
    from edgerun.moe import calibrate as cal

    cfg_name = args.config
    if cfg_name is None:
        table = json.loads((RESULTS / "cmoe_table.json").read_text())
        cfg_name = table["default_moe_config_at_50_percent"]
    source = open_source("smollm2-135m-instruct", progress=False)
    carved = carved_cache(source, cfg_name, 16384, False, print)
    base = TorchBackend(carved, n_ctx=600)
    model, tok = base.model, base.tokenizer
    layers = adapters.moe_layers(model)
    n_exp, top_k = layers[0].n_experts, layers[0].top_k

    # patterns, all score functions come from the same statistics
    t0 = time.perf_counter()
    patterns = {p.task: p for p in cal.calibrate(model, tok, [(t, t) for t in TASKS], tokens=4096, name=cfg_name)}
    calib_s = time.perf_counter() - t0

    windows = {t: data.token_windows(tok, t, "heldout", 512, 2) for t in TASKS}

    def ppl(m, task):
        from edgerun.backends.base import log_softmax_at

        total, count = 0.0, 0
        with torch.inference_mode():
            for w in windows[task]:
                logits = m(input_ids=torch.tensor([w])).logits[0].float().numpy()
                lp = log_softmax_at(logits[:-1], w[1:])
                total -= float(lp.sum())
                count += len(lp)
        return math.exp(total / count)

    def pruned(keep, a):
        m = copy.deepcopy(model)
        adapters.prune(m, keep, a)
        return m

    full = {t: ppl(model, t) for t in TASKS}
    print("full", full, flush=True)
    levels = sorted({math.ceil(0.75 * n_exp), math.ceil(0.5 * n_exp)}, reverse=True)
    spec = {}
    for b in levels:
        a = min(top_k, b)
        rows = {}
        for t in TASKS:
            own = ppl(pruned(patterns[t].keep(b), a), t)
            others = [ppl(pruned(patterns[o].keep(b), a), t) for o in TASKS if o != t]
            rand = []
            for seed in range(3):
                rng = random.Random(seed)
                rand.append(ppl(pruned([sorted(rng.sample(range(n_exp), b)) for _ in layers], a), t))
            rows[t] = {"own": own, "others_mean": statistics.mean(others), "others_best": min(others),
                       "random_mean": statistics.mean(rand), "random_min": min(rand), "random_max": max(rand),
                       "full": full[t]}
            print(b, t, rows[t], flush=True)
        spec[f"{a}/{b}"] = rows

    # score-function ablation at the lowest b
    b = levels[-1]
    a = min(top_k, b)
    ablation = {s: {t: ppl(pruned(patterns[t].keep(b, s), a), t) for t in TASKS} for s in tcess.SCORES}
    print("ablation", ablation, flush=True)

    # retrieval: key layer 0 and a deeper one
    from edgerun.data import documents

    retrieval = {}
    for key_layer in (0, len(layers) // 2):
        keys = {t: tcess.Pattern(t, patterns[t].tokens, patterns[t].model, patterns[t].score, key_layer,
                                 patterns[t].stats).key() for t in TASKS}
        confusion = {t: {u: 0 for u in TASKS} for t in TASKS}
        times = []
        for t in TASKS:
            held = [d for d in documents(t, "heldout") if len(d) > 100]
            for d in held[:10]:
                t1 = time.perf_counter()
                q = cal.query_key(model, tok, d[:400], key_layer, patterns[t].score)
                nearest = min(TASKS, key=lambda u: float(torch.linalg.norm(keys[u] - q)))
                times.append((time.perf_counter() - t1) * 1e3)
                confusion[t][nearest] += 1
        correct = sum(confusion[t][t] for t in TASKS)
        total = sum(sum(r.values()) for r in confusion.values())
        retrieval[f"layer{key_layer}"] = {"accuracy": correct / total, "confusion": confusion,
                                          "latency_ms_median": statistics.median(times)}
        print("retrieval", key_layer, correct / total, flush=True)

    # memory and speed in llama.cpp: assembled GGUFs vs the full carved GGUF
    memory = _memory_and_speed(carved, granite_cache(carved, False, print), patterns["wiki"], levels, top_k)

    result = {"benchmark": "premoe_table", "config": cfg_name, "routed_experts": n_exp, "top_k": top_k,
              "calibration_seconds": calib_s, "specialization": spec, "score_ablation": {"b": b, "a": a, **ablation},
              "retrieval": retrieval, "memory_speed": memory, "date": time.strftime("%Y-%m-%d"),
              "default_score": tcess.DEFAULT_SCORE, "score": patterns[TASKS[0]].score,
              "router": json.loads((carved / "config.json").read_text())["edgerun_moe"].get("router", "analytical")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "premoe_table.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "premoe_table.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def pooled_pattern(patterns, name: str = "generic"):
    """One pattern from several tasks' statistics summed (every task's calibration tokens pooled): the
    task-agnostic control of the specialization measurement."""
    from edgerun.moe import tcess

    ps = list(patterns)
    stats = []
    for layer in range(len(ps[0].stats)):
        fields = {}
        for f in ("count", "logit_sum", "prob_sum", "softplus_sum", "mass_sum"):
            rows = [getattr(p.stats[layer], f) for p in ps]
            fields[f] = [sum(v) for v in zip(*rows)] if all(rows) else []
        stats.append(tcess.LayerStats(**fields))
    return tcess.Pattern(name, sum(p.tokens for p in ps), ps[0].model, ps[0].score, ps[0].key_layer, stats)


def specialization_main(args) -> int:
    """PreMoe's premise measured: does a task's own expert pattern beat random expert sets (equal b) and a
    pooled generic pattern on the task's held-out text? Per-window NLL, paired bootstrap over windows.

    Writes benchmarks/results/premoe_specialization.json and .md."""
    import copy
    import os

    import torch

    from converters.export import carved_cache
    from converters.source import open_source
    from edgerun import data
    from edgerun.backends.torch import TorchBackend
    from edgerun.moe import adapters
    from edgerun.moe import calibrate as cal
    from profilers.accuracy import paired_difference, window_nlls

    torch.set_num_threads(1)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    cfg_name = args.config or "S2A2E8"
    source = open_source("smollm2-135m-instruct", progress=False)
    domains = ",".join(TASKS) if args.domains == "tasks" else args.domains
    carved = carved_cache(source, cfg_name, args.calib_tokens, False, print, domains=domains or None)
    meta = json.loads((carved / "config.json").read_text())["edgerun_moe"]
    router = meta.get("router", "analytical")
    base = TorchBackend(carved, n_ctx=600, threads=1)
    model, tok = base.model, base.tokenizer
    layers = adapters.moe_layers(model)
    n_exp, top_k = layers[0].n_experts, layers[0].top_k
    b = args.b or math.ceil(n_exp / 2)
    a = min(top_k, b)
    patterns = {p.task: p for p in cal.calibrate(model, tok, [(t, t) for t in TASKS], tokens=4096, name=cfg_name)}
    generic = pooled_pattern(patterns.values())
    # every held-out window up to --windows (a split with fewer gives all it has; the table says how many)
    windows = {t: data.token_windows(tok, t, "heldout", 512)[:args.windows] for t in TASKS}

    def nlls(m, task) -> list[float]:
        return window_nlls(m, windows[task])

    def pruned(keep):
        m = copy.deepcopy(model)
        adapters.prune(m, keep, a)
        return m

    full = {t: nlls(model, t) for t in TASKS}
    print("full", {t: round(math.exp(statistics.mean(v)), 2) for t, v in full.items()}, flush=True)
    own = {t: nlls(pruned(patterns[t].keep(b)), t) for t in TASKS}
    gm = pruned(generic.keep(b))
    gen = {t: nlls(gm, t) for t in TASKS}
    del gm
    rand = {t: [] for t in TASKS}
    for seed in range(args.seeds):
        rng = random.Random(seed)
        rm = pruned([sorted(rng.sample(range(n_exp), b)) for _ in layers])
        for t in TASKS:
            rand[t].append(nlls(rm, t))
        print("random seed", seed, flush=True)
        del rm
    rows = {}
    all_own, all_rand, all_gen = [], [], []
    for t in TASKS:
        rmean = [statistics.mean(r[i] for r in rand[t]) for i in range(len(windows[t]))]
        seed_ppl = [math.exp(statistics.mean(r)) for r in rand[t]]
        rows[t] = {"windows": len(windows[t]), "full_ppl": math.exp(statistics.mean(full[t])),
                   "own_ppl": math.exp(statistics.mean(own[t])), "generic_ppl": math.exp(statistics.mean(gen[t])),
                   "random_ppl_mean": statistics.mean(seed_ppl), "random_ppl_min": min(seed_ppl),
                   "random_ppl_max": max(seed_ppl),
                   "own_beats_random_seeds": sum(math.exp(statistics.mean(own[t])) < p for p in seed_ppl),
                   "own_minus_random": paired_difference(own[t], rmean),
                   "own_minus_generic": paired_difference(own[t], gen[t])}
        all_own += own[t]
        all_rand += rmean
        all_gen += gen[t]
        print(t, rows[t], flush=True)
    result = {"benchmark": "premoe_specialization", "config": cfg_name, "router": router, "routed_experts": n_exp,
              "carve": {"calibration": meta["calibration"], **{k: meta[k] for k in ("domains", "domain_weight",
                                                                                   "domain_purity") if k in meta}},
              "top_k": top_k, "b": b, "a": a, "seeds": args.seeds, "window_tokens": 512, "score": generic.score,
              "rows": rows, "pooled": {"own_minus_random": paired_difference(all_own, all_rand),
                                       "own_minus_generic": paired_difference(all_own, all_gen)},
              "seconds": round(time.perf_counter() - t_start, 1), "date": time.strftime("%Y-%m-%d"),
              "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "premoe_specialization" if cfg_name == "S2A2E8" and not domains and args.calib_tokens == 16384 else \
        f"premoe_specialization_{cfg_name}" + ("_dom" if domains else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _specialization_markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


def _specialization_markdown(r: dict) -> str:
    def ci(d):
        lo, hi = d["ci95"]
        verdict = "better" if hi < 0 else "worse" if lo > 0 else "within noise"
        return f"{d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({verdict})"

    lines = [f"# PreMoe specialization: own pattern vs random and generic ({r['config']}, {r['router']} router)", "",
             f"{r['date']}. `python benchmarks/premoe_table.py --specialization --windows {max(v['windows'] for v in r['rows'].values())} "
             f"--seeds {r['seeds']} --config {r['config']}"
             + (" --domains tasks" if r.get("carve", {}).get("domains") else "")
             + f"`: the carved SmolLM2 ({r['routed_experts']} routed experts, top-{r['top_k']}) "
             f"pruned to b = {r['b']} experts per layer (a = {r['a']}) by each task's own pattern (4,096 calibration "
             f"tokens, TCESS `{r['score']}`), by {r['seeds']} random expert sets (the same sets for every task) and by "
             "a *generic* pattern (the 7 tasks' statistics pooled). Held-out windows of 512 tokens never used for "
             "the patterns; per window the NLL (nats/token); differences are own minus control, paired over windows, "
             "95% BCa bootstrap (negative: the own pattern is better). "
             + (f"The carve is **domain-aware** on {', '.join(r['carve']['domains'])} "
                f"({r['carve']['calibration']['tokens']} calibration tokens in equal shares, domain weight "
                f"{r['carve']['domain_weight']}; mean domain purity of the routed experts by layer "
                f"{min(r['carve']['domain_purity']):.2f}-{max(r['carve']['domain_purity']):.2f}). "
                if r.get("carve", {}).get("domains") else
                f"The carve is CMoE's co-activation grouping on {r.get('carve', {}).get('calibration', {}).get('tokens', 16384)} "
                f"{r.get('carve', {}).get('calibration', {}).get('dataset', 'wiki')} tokens. ")
             + f"{r['seconds']:.0f} s, 1 thread, load average {r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}.",
             "", "| task | windows | full | own | generic | random (mean, min-max) | own beats random sets | "
             "own - random (nats/token) | own - generic (nats/token) |", "|---|---|---|---|---|---|---|---|---|"]
    for t, v in r["rows"].items():
        lines.append(f"| {t} | {v['windows']} | {v['full_ppl']:.2f} | {v['own_ppl']:.2f} | {v['generic_ppl']:.2f} | "
                     f"{v['random_ppl_mean']:.2f} ({v['random_ppl_min']:.2f}-{v['random_ppl_max']:.2f}) | "
                     f"{v['own_beats_random_seeds']}/{r['seeds']} | {ci(v['own_minus_random'])} | "
                     f"{ci(v['own_minus_generic'])} |")
    p = r["pooled"]
    lines += ["", f"Pooled over every task's windows: own - random {ci(p['own_minus_random'])}, own - generic "
                  f"{ci(p['own_minus_generic'])}.", ""]
    return "\n".join(lines)


def retrieval_main(args) -> int:
    """Retrieval accuracy and cost per query of every key kind (see the module doc, ``--retrieval``)."""
    import os

    import torch

    from converters.export import carved_cache
    from converters.source import open_source
    from edgerun.backends.torch import TorchBackend
    from edgerun.data import documents
    from edgerun.moe import calibrate as cal
    from edgerun.moe import tcess

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    cfg_name = args.config or "S2A2E8"
    source = open_source("smollm2-135m-instruct", progress=False)
    carved = carved_cache(source, cfg_name, 16384, False, print)
    base = TorchBackend(carved, n_ctx=600, threads=1)
    model, tok = base.model, base.tokenizer
    router = json.loads((carved / "config.json").read_text())["edgerun_moe"].get("router", "analytical")
    t0 = time.perf_counter()
    cache = args.patterns_cache
    if cache is not None and all((cache / f"{t}.json").is_file() for t in TASKS):
        patterns = {t: tcess.load(cache / f"{t}.json") for t in TASKS}
        calib_s = float(json.loads((cache / "seconds.json").read_text())["seconds"])
    else:
        patterns = {p.task: p for p in cal.calibrate(model, tok, [(t, t) for t in TASKS], tokens=4096, name=cfg_name)}
        calib_s = time.perf_counter() - t0
        if cache is not None:
            for p in patterns.values():
                tcess.save(p, cache)
            (cache / "seconds.json").write_text(json.dumps({"seconds": calib_s}))
    prompts = {t: [d[:400] for d in documents(t, "heldout") if len(d) > 100][:args.prompts] for t in TASKS}
    kinds = {"layer": ("layer-0 TCESS (PreMoe; raw-logit)", "layer", 0),
             "mass": ("normalised expert mass, all layers", "mass", 0),
             "frequency": ("top-k frequency, all layers", "frequency", 0),
             "hidden": ("mean layer-0 FFN input", "hidden", 0)}
    for depth in args.depths:
        kinds[f"mass@{depth}"] = (f"normalised expert mass, first {depth} layers", "mass", depth)
    if args.keys:
        kinds = {k: v for k, v in kinds.items() if k in args.keys}
    score = tcess.DEFAULT_SCORE
    results = {}
    for name, (label, kind, depth) in kinds.items():
        keys = {t: patterns[t].key(score, kind, depth) for t in TASKS}
        confusion = {t: {u: 0 for u in TASKS} for t in TASKS}
        times = []
        for t in TASKS:
            for text in prompts[t]:
                t1 = time.perf_counter()
                q = cal.query_key(model, tok, text, 0, score, kind, depth)
                nearest = min(TASKS, key=lambda u: float(torch.linalg.norm(keys[u] - q)))
                times.append((time.perf_counter() - t1) * 1e3)
                confusion[t][nearest] += 1
        correct = sum(confusion[t][t] for t in TASKS)
        total = sum(sum(r.values()) for r in confusion.values())
        times.sort()
        results[name] = {"label": label, "key_size": int(keys[TASKS[0]].numel()), "accuracy": correct / total,
                         "correct": correct, "total": total, "confusion": confusion,
                         "latency_ms_median": statistics.median(times),
                         "latency_ms_p90": times[int(0.9 * (len(times) - 1))]}
        print(name, results[name]["accuracy"], results[name]["latency_ms_median"], flush=True)
    prompt_tokens = [len(tok(x, add_special_tokens=False).input_ids) for t in TASKS for x in prompts[t]]
    result = {"benchmark": "premoe_retrieval", "config": cfg_name, "router": router, "tasks": list(TASKS),
              "calibration_tokens_per_task": 4096, "calibration_seconds": calib_s,
              "prompt_tokens_median": statistics.median(prompt_tokens), "keys": results,
              "default_key": tcess.DEFAULT_KEY, "threads": 1, "load_average_start": load_start,
              "load_average_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "premoe_retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# PreMoe retrieval keys on the carved SmolLM2 MoE ({cfg_name}, {router} router)", "",
          f"{result['date']}. Patterns from 4,096 calibration tokens per task ({len(TASKS)} tasks, {calib_s:.0f} s); "
          f"{args.prompts} held-out prompts per task (first 400 characters of held-out documents, median "
          f"{result['prompt_tokens_median']:.0f} tokens); nearest stored key by L2; chance {1 / len(TASKS):.0%}. "
          f"Cost per query: key computation + nearest key, torch, 1 thread, load average "
          f"{load_start[0]:.1f} -> {result['load_average_end'][0]:.1f}.", "",
          "| key | size | accuracy | query ms (median / p90) |", "|---|---|---|---|"]
    for kind, r in results.items():
        md.append(f"| {r['label']} (`{kind}`) | {r['key_size']} | {r['accuracy']:.1%} ({r['correct']}/{r['total']}) | "
                  f"{r['latency_ms_median']:.0f} / {r['latency_ms_p90']:.0f} |")
    for kind, r in results.items():
        md += ["", f"Confusion, `{kind}` (rows: true task, columns: retrieved):", "",
               "| true \\ retrieved | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for t in TASKS:
            md.append(f"| {t} | " + " | ".join(str(r["confusion"][t][u]) for u in TASKS) + " |")
    (args.out / "premoe_retrieval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _memory_and_speed(carved: Path, host: Path, pattern, levels, top_k) -> list[dict]:
    import gc
    import tempfile

    from converters import gguf as gguf_writer
    from converters.prune import prune_host
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.data import text
    from profilers import latency
    from edgerun.procmem import PeakRSS

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("full", host)]
        for b in levels:
            a = min(top_k, b)
            variants.append((f"{pattern.task} {a}/{b}", prune_host(host, Path(tmp) / f"p{b}", pattern.keep(b), a,
                                                                    {"task": pattern.task})))
        for name, ckpt in variants:
            f32 = gguf_writer.write_f32(ckpt, Path(tmp) / f"{name.replace(' ', '_').replace('/', '-')}.f32.gguf")
            q8 = gguf_writer.quantize(f32, f32.with_suffix(".q8.gguf"), "Q8_0")
            f32.unlink()
            gc.collect()
            with PeakRSS() as rss:
                b = LlamaCppBackend(q8, n_ctx=512)
                prompt = b.tokenize(text("wiki", "heldout"))[:128]
                latency.measure(b, prompt, 64)
                speeds = [latency.measure(b, prompt, 64).decode_tokens_per_s for _ in range(3)]
                model_bytes = b.memory().model_bytes
                b.close()
            rows.append({"model": name, "file_bytes": q8.stat().st_size, "model_bytes": model_bytes,
                         "peak_rss_bytes": rss.peak_bytes, "decode_tokens_per_s": statistics.median(speeds)})
            print(rows[-1], flush=True)
            q8.unlink()
    return rows


def _markdown(r: dict) -> str:
    from edgerun.moe.tcess import DEFAULT_SCORE

    used = r.get("score", r["default_score"])   # runs before "score" was recorded used the default of their day
    note = "" if used == DEFAULT_SCORE else f" (the default when this ran; the default is now {DEFAULT_SCORE})"
    router = r.get("router", "analytical")
    lines = [f"# PreMoe on the carved SmolLM2 MoE ({r['config']}: {r['routed_experts']} routed experts, top-{r['top_k']})",
             "", f"{r['date']}. Patterns from 4,096 calibration tokens per task (exact routing of the carved model, "
             f"{router} router, torch, {r['calibration_seconds']:.0f} s for 7 tasks); held-out perplexity on 2 x 512 "
             f"tokens per task; the patterns' TCESS contribution: {used}{note}.", ""]
    for level, rows in r["specialization"].items():
        lines += [f"## Specialization at a/b = {level}", "",
                  "| task | full | own pattern | other patterns (mean / best) | random (mean, min-max of 3) | own vs random |",
                  "|---|---|---|---|---|---|"]
        for t, v in rows.items():
            lines.append(f"| {t} | {v['full']:.2f} | {v['own']:.2f} | {v['others_mean']:.2f} / {v['others_best']:.2f} | "
                         f"{v['random_mean']:.2f} ({v['random_min']:.2f}-{v['random_max']:.2f}) | "
                         f"{(v['own'] / v['random_mean'] - 1) * 100:+.1f}% |")
        lines.append("")
    ab = r["score_ablation"]
    lines += [f"## Score-function ablation (own pattern, a/b = {ab['a']}/{ab['b']})", "",
              "| task | " + " | ".join(s for s in ab if s not in ("a", "b")) + " |",
              "|---|" + "---|" * (len(ab) - 2)]
    tasks = next(v for k, v in ab.items() if k not in ("a", "b")).keys()
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{ab[s][t]:.2f}" for s in ab if s not in ("a", "b")) + " |")
    lines += ["", "## Retrieval (TAER)", ""]
    for k, v in r["retrieval"].items():
        lines.append(f"- key {k}: accuracy {v['accuracy']:.1%} over {sum(sum(x.values()) for x in v['confusion'].values())} "
                     f"held-out prompts, median {v['latency_ms_median']:.1f} ms per query")
        lines.append("")
        tasks = list(v["confusion"])
        lines.append("| true \\\\ retrieved | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(str(v["confusion"][t][u]) for u in tasks) + " |")
        lines.append("")
    lines += ["## Memory and speed (llama.cpp, Q8_0)", "", "| model | file MiB | model MiB | peak RSS MiB | decode tok/s |",
              "|---|---|---|---|---|"]
    for m in r["memory_speed"]:
        lines.append(f"| {m['model']} | {m['file_bytes'] / 2**20:.1f} | {m['model_bytes'] / 2**20:.1f} | "
                     f"{m['peak_rss_bytes'] / 2**20:.0f} | {m['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
