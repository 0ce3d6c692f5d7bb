"""CMoE on SmolLM2-135M-Instruct: dense vs carved perplexity, exact vs exported routing, decode speed.

For each configuration: carve wall time (16,384 calibration tokens of the wiki calibration split,
windows of 2,048), perplexity with exact CMoE routing (torch reference), router agreement of the
fitted linear router (held-out wiki tokens, exact top-k set), perplexity of the exported routing
(Granite host as an F32 GGUF in llama.cpp), and decode tokens/s in llama.cpp for the carved vs the
dense model at the same type (Q8_0; 128 prompt + 64 generated tokens, 1 warm-up, 3 runs, median).
The configurations in ``--finetune-configs`` (default S3A3E8) are also fine-tuned for
``--finetune-minutes`` (default 3) and measured again (exact and exported routing).
Perplexity by the shared protocol (held-out wiki, 512-token windows). The dense reference is the
Q4_1-dequantized source, measured in the same run.

Usage: python benchmarks/cmoe_table.py [--configs S3A3E8 S1A5E8 ...] [--windows 8]
Writes benchmarks/results/cmoe_table.json and .md.

``--routers`` (issue 16) measures instead, per configuration (default S3A3E8 and S2A2E8), the same
carve (fitted router, profiled sequentially under it) routed four ways in torch: random sets (2
seeds), CMoE's analytical router, the fitted linear router and the oracle (per token the experts whose
dropped remainder has the smallest output norm: the ceiling of any router on the grouping), with
paired bootstrap intervals over the windows for the ratio to dense and each router's agreement with
the oracle's set; then ATopK K in ``--atopk`` (default 10 50 100 200) for S2A2E8, fitted and oracle
(the oracle measures the grouping); and the fitted S2A2E8 exported to an F32 GGUF in llama.cpp
(exported = exact routing by construction). Writes benchmarks/results/cmoe_routers.json and .md.
``--routers --variants``: S2A2E8 carved with magnitude profiles instead of 0/1 markers, and with the
router fitted to the experts' log output norm instead of their activation mass, each measured with the
fitted router and the oracle. Writes benchmarks/results/cmoe_groupings.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ["S3A3E8", "S1A5E8", "S2A2E8", "S2A6E16", "S2A4E16"]


def decode_speed(path: Path, threads: int | None = None) -> float:
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.data import text
    from profilers import latency

    b = LlamaCppBackend(path, n_ctx=512, threads=threads)
    try:
        prompt = b.tokenize(text("wiki", "heldout"))[:128]
        latency.measure(b, prompt, 64)
        return statistics.median(latency.measure(b, prompt, 64).decode_tokens_per_s for _ in range(3))
    finally:
        b.close()


def _bootstrap_ratio(nll: list[float], ref: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval (over windows) of exp(mean nll - mean ref), the perplexity ratio."""
    import random

    rng = random.Random(seed)
    k = len(nll)
    ratios = []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        ratios.append(math.exp(sum(nll[i] - ref[i] for i in idx) / k))
    ratios.sort()
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def _cell(row: dict) -> str:
    """A result row as "perplexity (x dense, 95% interval)"."""
    lo, hi = row["x_dense_ci95"]
    return f"{row['perplexity']:.2f} ({row['x_dense']:.2f}x, {lo:.2f}-{hi:.2f})"


def _ratio(a: dict, b: dict) -> str:
    """Perplexity ratio of row a to row b, paired over windows, with its 95% bootstrap interval."""
    lo, hi = _bootstrap_ratio(a["window_nll"], b["window_nll"])
    return f"{math.exp(statistics.mean(a['window_nll']) - statistics.mean(b['window_nll'])):.3f} ({lo:.3f}-{hi:.3f})"


