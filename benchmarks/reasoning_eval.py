"""The reasoning testbed's models on held-out problems: accuracy, tokens per reply, replies at the cap.

Each checkpoint of ``benchmarks/reasoning_train.py`` (System-1, System-2) is exported to GGUF
(``--quant``, default Q8_0, as ``benchmarks/trimr_table.py`` runs it) and answers the first ``--n``
(default 300) problems of ``edgerun.reasoning.problems("test")`` greedily through ``edgerun.load``
(llama.cpp, ``--threads``, cap ``--max-new`` tokens, above System-2's longest reference reply). Per model:
exact-match accuracy with a Wilson interval and per kind, mean generated tokens with a bootstrap
interval, the share of replies at the cap, the share that think (``<think>`` and ``</think>``), and the
training record. With both models, the paired accuracy difference and the token ratio System-2 / System-1.

Writes ``benchmarks/results/reasoning_eval.json`` and ``.md``.

    python benchmarks/reasoning_eval.py [--models system1,system2] [--n 300] [--max-new 640]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import edgerun  # noqa: E402
from edgerun import catalog, reasoning  # noqa: E402
from edgerun.atomic import atomic_file  # noqa: E402
from profilers.accuracy import bootstrap_mean, paired_difference, paired_ratio, wilson_interval  # noqa: E402
from trimr_table import export_gguf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate(gguf: Path, probs: list, cap: int, threads: int) -> list[dict]:
    """Greedy replies of one model: [{"id", "kind", "reply", "tokens", "correct", "capped"}] per problem."""
    session = edgerun.load(str(gguf), temperature=0.0, max_tokens=cap, threads=threads, seed=0, progress=False)
    out = []
    try:
        for p in probs:
            session.clear()
            reply = "".join(session.chat(p.question))
            st = session.last_turn.stats
            out.append({"id": p.id, "kind": p.kind, "reply": reply, "tokens": st.generated_tokens,
                        "correct": reasoning.is_correct(reply, p), "capped": st.finish_reason == "length"})
    finally:
        session.close()
    return out


def from_replies(ckpt: Path, replies: list[str], probs: list, cap: int) -> list[dict]:
    """Items of replies generated elsewhere (same order as ``probs``): tokens counted with the model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    if len(replies) < len(probs):
        raise SystemExit(f"{len(replies)} replies for {len(probs)} problems")
    out = []
    for p, reply in zip(probs, replies):
        n = len(tok(reply, add_special_tokens=False).input_ids)
        capped = n >= cap or (reasoning.THINK_OPEN in reply and reasoning.THINK_CLOSE not in reply)
        out.append({"id": p.id, "kind": p.kind, "reply": reply, "tokens": n + (0 if capped else 1),
                    "correct": reasoning.is_correct(reply, p), "capped": capped})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="system1,system2")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--max-new", type=int, default=640)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--system2-replies", type=Path, default=None,
                    help="take System-2's replies from this benchmarks/trimr_table.py replies file (its untrimmed "
                         "testbed row: the same model, engine and settings) instead of generating them again")
    args = ap.parse_args(argv)
    probs = reasoning.problems("test", args.n)
    path = RESULTS / "reasoning_eval.json"
    payload = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(catalog.home() / "cache" / "reasoning" / "smollm2-135m-system2")
    payload["settings"] = {"n": args.n, "max_new_tokens": args.max_new, "threads": args.threads, "quant": args.quant,
                           "engine": "llama.cpp, greedy, chat template",
                           "longest_reference_system2_reply_tokens": max(
                               len(tok(reasoning.system2_reply(p), add_special_tokens=False).input_ids) for p in probs)}
    names = args.models.split(",")
    if args.system2_replies is not None and "system2" not in names:
        names.append("system2")
    for name in names:
        ckpt = catalog.home() / "cache" / "reasoning" / f"smollm2-135m-{name}"
        train = json.loads((ckpt / "edgerun_train.json").read_text())
        if name == "system2" and args.system2_replies is not None:
            items = from_replies(ckpt, json.loads(args.system2_replies.read_text())["testbed"]["untrimmed"], probs,
                                 args.max_new)
            payload["settings"]["system2_from"] = f"{args.system2_replies.name} (untrimmed testbed row); tokens " \
                                                  "re-counted from the reply text plus the end-of-turn token"
        else:
            items = evaluate(export_gguf(ckpt, args.quant), probs, args.max_new, args.threads)
        hits = sum(x["correct"] for x in items)
        payload["models"][name] = {
            "accuracy": hits / len(items), "accuracy_ci95": list(wilson_interval(hits, len(items))),
            "per_kind": {k: sum(x["correct"] for x in items if x["kind"] == k) / sum(1 for x in items if x["kind"] == k)
                         for k in reasoning.KINDS},
            "tokens": bootstrap_mean([x["tokens"] for x in items]),
            "capped": sum(x["capped"] for x in items) / len(items),
            "thinks": sum(reasoning.THINK_OPEN in x["reply"] and reasoning.THINK_CLOSE in x["reply"] for x in items) / len(items),
            "train": {k: train[k] for k in ("steps", "examples", "tokens", "seconds", "lr", "batch", "loss_first", "loss_last")},
            "items": [{k: x[k] for k in ("id", "correct", "tokens", "capped")} for x in items]}
        print(f"{name}: accuracy {hits}/{len(items)}", file=sys.stderr, flush=True)
    m = payload["models"]
    if "system1" in m and "system2" in m:
        a, b = m["system2"]["items"], m["system1"]["items"]
        payload["system2_minus_system1"] = paired_difference([float(x["correct"]) for x in a], [float(x["correct"]) for x in b])
        payload["tokens_system2_over_system1"] = paired_ratio([x["tokens"] for x in a], [x["tokens"] for x in b])
    payload["load_average"] = os.getloadavg()
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# The reasoning testbed's models on {args.n} held-out problems",
             "", f"llama.cpp {args.quant}, greedy, {args.threads} thread, cap {args.max_new} tokens (System-2's longest "
             f"reference reply on these problems: {payload['settings']['longest_reference_system2_reply_tokens']} "
             f"tokens). " + (f"System-2's replies: {payload['settings']['system2_from']}. "
                             if "system2_from" in payload["settings"] else "") + f"Load average {tuple(round(x, 2) for x in payload['load_average'])}.", "",
             "| model | training | accuracy [95% CI] | " + " | ".join(reasoning.KINDS) + " | tokens/reply [95% CI] "
             "| at cap | thinks |", "|" + "---|" * (7 + len(reasoning.KINDS) - 2)]
    for name, r in m.items():
        t = r["train"]
        lines.append(f"| {name} | {t['steps']} steps x {t['batch']}, {t['seconds'] / 60:.0f} min, loss "
                     f"{t['loss_first']:.3f} -> {t['loss_last']:.3f} | {r['accuracy']:.3f} [{r['accuracy_ci95'][0]:.3f}, "
                     f"{r['accuracy_ci95'][1]:.3f}] | " + " | ".join(f"{r['per_kind'][k]:.3f}" for k in reasoning.KINDS)
                     + f" | {r['tokens']['mean']:.1f} [{r['tokens']['ci95'][0]:.1f}, {r['tokens']['ci95'][1]:.1f}] | "
                     f"{r['capped']:.1%} | {r['thinks']:.1%} |")
    if "system2_minus_system1" in payload:
        d, q = payload["system2_minus_system1"], payload["tokens_system2_over_system1"]
        lines += ["", f"System-2 minus System-1 accuracy (paired bootstrap): {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, "
                  f"{d['ci95'][1]:+.3f}]; tokens System-2 / System-1: {q['ratio']:.2f}x [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]."]
    with atomic_file(RESULTS / "reasoning_eval.md", force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
