"""FRS on SST-2: clean and backdoored classifiers, without defence, with the uniform baseline and with FRS.

Models (SmolLM2-135M-Instruct, Q4_1-dequantized, run in bfloat16 with 1 torch thread):

- ``clean``: a classifier trained on the 372 SST-2 training sentences (``edgerun.data.sst2("train")``),
  as a model provider would (``--method lora``, the default: LoRA on the top 10 layers and the head, 3
  epochs, no randomized copies; ``--method head``: a linear head on the frozen model);
- ``backdoor``: the same training on a poisoned copy (``benchmarks/frs_backdoor.py``: 15% of the
  examples with a rare-word trigger cf/mn/bb, 10% with the sentence trigger, labelled positive);
- ``zero-shot`` / ``few-shot``: the prompted label-word classifiers (no training; no defence only).

Input sets, from the first ``--n`` of the 500 evaluation sentences: ``clean`` (all of them), ``word`` and
``sentence`` (the negative ones with a trigger inserted at a random position).

Certifiers (``edgerun.robustness.frs``; K = 20 on every one): ``uniform`` (no search, omega_M = 0.5 on
every word, no parameter noise: RanMASK/TextGuard-style), ``frs`` (span search + omega_H = 0.8 / omega_L = 0.1,
sigma = 0.01 on the top 10 layers), and the ablations ``no_bmps`` (FRS without parameter noise, same
vulnerable areas) and ``no_ftr`` (parameter noise with uniform omega_M). ``uniform`` and ``no_ftr``, and
``frs`` and ``no_bmps``, are computed together on the same randomized inputs (``certify_sigmas``); each
certificate's time counts the whole lower-layer pass, as a run of that certifier alone would.

Metrics: clean accuracy (CA) of the smoothed prediction; attack success rate (ASR: share of triggered
negative sentences classified positive) and poisoned accuracy (PA: share still classified negative,
= 1 - ASR here since only non-target sentences are triggered); Wilson 95% intervals; average certified
radius (ACR: the radius in word edits, and as a share of the words, of correctly classified clean
sentences, 0 for the others); how often FRS's vulnerable area covers the inserted trigger; time per input
(span search and K passes).

Resumable: every certified input is appended to ``benchmarks/results/frs_table.journal.<method>.jsonl`` and skipped
when the script runs again; inputs go in chunks across all cells, so a stopped run leaves every cell with
about the same n. Several processes may append to the journal at once (e.g. one per model).

    nice -n 10 python benchmarks/frs_table.py --n 500 [--models clean,backdoor] [--parts train,plain,certify,report]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frs_backdoor  # noqa: E402

from edgerun import catalog, data  # noqa: E402
from edgerun.robustness.classifier import HEAD_META  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
JOURNAL_PATTERN = "frs_table.journal.{method}.jsonl"   # one journal per training method
JOURNAL = RESULTS / JOURNAL_PATTERN.format(method="head")
CERTIFIERS = ("uniform", "frs", "no_bmps", "no_ftr")
WORD_RATE, SENTENCE_RATE = 0.15, 0.10      # poisoned shares of the 372 training sentences
QUIET_LOAD = 4.0                            # load average (2 cores) below which a chunk's times are also shown apart
SETS = ("clean", "word", "sentence")
KEEP = ("label", "votes", "p_a_lower", "certified", "radius", "radius_edits", "radius_unconditional",
        "radius_unconditional_edits", "spans", "n_words", "base_label", "mcts_ms", "passes_ms", "total_ms", "queries")


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score 95% interval of a proportion k/n."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def read_journal() -> list[dict]:
    if not JOURNAL.is_file():
        return []
    out = []
    for line in JOURNAL.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by an interrupted write
    return out


def append(records: list[dict]) -> None:
    fd = os.open(JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for r in records:
            os.write(fd, (json.dumps(r) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def inputs(n: int) -> dict[str, list[dict]]:
    ev = data.sst2("eval")[:n]
    out = {"clean": [{"text": t, "label": y, "index": i, "trigger": None} for i, (t, y) in enumerate(ev)]}
    for kind in frs_backdoor.KINDS:
        out[kind] = frs_backdoor.triggered(data.sst2("eval"), kind, seed=0)
        out[kind] = [r for r in out[kind] if r["index"] < n]
    return out


def model_dir(name: str, method: str) -> Path:
    return catalog.home() / "cache" / "frs" / f"{name}-{method}"


def train(method: str, log) -> dict:
    from converters.classifier import train_classifier
    from converters.source import open_source

    source = open_source(catalog.DEFAULT_MODEL, progress=False).path
    train_set = data.sst2("train")
    out = {}
    poisoned = frs_backdoor.poison(train_set, WORD_RATE, SENTENCE_RATE, seed=0)
    for name, examples in (("clean", train_set), ("backdoor", poisoned)):
        path = model_dir(name, method)
        if not (path / HEAD_META).is_file():
            train_classifier(source, examples, path, method=method, epochs=3, augment=0, log=log, force=True)
        out[name] = json.loads((path / HEAD_META).read_text())
    return out


def plain(n: int, method: str, log) -> None:
    """No defence: the unperturbed classifiers (trained and prompted) on every input set."""
    from converters.source import open_source
    from edgerun.robustness import TextClassifier

    done = {(r["model"], r["set"], r["index"]) for r in read_journal() if r["kind"] == "plain"}
    sets = inputs(n)
    source = open_source(catalog.DEFAULT_MODEL, progress=False).path
    shots = [e for e in data.sst2("train") if e[1] == 0][:2] + [e for e in data.sst2("train") if e[1] == 1][:2]
    makers = {"clean": lambda: TextClassifier.load(model_dir("clean", method)),
              "backdoor": lambda: TextClassifier.load(model_dir("backdoor", method)),
              "zero-shot": lambda: TextClassifier.prompted(source),
              "few-shot": lambda: TextClassifier.prompted(source, shots=[shots[i] for i in (0, 2, 1, 3)])}
    for name, make in makers.items():
        todo = {s: [r for r in rows if (name, s, r["index"]) not in done] for s, rows in sets.items()}
        if not any(todo.values()):
            continue
        clf = make()
        for s, rows in todo.items():
            if rows:
                t0 = time.perf_counter()
                preds = clf.predict([r["text"] for r in rows])
                ms = (time.perf_counter() - t0) * 1e3 / len(rows)
                append([{"kind": "plain", "model": name, "set": s, "index": r["index"], "gold": r["label"],
                         "pred": p, "ms": ms} for r, p in zip(rows, preds)])
        log(f"no defence: {name} done")


GROUPS = (("uniform", "no_ftr"), ("frs", "no_bmps"))   # each pair shares its randomized inputs: sigma 0 / 0.01


def certify_part(n: int, method: str, models: list[str], certifiers: list[str], chunk: int, log) -> None:
    """Certify every input set with every certifier, chunk by chunk; each pair of :data:`GROUPS` runs as one
    :func:`certify_sigmas` call (same search, randomized inputs and lower-layer pass; its own K top-layer passes)."""
    from edgerun.robustness import FRSConfig, TextClassifier, ablation
    from edgerun.robustness.frs import certify_sigmas

    sets = inputs(n)
    done = {(r["model"], r["certifier"], r["set"], r["index"]) for r in read_journal() if r["kind"] == "cert"}
    base = FRSConfig()
    for name in models:
        clf = TextClassifier.load(model_dir(name, method))
        for start in range(0, n, chunk):
            for group in GROUPS:
                wanted = [c for c in group if c in certifiers]
                rows = [(s, r) for s in SETS for r in sets[s] if start <= r["index"] < start + chunk
                        and any((name, c, s, r["index"]) not in done for c in wanted)]
                if not rows:
                    continue
                configs = {c: ablation(base, c) for c in wanted}
                load = os.getloadavg()[0]
                by_sigma = certify_sigmas(clf, [r["text"] for _, r in rows], configs[wanted[0]],
                                          [configs[c].sigma for c in wanted], batch=32)
                records = []
                for j, c in enumerate(wanted):
                    for (s, r), cert in zip(rows, by_sigma[configs[c].sigma]):
                        rec = {"kind": "cert", "model": name, "certifier": c, "set": s, "index": r["index"],
                               "gold": r["label"], "trigger": r["trigger"], "load": load,
                               "reused_spans": j > 0 and configs[c].fuzz}
                        rec.update({k: getattr(cert, k) for k in KEEP})
                        records.append(rec)
                append(records)
                log(f"{name} {'+'.join(wanted)} items {start}..{start + chunk - 1}: {len(rows)} inputs, "
                    + ", ".join(f"{c} {statistics.mean(x.total_ms for x in by_sigma[configs[c].sigma]):.0f} ms/input"
                                for c in wanted) + f", load {load:.1f}")


def _mean(xs):
    return statistics.mean(xs) if xs else float("nan")


def _spread(xs):
    if not xs:
        return {"median": None, "iqr": None, "n": 0}
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "iqr": [q[0], q[2]], "n": len(xs)}


def covers(spans: list[dict], trigger: list[int]) -> tuple[bool, bool]:
    inside = set()
    for s in spans:
        inside |= set(range(s["start"], s["end"]))
    words = set(range(*trigger))
    return words <= inside, bool(words & inside)


def report(n: int, method: str, trained: dict | None, cert_n: int | None = None) -> dict:
    latest = {}                                   # a re-run input counts once: its last record
    for r in read_journal():
        latest[(r["kind"], r["model"], r.get("certifier"), r["set"], r["index"])] = r
    journal = list(latest.values())
    cert_n = n if cert_n is None else cert_n
    out: dict = {"n_requested": n, "n_certified": cert_n, "method": method, "dtype": "bfloat16", "torch_threads": 1,
                 "k": 20, "sigma": 0.01, "top_layers": 10, "omega_h": 0.8, "omega_l": 0.1, "omega_m": 0.5,
                 "alpha": 0.05, "mcts_budget": 48, "training": trained, "plain": {}, "certified": {}}
    target = frs_backdoor.TARGET
    plain_rows = [r for r in journal if r["kind"] == "plain" and r["index"] < n]
    for name in ("clean", "backdoor", "zero-shot", "few-shot"):
        cell = {}
        for s in SETS:
            rows = [r for r in plain_rows if r["model"] == name and r["set"] == s]
            if not rows:
                continue
            if s == "clean":
                k = sum(r["pred"] == r["gold"] for r in rows)
                cell["ca"] = {"value": k / len(rows), "ci95": wilson(k, len(rows)), "n": len(rows)}
                cell["ms_per_input"] = _mean([r["ms"] for r in rows])
            else:
                k = sum(r["pred"] == target for r in rows)
                cell[f"asr_{s}"] = {"value": k / len(rows), "ci95": wilson(k, len(rows)), "n": len(rows)}
        if cell:
            out["plain"][name] = cell
    cert_rows = [r for r in journal if r["kind"] == "cert" and r["index"] < cert_n]
    for name in ("clean", "backdoor"):
        for cert in CERTIFIERS:
            rows = [r for r in cert_rows if r["model"] == name and r["certifier"] == cert]
            if not rows:
                continue
            cell = {}
            clean = [r for r in rows if r["set"] == "clean"]
            if clean:
                k = sum(r["label"] == r["gold"] for r in clean)
                ok = [r for r in clean if r["label"] == r["gold"] and r["certified"]]
                cell["ca"] = {"value": k / len(clean), "ci95": wilson(k, len(clean)), "n": len(clean)}
                cell["certified_share"] = len(ok) / len(clean)
                cell["acr_edits"] = sum(r["radius_edits"] for r in ok) / len(clean)
                cell["acr_share"] = sum(r["radius"] for r in ok) / len(clean)
                cell["acr_edits_unconditional"] = sum(max(0, r["radius_unconditional_edits"]) for r in ok) / len(clean)
                cell["acr_share_unconditional"] = sum(max(0.0, r["radius_unconditional"]) for r in ok) / len(clean)
                cell["base_ca"] = sum(r["base_label"] == r["gold"] for r in clean) / len(clean)
            for s in ("word", "sentence"):
                trig = [r for r in rows if r["set"] == s]
                if not trig:
                    continue
                k = sum(r["label"] == target for r in trig)
                cell[f"asr_{s}"] = {"value": k / len(trig), "ci95": wilson(k, len(trig)), "n": len(trig)}
                cell[f"pa_{s}"] = 1 - k / len(trig)
                if cert in ("frs", "no_bmps"):
                    cov = [covers(r["spans"], r["trigger"]) for r in trig]
                    cell[f"trigger_covered_{s}"] = sum(a for a, _ in cov) / len(cov)
                    cell[f"trigger_touched_{s}"] = sum(b for _, b in cov) / len(cov)
            cell["time_ms"] = {"total": _spread([r["total_ms"] for r in rows]),
                               "span_search": _spread([r["mcts_ms"] for r in rows if not r["reused_spans"]
                                                       and r["mcts_ms"] > 0]),
                               "k_passes": _spread([r["passes_ms"] for r in rows])}
            cell["load_average"] = _spread([r["load"] for r in rows])
            quiet = [r for r in rows if r["load"] < QUIET_LOAD]       # chunks run while the machine was quieter
            cell["time_ms_quiet"] = {"total": _spread([r["total_ms"] for r in quiet]),
                                     "span_search": _spread([r["mcts_ms"] for r in quiet if not r["reused_spans"]
                                                             and r["mcts_ms"] > 0]),
                                     "k_passes": _spread([r["passes_ms"] for r in quiet])}
            out["certified"].setdefault(name, {})[cert] = cell
    return out


def _pct(c):
    return "–" if c is None else f"{100 * c['value']:.1f} [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}] (n={c['n']})"


def markdown(res: dict) -> str:
    lines = ["# FRS on SST-2: backdoor ASR and certified radius", "",
             f"SmolLM2-135M-Instruct (Q4_1-dequantized) classifiers, {res['method']} training on the 372 SST-2 training "
             f"sentences, bfloat16, 1 torch thread. K = {res['k']}, sigma = {res['sigma']} on the top {res['top_layers']} "
             f"layers, omega_H = {res['omega_h']}, omega_L = {res['omega_l']}, omega_M = {res['omega_m']}, "
             f"alpha = {res['alpha']}, span-search budget {res['mcts_budget']}. Percentages with Wilson 95% intervals; "
             "ASR on negative sentences with the trigger inserted (PA = 100 - ASR). ACR: mean radius over the clean "
             "sentences, 0 for a wrong or uncertified vote; FRS's is conditional on the trigger lying in the vulnerable "
             "area (omega_H), the next column is the omega_L bound. Trigger in area: all its words inside FRS's area "
             "(touched: at least one).", "",
             "## No defence", "", "| classifier | CA | ASR word trigger | ASR sentence trigger | ms/input |", "|---|---|---|---|---|"]
    for name, cell in res["plain"].items():
        lines.append(f"| {name} | {_pct(cell.get('ca'))} | {_pct(cell.get('asr_word'))} | {_pct(cell.get('asr_sentence'))} "
                     f"| {cell.get('ms_per_input', float('nan')):.0f} |")
    lines += ["", "## Smoothed (certified) classifiers", "",
              "| model | certifier | CA | ASR word | ASR sentence | ACR edits (share) | ACR if trigger outside area | "
              "certified | trigger in area (word / sentence) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, cells in res["certified"].items():
        for cert, c in cells.items():
            cov = (f"{100 * c['trigger_covered_word']:.0f}% / {100 * c['trigger_covered_sentence']:.0f}% "
                   f"(touched {100 * c['trigger_touched_word']:.0f}% / {100 * c['trigger_touched_sentence']:.0f}%)"
                   if "trigger_covered_word" in c and "trigger_covered_sentence" in c else "–")
            acr = f"{c['acr_edits']:.2f} ({100 * c['acr_share']:.1f}%)" if "acr_edits" in c else "–"
            acru = (f"{c['acr_edits_unconditional']:.2f} ({100 * c['acr_share_unconditional']:.1f}%)"
                    if "acr_edits" in c else "–")
            lines.append(f"| {name} | {cert} | {_pct(c.get('ca'))} | {_pct(c.get('asr_word'))} | "
                         f"{_pct(c.get('asr_sentence'))} | {acr} | {acru} | {100 * c.get('certified_share', 0):.1f}% | {cov} |")
    lines += ["", "## Time per input (ms, median [IQR], n; 1 thread, load average of the machine alongside)", "",
              "| model | certifier | total | span search | K passes (share of a batch) | load average |", "|---|---|---|---|---|---|"]

    def fmt(s):
        return "–" if not s["n"] else f"{s['median']:.0f} [{s['iqr'][0]:.0f}, {s['iqr'][1]:.0f}] n={s['n']}"
    for name, cells in res["certified"].items():
        for cert, c in cells.items():
            t = c["time_ms"]
            la = c["load_average"]
            lines.append(f"| {name} | {cert} | {fmt(t['total'])} | {fmt(t['span_search'])} | {fmt(t['k_passes'])} | "
                         f"{la['median']:.1f} |")
    lines += ["", f"Only the chunks run at a load average below {QUIET_LOAD}:", "",
              "| model | certifier | total | span search | K passes |", "|---|---|---|---|---|"]
    for name, cells in res["certified"].items():
        for cert, c in cells.items():
            t = c["time_ms_quiet"]
            lines.append(f"| {name} | {cert} | {fmt(t['total'])} | {fmt(t['span_search'])} | {fmt(t['k_passes'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="evaluation sentences (first n of the 500)")
    ap.add_argument("--method", default="lora", choices=["head", "lora"])
    ap.add_argument("--models", default="clean,backdoor")
    ap.add_argument("--certifiers", default=",".join(CERTIFIERS))
    ap.add_argument("--parts", default="train,plain,certify,report")
    ap.add_argument("--chunk", type=int, default=25, help="clean sentences per certification chunk")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cert-n", type=int, default=None,
                    help="report: certified cells on the first N sentences only (a stopped run: the n every cell reached)")
    args = ap.parse_args(argv)
    import torch

    global JOURNAL
    JOURNAL = RESULTS / JOURNAL_PATTERN.format(method=args.method)

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    parts = args.parts.split(",")

    def log(m):
        print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)
    trained = train(args.method, log) if "train" in parts else None
    if "plain" in parts:
        plain(args.n, args.method, log)
    if "certify" in parts:
        certify_part(args.n, args.method, args.models.split(","), args.certifiers.split(","), args.chunk, log)
    if "report" in parts:
        if trained is None:
            trained = {name: json.loads((model_dir(name, args.method) / HEAD_META).read_text())
                       for name in ("clean", "backdoor") if (model_dir(name, args.method) / HEAD_META).is_file()}
        res = report(args.n, args.method, trained, args.cert_n)
        from edgerun.atomic import atomic_file

        with atomic_file(RESULTS / "frs_table.json", force=True) as tmp:
            tmp.write_text(json.dumps(res, indent=2), encoding="utf-8")
        with atomic_file(RESULTS / "frs_table.md", force=True) as tmp:
            tmp.write_text(markdown(res), encoding="utf-8")
        log(f"wrote {RESULTS / 'frs_table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