def routers_main(args) -> int:
    """The router comparison of issue 16 (see the module doc, ``--routers``)."""
    import os

    import torch

    from converters import gguf as gguf_writer
    from converters import passes
    from converters.moe_export import to_granite
    from converters.source import open_source
    from edgerun import data
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.moe.store import load_model
    from profilers.accuracy import perplexity, window_nlls

    torch.set_num_threads(args.threads)
    source = open_source("smollm2-135m-instruct", progress=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path)
    windows = data.token_windows(tok, "wiki", "heldout", 512, args.windows)

    def window_nll(model) -> list[float]:
        return window_nlls(model, windows)

    t0 = time.perf_counter()
    dense_model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    dense_nll = window_nll(dense_model)
    del dense_model
    dense_ppl = math.exp(statistics.mean(dense_nll))
    print(f"dense {dense_ppl:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def carve(name: str, k_a: int) -> Path:
        step = passes.make("carve", config=name, calib_tokens=16384, router="fitted", atopk=k_a)
        ctx = passes.Context(source=source, progress=False, log=print, label=source.label)
        t = time.perf_counter()
        out = step.apply(source.path, ctx, None)[0]
        print(f"carved {name} K={k_a}: {out} ({time.perf_counter() - t:.0f} s)", flush=True)
        return out

    def measure(model, routing: str, seed: int = 0, agreement: bool = True) -> dict:
        moes = [layer.mlp for layer in model.model.layers]
        for m in moes:
            m.router_kind = "analytical" if routing == "analytical" else "fitted"
            m.routing_override = routing if routing in ("oracle", "random") else None
            m.random_generator = torch.Generator().manual_seed(seed * 1000 + len(moes)) if routing == "random" else None
        hits, seen, handles = [0] * len(moes), [0] * len(moes), []
        if agreement and routing != "oracle":
            def hook(i):
                def f(mod, a):
                    x = a[0].reshape(-1, a[0].shape[-1])
                    if routing == "random":   # the draw the layer is about to make, from a copy of its generator
                        g = torch.Generator()
                        g.set_state(mod.random_generator.get_state())
                        sel = torch.topk(torch.rand((len(x), mod.n_routed), generator=g), mod.top_k, -1).indices
                    else:
                        sel = torch.topk(mod.selection_scores(x), mod.top_k, -1).indices
                    ora = mod.oracle_select(x)
                    a_ = torch.zeros(len(x), mod.n_routed).scatter_(1, sel, 1.0)
                    b_ = torch.zeros(len(x), mod.n_routed).scatter_(1, ora, 1.0)
                    hits[i] += int((a_ == b_).all(1).sum())
                    seen[i] += len(x)
                return f
            handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(moes)]
        t = time.perf_counter()
        try:
            nll = window_nll(model)
        finally:
            for h in handles:
                h.remove()
        ppl = math.exp(statistics.mean(nll))
        lo, hi = _bootstrap_ratio(nll, dense_nll)
        row = {"routing": routing, "perplexity": ppl, "x_dense": ppl / dense_ppl, "x_dense_ci95": [lo, hi],
               "window_nll": nll, "seconds": time.perf_counter() - t}
        if seen[0]:
            row["oracle_agreement_by_layer"] = [h / n for h, n in zip(hits, seen)]
            row["oracle_agreement_mean"] = statistics.mean(row["oracle_agreement_by_layer"])
        print(json.dumps({k: v for k, v in row.items() if k not in ("window_nll", "oracle_agreement_by_layer")}),
              flush=True)
        return row

    if args.variants:
        return _variants(args, source, dense_ppl, dense_nll, measure, load_model, t0)
    if args.distill:
        return _distill(args, source, dense_ppl, dense_nll, measure, load_model, carve, t0)

    result = {"benchmark": "cmoe_routers", "source": source.label, "dense_perplexity": dense_ppl,
              "dense_window_nll": dense_nll, "configs": {}, "atopk": {}, "export": None,
              "protocol": {"dataset": "wiki", "split": "heldout", "window": 512, "windows": args.windows,
                           "calibration_tokens": 16384, "threads": args.threads},
              "load_average_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    carved_k10 = {}
    for name in args.configs:
        path = carve(name, 10)
        carved_k10[name] = path
        model = load_model(path)
        rows = [measure(model, "random", seed) for seed in range(2)]
        rows += [measure(model, r) for r in ("analytical", "fitted", "oracle")]
        result["configs"][name] = {"carved": str(path), "rows": rows}
    for k_a in args.atopk:
        name = "S2A2E8"
        path = carved_k10.get(name) if k_a == 10 and name in carved_k10 else carve(name, k_a)
        if k_a == 10 and name in result["configs"]:
            rows = [r for r in result["configs"][name]["rows"] if r["routing"] in ("fitted", "oracle")]
        else:
            model = load_model(path)
            rows = [measure(model, "fitted", agreement=False), measure(model, "oracle")]
        result["atopk"][str(k_a)] = rows
    if args.export and "S2A2E8" in carved_k10:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            host = to_granite(carved_k10["S2A2E8"], Path(tmp) / "host")
            meta = json.loads((host / "config.json").read_text())["edgerun_moe"]
            f32 = gguf_writer.write_f32(host, Path(tmp) / "host.gguf")
            b = LlamaCppBackend(f32, n_ctx=520, cache_type_k="f32", cache_type_v="f32", threads=args.threads)
            try:
                ppl = perplexity(b, str(f32), n_windows=args.windows).perplexity
            finally:
                b.close()
        exact = next(r for r in result["configs"]["S2A2E8"]["rows"] if r["routing"] == "fitted")["perplexity"]
        result["export"] = {"config": "S2A2E8", "host_router": meta["host_router"],
                            "router_agreement_mean": meta["router_agreement_mean"],
                            "perplexity_llamacpp_f32": ppl, "perplexity_exact_torch": exact, "ratio": ppl / exact}
        print(json.dumps(result["export"]), flush=True)
    result["load_average_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cmoe_routers.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _routers_markdown(result)
    (args.out / "cmoe_routers.md").write_text(md)
    print(md)
    return 0


def _variants(args, source, dense_ppl, dense_nll, measure, load_model, t0) -> int:
    """Grouping and router-target variants of S2A2E8 (fitted router and oracle), written to cmoe_groupings.*."""
    import os
    import tempfile

    from converters.carve import carve_checkpoint

    variants = [tuple(v.split(":")) for v in args.variant_list]
    config = args.configs[0] if args.configs else "S2A2E8"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for grouping, target in variants:
            t = time.perf_counter()
            if (grouping, target) == ("markers", "mass"):   # the default carve: the cached one (deterministic)
                from converters import passes

                step = passes.make("carve", config=config, calib_tokens=16384, router="fitted", atopk=10)
                path = step.apply(source.path, passes.Context(source=source, progress=False, log=print), None)[0]
            else:
                path = carve_checkpoint(source.path, Path(tmp) / f"{grouping}-{target}", config, tokens=16384,
                                        grouping=grouping, target=target)
            carve_s = time.perf_counter() - t
            model = load_model(path)
            fitted, oracle = measure(model, "fitted"), measure(model, "oracle")
            rows.append({"grouping": grouping, "target": target, "carve_seconds": carve_s,
                         "fitted": fitted, "oracle": oracle})
            del model
    result = {"benchmark": "cmoe_groupings", "config": config, "source": source.label, "dense_perplexity": dense_ppl,
              "dense_window_nll": dense_nll, "rows": rows, "windows": args.windows, "threads": args.threads,
              "load_average_end": os.getloadavg(), "seconds": time.perf_counter() - t0,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "cmoe_groupings" if config == "S2A2E8" else f"cmoe_groupings_{config}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")

    md = _variants_markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


def _distill(args, source, dense_ppl, dense_nll, measure, load_model, carve, t0) -> int:
    """S2A2E8 (fitted) fine-tuned for ``args.distill`` minutes with and without the router distillation."""
    import os
    import tempfile

    from converters.cmoe_finetune import finetune

    config = args.distill_config
    carved = carve(config, 10)
    base = measure(load_model(carved), "fitted")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        frozen_steps = None
        for weight in args.distill_weights:
            # equal cost: the distilled run gets the frozen run's step count (its steps are slower: the
            # oracle runs per layer), with a generous time bound so the steps, not the clock, end it
            out, rep = finetune(carved, Path(tmp) / f"ft{weight:g}",
                                minutes=args.distill if frozen_steps is None else 4 * args.distill,
                                steps=frozen_steps, router_distill=weight)
            frozen_steps = frozen_steps or rep.steps
            row = measure(load_model(out), "fitted")
            rows.append({"router_distill": weight, "steps": rep.steps, "seconds": rep.seconds, "loss_first": rep.loss_first,
                         "loss_last": rep.loss_last, "distill_loss_first": rep.distill_loss_first,
                         "distill_loss_last": rep.distill_loss_last, "fitted": row})
    result = {"benchmark": "cmoe_distill", "config": config, "minutes": args.distill, "dense_perplexity": dense_ppl,
              "training_free": base, "rows": rows, "windows": args.windows, "threads": args.threads,
              "load_average_end": os.getloadavg(), "seconds": time.perf_counter() - t0,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("cmoe_distill" + ("" if config == "S2A2E8" else f"_{config}")
            + ("" if args.distill == 3 else f"_{args.distill:g}min"))
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")

    cell, ratio = _cell, _ratio
    md = [f"# CMoE fine-tune with a trained router, {config} on SmolLM2-135M-Instruct (issue 16)", "",
          f"{result['date']}. The fitted-router carve (16,384 wiki calibration tokens) fine-tuned for {args.distill:g} "
          "minutes (gate scales, LoRA r=8, one 256-token window per step) with the router frozen (distillation "
          "weight 0) or distilled towards the oracle's expert sets (weight 1) for the frozen run's number of steps "
          "(equal training; each run's wall time in brackets); perplexity on held-out wiki "
          f"({args.windows} x 512 tokens; dense {dense_ppl:.3f}); cells: perplexity (x dense, 95% paired bootstrap "
          f"interval); load average {result['load_average_end'][0]:.1f} at the end (the step counts show the "
          "budget the shared machine gave).", "",
          "| model | steps | train loss first -> last 10% | distillation loss | perplexity | agreement with the oracle | "
          "/ training-free |", "|---|---|---|---|---|---|---|",
          f"| training-free | - | - | - | {cell(base)} | {base['oracle_agreement_mean']:.1%} | 1 |"]
    for r in rows:
        d = (f"{r['distill_loss_first']:.3f} -> {r['distill_loss_last']:.3f}" if r["distill_loss_first"] is not None
             else "-")
        secs = f" ({r['seconds']:.0f} s)" if "seconds" in r else ""
        md.append(f"| router {'distilled' if r['router_distill'] else 'frozen'} | {r['steps']}{secs} | "
                  f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {d} | {cell(r['fitted'])} | "
                  f"{r['fitted']['oracle_agreement_mean']:.1%} | {ratio(r['fitted'], base)} |")
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _variants_markdown(result: dict) -> str:
    cell, ratio = _cell, _ratio
    base = result["rows"][0]
    md = [f"# CMoE grouping and router-target variants, {result['config']} on SmolLM2-135M-Instruct (issue 16)", "",
          f"{result['date']}. Dense perplexity {result['dense_perplexity']:.3f} on held-out wiki ({result['windows']} x "
          "512 tokens); each variant carved on 16,384 wiki calibration tokens (ATopK K = 10 for markers) with the "
          "fitted router. The oracle column is the grouping's ceiling (the measure of a grouping); cells: perplexity "
          "(x dense, 95% paired bootstrap interval over the windows); the last two columns are paired ratios to the "
          f"first row (CMoE's markers, mass target). {result['threads']} thread(s), load average "
          f"{result['load_average_end'][0]:.1f} at the end.", "",
          "| grouping | router target | fitted | oracle | fitted's agreement with the oracle | fitted / row 1 | "
          "oracle / row 1 |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        md.append(f"| {r['grouping']} | {r['target']} | {cell(r['fitted'])} | {cell(r['oracle'])} | "
                  f"{r['fitted']['oracle_agreement_mean']:.1%} | {ratio(r['fitted'], base['fitted'])} | "
                  f"{ratio(r['oracle'], base['oracle'])} |")
    return "\n".join(md) + "\n"


def _routers_markdown(r: dict) -> str:
    p = r["protocol"]
    cell, ratio = _cell, _ratio
    md = ["# CMoE routers on SmolLM2-135M-Instruct (issue 16)", "",
          f"{r['date']}. Dense source {r['source']}: perplexity {r['dense_perplexity']:.3f} on held-out wiki "
          f"({p['windows']} x {p['window']} tokens). Each configuration carved once (training-free, "
          f"{p['calibration_tokens']:,} wiki calibration tokens, profiled sequentially under the fitted router) "
          "and routed four ways on the same grouping in torch. Cells: perplexity (x dense, 95% paired bootstrap "
          f"interval over the windows). {p['threads']} thread(s); load average {r['load_average_start'][0]:.1f} at "
          f"the start, {r['load_average_end'][0]:.1f} at the end; {r['seconds'] / 60:.0f} minutes.", "",
          "| config | random (2 seeds) | analytical (CMoE) | fitted (default) | oracle |", "|---|---|---|---|---|"]
    for name, c in r["configs"].items():
        rows = {x["routing"]: x for x in c["rows"] if x["routing"] != "random"}
        rand = [x for x in c["rows"] if x["routing"] == "random"]
        rand_cell = " / ".join(f"{x['perplexity']:.2f} ({x['x_dense']:.2f}x)" for x in rand)
        md.append(f"| {name} | {rand_cell} | {cell(rows['analytical'])} | {cell(rows['fitted'])} | "
                  f"{cell(rows['oracle'])} |")
    md += ["", "Paired ratios on the same windows (perplexity ratio, 95% paired bootstrap interval):", "",
           "| config | analytical / fitted | fitted / oracle | random (seed 0) / fitted |", "|---|---|---|---|"]
    for name, c in r["configs"].items():
        rows = {x["routing"]: x for x in c["rows"] if x["routing"] != "random"}
        rand = next(x for x in c["rows"] if x["routing"] == "random")
        md.append(f"| {name} | {ratio(rows['analytical'], rows['fitted'])} | {ratio(rows['fitted'], rows['oracle'])} | "
                  f"{ratio(rand, rows['fitted'])} |")
    md += ["", "Share of tokens whose expert set equals the oracle's (mean over layers):", "",
           "| config | random | analytical | fitted |", "|---|---|---|---|"]
    for name, c in r["configs"].items():
        ag = {}
        for x in c["rows"]:
            if "oracle_agreement_mean" in x:
                ag.setdefault(x["routing"], []).append(x["oracle_agreement_mean"])
        md.append(f"| {name} | " + " | ".join(f"{statistics.mean(ag[k]):.1%}" for k in ("random", "analytical", "fitted"))
                  + " |")
    md += ["", "ATopK K (neurons marked per calibration token for the grouping), S2A2E8, fitted router; the oracle "
           "column is the grouping's ceiling:", "", "| K | fitted | oracle |", "|---|---|---|"]
    for k, rows in r["atopk"].items():
        rows = {x["routing"]: x for x in rows}
        md.append(f"| {k} | {cell(rows['fitted'])} | {cell(rows['oracle'])} |")
    e = r.get("export")
    if e:
        md += ["", f"Exported routing: the fitted {e['config']} hosted as Granite (router {e['host_router']}, "
               f"agreement with the carved model's top-k {e['router_agreement_mean']:.1%} on held-out tokens), F32 GGUF "
               f"in llama.cpp: perplexity {e['perplexity_llamacpp_f32']:.3f} vs {e['perplexity_exact_torch']:.3f} "
               f"exact in torch (x {e['ratio']:.4f}; the gates differ: softmax over the chosen logits at "
               "temperature 2^-7 times k, against exactly 1)."]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routers", action="store_true", help="the router comparison (issue 16) instead of the table")
    ap.add_argument("--atopk", nargs="*", type=int, default=[10, 50, 100, 200], help="with --routers: K values")
    ap.add_argument("--no-export", dest="export", action="store_false", help="with --routers: skip the GGUF check")
    ap.add_argument("--distill", type=float, default=None, metavar="MINUTES",
                    help="with --routers: S2A2E8 fine-tuned MINUTES with the router frozen and distilled "
                         "(writes cmoe_distill.*)")
    ap.add_argument("--distill-config", default="S2A2E8", help="with --distill: the configuration fine-tuned")
    ap.add_argument("--distill-weights", type=lambda v: [float(x) for x in v.split(",")], default=[0.0, 1.0],
                    help="with --distill: router distillation weights, one run each (default 0,1: frozen, distilled)")
    ap.add_argument("--variants", action="store_true",
                    help="with --routers: grouping (markers / magnitude) and router-target (mass / output) "
                         "variants of S2A2E8 (or the first --configs) instead (writes cmoe_groupings*.*)")
    ap.add_argument("--variant-list", nargs="*", default=["markers:mass", "magnitude:mass", "markers:output"],
                    help="with --variants: GROUPING:TARGET pairs, the first is the reference row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--finetune-configs", nargs="*", default=["S3A3E8"],
                    help="configurations also fine-tuned (CMoE --finetune)")
    ap.add_argument("--finetune-minutes", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.routers:
        args.configs = args.configs or ["S3A3E8", "S2A2E8"]
        return routers_main(args)
    args.configs = args.configs or CONFIGS

    from converters import gguf as gguf_writer
    from converters.carve import carve_checkpoint
    from converters.export import f32_cache
    from converters.moe_export import to_granite
    from converters.source import open_source
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.backends.torch import TorchBackend
    from edgerun.moe import config as moe_config
    from profilers.accuracy import perplexity

    import os

    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    source = open_source("smollm2-135m-instruct", progress=False)
    ctx = 520

    def ppl_torch(path):
        b = TorchBackend(path, n_ctx=ctx)
        try:
            return perplexity(b, str(path), n_windows=args.windows).perplexity
        finally:
            b.close()

    def ppl_gguf(path):
        b = LlamaCppBackend(path, n_ctx=ctx, cache_type_k="f32", cache_type_v="f32")
        try:
            return perplexity(b, str(path), n_windows=args.windows).perplexity
        finally:
            b.close()

    dense_f32 = f32_cache(source)
    dense = {"perplexity_torch": ppl_torch(source.path), "perplexity_llamacpp_f32": ppl_gguf(dense_f32)}
    with tempfile.TemporaryDirectory() as tmp:
        q8 = gguf_writer.quantize(dense_f32, Path(tmp) / "dense-q8.gguf", "Q8_0")
        dense["decode_tokens_per_s_q8_0"] = decode_speed(q8, args.threads)
        print(f"dense: {dense}", flush=True)
        rows = []
        for name in args.configs:
            cfg = moe_config.parse(name, 1536)
            t0 = time.perf_counter()
            carved = carve_checkpoint(source.path, Path(tmp) / name, name, tokens=16384, seq_len=2048)
            carve_s = time.perf_counter() - t0
            exact = ppl_torch(carved)
            t0 = time.perf_counter()
            granite = to_granite(carved, Path(tmp) / f"{name}-granite")
            host_s = time.perf_counter() - t0
            meta = json.loads((granite / "config.json").read_text())["edgerun_moe"]
            f32 = gguf_writer.write_f32(granite, Path(tmp) / f"{name}.gguf")
            exported = ppl_gguf(f32)
            cq8 = gguf_writer.quantize(f32, Path(tmp) / f"{name}-q8.gguf", "Q8_0")
            speed = decode_speed(cq8, args.threads)
            row = {"config": name, "active_fraction": cfg.active_fraction, "carve_seconds": carve_s,
                   "router": json.loads((carved / "config.json").read_text())["edgerun_moe"]["router"],
                   "host_seconds": host_s, "perplexity_exact": exact, "perplexity_exported": exported,
                   "ratio_exact_vs_dense": exact / dense["perplexity_torch"],
                   "ratio_exported_vs_exact": exported / exact,
                   "router_agreement_mean": meta["router_agreement_mean"],
                   "router_agreement_min": min(meta["router_agreement"]),
                   "decode_tokens_per_s_q8_0": speed,
                   "decode_speedup_vs_dense": speed / dense["decode_tokens_per_s_q8_0"]}
            if name in args.finetune_configs:
                from converters.cmoe_finetune import finetune

                ft, rep = finetune(carved, Path(tmp) / f"{name}-ft", minutes=args.finetune_minutes)
                ft_granite = to_granite(ft, Path(tmp) / f"{name}-ft-granite")
                ft_f32 = gguf_writer.write_f32(ft_granite, Path(tmp) / f"{name}-ft.gguf")
                row["finetune"] = {"minutes": args.finetune_minutes, "steps": rep.steps, "tokens": rep.tokens,
                                   "loss_first": rep.loss_first, "loss_last": rep.loss_last,
                                   "imbalance_first": rep.imbalance_first, "imbalance_last": rep.imbalance_last,
                                   "perplexity_exact": ppl_torch(ft), "perplexity_exported": ppl_gguf(ft_f32),
                                   "router_agreement_mean": json.loads((ft_granite / "config.json").read_text())
                                   ["edgerun_moe"]["router_agreement_mean"]}
                ft_f32.unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)
            for p in (f32, cq8):
                p.unlink()
    half = [r for r in rows if abs(r["active_fraction"] - 0.5) < 1e-9]
    best = min(half, key=lambda r: r["perplexity_exact"])["config"] if half else None
    result = {"benchmark": "cmoe_table", "source": source.label, "dense": dense, "rows": rows,
              "default_moe_config_at_50_percent": best,
              "protocol": {"dataset": "wiki", "split": "heldout", "window": 512, "windows": args.windows},
              "threads": args.threads, "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cmoe_table.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# CMoE on SmolLM2-135M-Instruct", "",
          f"{result['date']}. Dense source: {source.label}; perplexity {dense['perplexity_torch']:.3f} (torch) / "
          f"{dense['perplexity_llamacpp_f32']:.3f} (llama.cpp F32) on held-out wiki ({args.windows} x 512 tokens); "
          f"dense Q8_0 decodes at {dense['decode_tokens_per_s_q8_0']:.1f} tokens/s ({args.threads} thread). "
          "Training-free carving on 16,384 wiki calibration tokens, "
          f"{' and '.join(sorted({r['router'] for r in rows}))} router (the default; the exported host routes "
          "with the same linear router, so its agreement is exact by construction). Load average "
          f"{load_start[0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end: the decode speeds are "
          "single measurements on a shared machine (median of 3 runs of 64 tokens), the ratios taken in the same run.", "",
          "| config | active | carve s | ppl exact routing | x dense | router agreement (mean / min layer) | "
          "ppl exported routing | x exact | Q8_0 decode tok/s | x dense |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['config']} | {r['active_fraction']:.1%} | {r['carve_seconds']:.0f} | {r['perplexity_exact']:.2f} | "
                  f"{r['ratio_exact_vs_dense']:.2f} | {r['router_agreement_mean']:.1%} / {r['router_agreement_min']:.1%} | "
                  f"{r['perplexity_exported']:.2f} | {r['ratio_exported_vs_exact']:.3f} | "
                  f"{r['decode_tokens_per_s_q8_0']:.1f} | {r['decode_speedup_vs_dense']:.2f} |")
    tuned = [r for r in rows if "finetune" in r]
    if tuned:
        md += ["", "After `--finetune` (gate scales, bias load balancing, LoRA r=8 on the wiki calibration split, "
               "one 256-token window per step, bounded in minutes):", "",
               "| config | minutes | steps | train loss first -> last 10% | load imbalance (max/mean) | "
               "ppl exact | x dense | ppl exported | router agreement |", "|---|---|---|---|---|---|---|---|---|"]
        for r in tuned:
            f = r["finetune"]
            md.append(f"| {r['config']} | {f['minutes']:g} | {f['steps']} | {f['loss_first']:.3f} -> {f['loss_last']:.3f} | "
                      f"{f['imbalance_first']:.2f} -> {f['imbalance_last']:.2f} | {f['perplexity_exact']:.2f} | "
                      f"{f['perplexity_exact'] / dense['perplexity_torch']:.2f} | {f['perplexity_exported']:.2f} | "
                      f"{f['router_agreement_mean']:.1%} |")
    md += ["", f"Best perplexity at 50% active: **{best}** (the default MoE model: "
           f"`edgerun carve smollm2-135m-instruct --config {best}`).", ""]
    (args.out / "cmoe_table.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
