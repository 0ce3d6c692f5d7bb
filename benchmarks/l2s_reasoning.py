"""Long-to-Short merging on the reasoning testbed: accuracy and reply length of the quick (System-1) and
the long-thinking (System-2) fine-tunes and of their merges.

Wu et al., "Unlocking Efficient Long-to-Short LLM Reasoning with Model Merging", 2025: merge a quick
model (BASE) with a long-reasoning fine-tune of it (MODEL) so the merge thinks shorter at kept
accuracy. Headline at 7B: replies 48.7% (task arithmetic), 53.0% (TIES), 55.3% (AIM-TIES) shorter with
accuracy kept; small models merge poorly.

Models (``benchmarks/reasoning_train.py``, problems of :mod:`edgerun.reasoning`):

- ``system1``: SmolLM2-135M-Instruct (edgerun's f32 export source) fully fine-tuned to answer only
  (``The answer is N.``);
- ``system2``: the same source fully fine-tuned to think at length (``<think>`` step-by-step solution
  and 2-5 reflections ``</think>``, then the answer);
- merges made by ``edgerun merge SYSTEM1 SYSTEM2 --method ...`` in a fresh process each (its wall time
  and peak RSS are that process's, from its ``edgerun_merge.json``), cached under
  ``$EDGERUN_HOME/cache/reasoning/merges/`` and redone when a parent's weights are newer. BASE is
  System-1, as in the paper where the long model is a fine-tune of the quick one. Here both are
  fine-tunes of SmolLM2-135M-Instruct, so the task vector is System-2 minus System-1 (not a fine-tune's
  delta from its own base). Rows: task arithmetic at alpha 0.3, 0.5, 0.7, 0.9 (``ta-0.3`` ...), TIES
  (density 0.2, alpha 1.0), DARE (drop 0.3, alpha 0.7), AIM-TIES (omega 0.4, 100 x 256 wiki calibration
  tokens through System-1), SVD (rank 64, alpha 0.7): ``edgerun merge``'s defaults, the paper's values.

Measured per row, float32 torch on CPU, on the first ``--n`` problems of ``reasoning.problems("test")``
(disjoint from the training problems): greedy replies (chat template of the row's checkpoint, batches of
``--batch`` left-padded prompts, cap ``--max-new`` tokens; the problems are batched in order of their
reference System-2 reply length so a batch's replies end together, and every row sees the same
batches); accuracy (exact match of the final answer, ``reasoning.is_correct``) with a Wilson 95%
interval, accuracy per problem kind, mean generated tokens (up to and including the end-of-turn token)
with a 95% BCa bootstrap interval, the share of replies that hit the cap, the share that contain both
``<think>`` and ``</think>``; and paired over problems (95% BCa bootstrap, ``--resamples`` resamples,
seed 0): the accuracy difference to System-1 and to System-2, and the ratio of mean reply length to
System-2's.

Writes ``benchmarks/results/l2s_reasoning.json`` and ``.md``, and the replies with the per-problem
correctness and token counts in ``l2s_reasoning_replies.json`` (atomically). Resumable per row: rows
already in the json for the same problems, cap and checkpoint weights are kept unless ``--only`` names
them.

    python benchmarks/l2s_reasoning.py [--n 300] [--max-new 640] [--batch 32] [--threads 1] [--only system2,ties]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgerun import catalog, reasoning  # noqa: E402
from edgerun.errors import UsageError  # noqa: E402
from l2s_table import generate, make_merge, weights_mtime  # noqa: E402
from profilers.accuracy import bootstrap_mean, paired_difference, paired_ratio, wilson_interval  # noqa: E402
from reasoning_train import default_out  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MERGES = {  # row: (edgerun merge --method, extra CLI flags); table order
    "ta-0.3": ("task-arithmetic", ["--alpha", "0.3"]),
    "ta-0.5": ("task-arithmetic", ["--alpha", "0.5"]),
    "ta-0.7": ("task-arithmetic", ["--alpha", "0.7"]),
    "ta-0.9": ("task-arithmetic", ["--alpha", "0.9"]),
    "ties": ("ties", []),
    "dare": ("dare", []),
    "aim-ties": ("aim-ties", []),
    "svd": ("svd", []),
}
ROWS = ["system1", "system2", *MERGES]
#: Rows are measured in this order (the paper's methods first, the rest of the alpha sweep last), shown in ROWS'.
RUN_ORDER = ["system1", "system2", "ta-0.7", "ties", "aim-ties", "dare", "svd", "ta-0.5", "ta-0.3", "ta-0.9"]


def summarize(outputs: list[tuple[str, int, bool]], problems: list[reasoning.Problem], seed: int = 0,
              resamples: int = 2000) -> tuple[dict, dict]:
    """Summary row and per-problem vectors of one model's replies.

    Args:
        outputs: per problem (reply text, generated tokens incl. the end-of-turn token, hit the cap), as
            ``l2s_table.generate`` returns them.
        problems: the problems, same order.

    Returns:
        (row, per_problem): row = {n, correct, accuracy, ci95, per_kind {kind: {n, correct, accuracy}},
        mean_tokens {mean, ci95, n}, capped, think}; per_problem = {correct [0/1], tokens, capped [0/1]}.

    Raises:
        UsageError: outputs and problems of different lengths, or fewer than 2 problems.
    """
    if len(outputs) != len(problems) or len(problems) < 2:
        raise UsageError(f"need one reply per problem and 2+ problems, got {len(outputs)} and {len(problems)}")
    correct = [int(reasoning.is_correct(text, p)) for (text, _, _), p in zip(outputs, problems)]
    n, k = len(problems), sum(correct)
    per_kind: dict[str, dict] = {}
    for c, p in zip(correct, problems):
        d = per_kind.setdefault(p.kind, {"n": 0, "correct": 0})
        d["n"] += 1
        d["correct"] += c
    for d in per_kind.values():
        d["accuracy"] = round(d["correct"] / d["n"], 4)
    tokens = [t for _, t, _ in outputs]
    mean = bootstrap_mean(tokens, seed=seed, resamples=resamples)
    row = {"n": n, "correct": k, "accuracy": round(k / n, 4), "ci95": [round(x, 4) for x in wilson_interval(k, n)],
           "per_kind": dict(sorted(per_kind.items())),
           "mean_tokens": {"mean": round(mean["mean"], 2), "ci95": [round(x, 2) for x in mean["ci95"]], "n": n},
           "capped": round(sum(c for _, _, c in outputs) / n, 4),
           "think": round(sum(reasoning.THINK_OPEN in t and reasoning.THINK_CLOSE in t for t, _, _ in outputs) / n, 4)}
    per_problem = {"correct": correct, "tokens": tokens, "capped": [int(c) for _, _, c in outputs]}
    return row, per_problem


def compare(per: dict, ref: dict, seed: int = 0, resamples: int = 2000) -> dict:
    """A row against a reference row on the same problems (paired bootstrap over problems).

    Returns:
        {"accuracy_diff": {mean, ci95, n} (row minus reference), "length_ratio": {ratio, ci95, n}
        (row's mean tokens over the reference's)}.

    Raises:
        UsageError: different numbers of problems (or fewer than 2).
    """
    diff = paired_difference(per["correct"], ref["correct"], seed=seed, resamples=resamples)
    ratio = paired_ratio(per["tokens"], ref["tokens"], seed=seed, resamples=resamples)
    return {"accuracy_diff": {"mean": round(diff["mean"], 4), "ci95": [round(x, 4) for x in diff["ci95"]],
                              "n": diff["n"]},
            "length_ratio": {"ratio": round(ratio["ratio"], 4), "ci95": [round(x, 4) for x in ratio["ci95"]],
                             "n": ratio["n"]}}


def training_record(checkpoint: Path) -> dict | None:
    """Steps, tokens, minutes and first/last loss (and settings) of a parent from its ``edgerun_train.json``."""
    path = checkpoint / "edgerun_train.json"
    if not path.is_file():
        return None
    t = json.loads(path.read_text())
    rec = {k: t[k] for k in ("style", "steps", "batch", "lr", "examples", "epochs", "tokens", "loss_first",
                             "loss_last", "seed", "finetune") if k in t}
    if "seconds" in t:
        rec["minutes"] = round(t["seconds"] / 60, 1)
    return rec


def reference_lengths(tokenizer, problems: list[reasoning.Problem], seed: int) -> list[int]:
    """Tokens of System-2's reference reply (``reasoning.system2_reply``, training seed) per problem."""
    return [len(tokenizer(reasoning.system2_reply(p, seed), add_special_tokens=False).input_ids) for p in problems]


def evaluate(path: Path, problems: list[reasoning.Problem], order: list[int], args, log) -> list[tuple[str, int, bool]]:
    """Greedy replies of the checkpoint at ``path`` to ``problems``, generated in batches along ``order``."""
    from edgerun.backends.torch import TorchBackend

    backend = TorchBackend(path, threads=args.threads)
    try:
        out: list = [None] * len(problems)
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            t0 = time.perf_counter()
            res = generate(backend.model, backend.tokenizer, [problems[j].question for j in idx], args.max_new,
                           args.batch)
            for j, r in zip(idx, res):
                out[j] = r
            log(f"  batch {i // args.batch + 1}/{-(-len(order) // args.batch)}: {time.perf_counter() - t0:.1f} s, "
                f"longest reply {max(r[1] for r in res)} tokens")
        return out
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="held-out problems (the first n of the test split)")
    ap.add_argument("--max-new", type=int, default=640, help="reply cap (tokens)")
    ap.add_argument("--batch", type=int, default=32, help="prompts per generation batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (seed 0)")
    ap.add_argument("--system1", type=Path, default=None, help="System-1 checkpoint (default: the reasoning cache)")
    ap.add_argument("--system2", type=Path, default=None, help="System-2 checkpoint (default: the reasoning cache)")
    ap.add_argument("--merges", type=Path, default=None,
                    help="merge cache (default $EDGERUN_HOME/cache/reasoning/merges)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    ap.add_argument("--only", default=None, help=f"comma-separated rows to (re)run, of {', '.join(ROWS)}")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    only = args.only.split(",") if args.only else None
    if only and set(only) - set(ROWS):
        log(f"unknown row(s) {', '.join(sorted(set(only) - set(ROWS)))}; expected some of {', '.join(ROWS)}")
        return 2
    if args.n < 2 or args.max_new < 1 or args.batch < 1 or args.threads < 1 or args.resamples < 1:
        log("--n must be >= 2 and --max-new, --batch, --threads, --resamples >= 1")
        return 2
    parents = {"system1": args.system1 or default_out("system1"), "system2": args.system2 or default_out("system2")}
    for name, path in parents.items():
        if not list(path.glob("*.safetensors")):
            log(f"no {name} checkpoint at {path}: run benchmarks/reasoning_train.py --style {name} first")
            return 2
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    merges_root = args.merges or catalog.home() / "cache" / "reasoning" / "merges"
    problems = reasoning.problems("test", args.n)
    train = {name: training_record(path) for name, path in parents.items()}
    seed2 = (train["system2"] or {}).get("seed", 0)
    ref = reference_lengths(AutoTokenizer.from_pretrained(parents["system2"]), problems, seed2)
    order = sorted(range(len(problems)), key=lambda i: -ref[i])   # longest first: a slow row shows early
    files = {"json": args.results / "l2s_reasoning.json", "md": args.results / "l2s_reasoning.md",
             "replies": args.results / "l2s_reasoning_replies.json"}
    results = json.loads(files["json"].read_text())["rows"] if files["json"].is_file() else {}
    replies = json.loads(files["replies"].read_text())["rows"] if files["replies"].is_file() else {}
    ids = [p.id for p in problems]
    settings = {"n": args.n, "max_new_tokens": args.max_new, "batch": args.batch, "threads": args.threads,
                "resamples": args.resamples, "bootstrap_seed": 0, "problem_ids_sha": _ids_digest(ids),
                "decoding": "greedy, each checkpoint's chat template, float32 torch (transformers generate), "
                            "left-padded batches in order of the reference System-2 reply length",
                "reference_system2_tokens": {"max": max(ref), "mean": round(sum(ref) / len(ref), 1),
                                             "seed": seed2,
                                             "note": "reply tokens of reasoning.system2_reply without the end-of-turn "
                                                     "token; the cap is above the longest"},
                "parents": {k: str(v) for k, v in parents.items()}, "training": train,
                "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    log(f"{args.n} test problems; System-2's longest reference reply {max(ref)} tokens (mean {settings['reference_system2_tokens']['mean']}); "
        f"cap {args.max_new}")
    for name in [r for r in RUN_ORDER if only is None or r in only]:
        merge_rec = None
        if name in parents:
            path = parents[name]
        else:
            merge_rec = make_merge(name, parents["system1"], parents["system2"], merges_root, log, spec=MERGES[name])
            path = merges_root / name
        stamp = weights_mtime(path)
        old = results.get(name)
        if (only is None and old and name in replies and old.get("problem_ids_sha") == settings["problem_ids_sha"]
                and old.get("max_new_tokens") == args.max_new and old.get("weights_mtime") == stamp):
            log(f"{name}: kept from {files['json']}")
            continue
        log(f"evaluating {name} ({path})")
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        outputs = evaluate(path, problems, order, args, log)
        seconds = time.perf_counter() - t0
        row, per = summarize(outputs, problems, resamples=args.resamples)
        row.update({"checkpoint": str(path), "weights_mtime": stamp, "problem_ids_sha": settings["problem_ids_sha"],
                    "max_new_tokens": args.max_new, "generate_seconds": round(seconds, 1),
                    "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]})
        if merge_rec:
            row["merge"] = merge_rec["merge"]
            row["merge_seconds"] = merge_rec["seconds"]
            row["merge_peak_rss_mib"] = round(merge_rec["peak_rss_bytes"] / 2**20, 1)
        results[name] = row
        replies[name] = {**per, "replies": [o[0] for o in outputs]}
        log(f"{name}: accuracy {row['accuracy']:.3f} {row['ci95']}, {row['mean_tokens']['mean']:.1f} tokens, "
            f"capped {row['capped']:.1%}, think {row['think']:.1%}, {seconds:.0f} s")
        write(results, replies, ids, settings, files)
    write(results, replies, ids, settings, files)
    return 0


def _ids_digest(ids: list[str]) -> str:
    import hashlib

    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def add_comparisons(results: dict, replies: dict, resamples: int) -> None:
    """Each row's paired accuracy differences to System-1 and System-2 and its length ratio to System-2 (in place)."""
    for name, row in results.items():
        for ref in ("system1", "system2"):
            row.pop(f"vs_{ref}", None)
            if ref == name or ref not in results or results[ref]["problem_ids_sha"] != row["problem_ids_sha"]:
                continue
            c = compare(replies[name], replies[ref], resamples=resamples)
            row[f"vs_{ref}"] = c if ref == "system2" else {"accuracy_diff": c["accuracy_diff"]}


def write(results: dict, replies: dict, ids: list[str], settings: dict, files: dict) -> None:
    from edgerun.atomic import atomic_file

    add_comparisons(results, replies, settings["resamples"])
    rows = {name: results[name] for name in ROWS if name in results}
    settings = {**settings, "load_avg_end": [round(x, 2) for x in os.getloadavg()]}
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(files["json"], force=True) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    with atomic_file(files["replies"], force=True) as tmp:
        tmp.write_text(json.dumps({"problem_ids": ids, "rows": {k: replies[k] for k in rows}}) + "\n")
    with atomic_file(files["md"], force=True) as tmp:
        tmp.write_text(render(rows, settings))


def _ci(lo_hi: list[float], fmt: str) -> str:
    return f"[{format(lo_hi[0], fmt)}, {format(lo_hi[1], fmt)}]"


def render(rows: dict, settings: dict) -> str:
    """The markdown table of ``l2s_reasoning.md``."""
    ref = settings["reference_system2_tokens"]
    lines = [f"Long-to-Short merging on the reasoning testbed: System-1 (BASE) and System-2 fine-tunes of "
             f"SmolLM2-135M-Instruct and their merges (task vector = System-2 - System-1). First {settings['n']} "
             f"held-out problems of `edgerun.reasoning` (test split), greedy, cap {settings['max_new_tokens']} tokens "
             f"(System-2's longest reference reply: {ref['max']} tokens, mean {ref['mean']}"
             f"{'' if settings['max_new_tokens'] > ref['max'] else '; the cap cuts replies'}); float32 torch, "
             f"{settings['threads']} thread(s), batch {settings['batch']}; load average "
             f"{settings['load_avg_start'][0]} at the start, {settings['load_avg_end'][0]} at the end.", "",
             "Intervals: accuracy Wilson 95%; tokens 95% BCa bootstrap; differences and ratios paired over problems, "
             f"95% BCa bootstrap, {settings['resamples']} resamples, seed 0. Tokens include the end-of-turn token. "
             "think: share of replies with both `<think>` and `</think>`.", "",
             "| model | accuracy [95%] | acc - System-1 [95%] | acc - System-2 [95%] | tokens [95%] "
             "| tokens / System-2 [95%] | capped | think | merge s | merge peak RSS MiB | generate s |",
             "|" + "---|" * 11]
    for name, r in rows.items():
        v1, v2 = r.get("vs_system1"), r.get("vs_system2")
        d1 = v1["accuracy_diff"] if v1 else None
        d2 = v2["accuracy_diff"] if v2 else None
        lr = v2["length_ratio"] if v2 else None
        cells = [name, f"{r['accuracy']:.3f} {_ci(r['ci95'], '.3f')}",
                 f"{d1['mean']:+.3f} {_ci(d1['ci95'], '+.3f')}" if d1 else "",
                 f"{d2['mean']:+.3f} {_ci(d2['ci95'], '+.3f')}" if d2 else "",
                 f"{r['mean_tokens']['mean']:.1f} {_ci(r['mean_tokens']['ci95'], '.1f')}",
                 f"{lr['ratio']:.3f} {_ci(lr['ci95'], '.3f')}" if lr else "",
                 f"{r['capped']:.1%}", f"{r['think']:.1%}",
                 f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "",
                 f"{r['merge_peak_rss_mib']:.0f}" if "merge_peak_rss_mib" in r else "",
                 f"{r['generate_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    kinds = sorted({k for r in rows.values() for k in r["per_kind"]})
    lines += ["", "Accuracy per problem kind (problems per kind in the header):", "",
              "| model | " + " | ".join(f"{k} ({next(r['per_kind'][k]['n'] for r in rows.values() if k in r['per_kind'])})"
                                        for k in kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_kind'][k]['accuracy']:.3f}" if k in r["per_kind"] else ""
                                                 for k in kinds) + " |")
    lines += ["", "Parents' training (`edgerun_train.json`):", ""]
    for name, t in settings["training"].items():
        if t is None:
            lines.append(f"- {name}: no training record")
        else:
            lines.append(f"- {name}: {t.get('steps')} steps of batch {t.get('batch')} ({t.get('epochs')} epoch, "
                         f"{t.get('tokens')} tokens) in {t.get('minutes')} min, loss {t.get('loss_first')} -> "
                         f"{t.get('loss_last')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
