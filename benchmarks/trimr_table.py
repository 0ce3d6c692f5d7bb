"""TrimR on the reasoning testbed: tokens, wall time and accuracy of untrimmed thinking, TrimR (rule and LLM
verifiers) and a fixed thinking budget at the same mean length.

Model: the System-2 fine-tune of ``benchmarks/reasoning_train.py`` exported to GGUF (``--quant``, default
Q8_0), run by llama.cpp through the session (``edgerun.load``), greedy, one thread for the reasoning
model; the LLM verifier (SmolLM2-135M-Instruct, the default model, in a second llama.cpp context) gets
the second core. Rows, per problem in rotating order (interleaved: each problem's rows run back to back,
so wall-time ratios are paired):

- ``untrimmed``: the reply as the model writes it (cap ``--max-new`` tokens);
- ``trimr-rule``: ``--trim-thinking`` with the rule verifier (reads ``answer is N``), M = 2;
- ``trimr-llm``: ``--trim-thinking --verifier llm``, M = 2 (asynchronous: late verdicts apply at the
  next thought boundary);
- ``budget``: budget forcing (Muennighoff et al., "s1", 2025): thinking cut at B tokens, then
  ``</think>`` and the answer prompt injected, as TrimR injects them (run on the engine directly, not
  through the session's TrimR path). B is chosen per set on ``--pilot`` problems that are not scored
  (the next ones after the scored set) so that mean(min(untrimmed thinking tokens, B)) equals the
  measured TrimR-rule row's mean thinking tokens there; each row's realised thinking tokens are reported.

Sets: ``--n`` held-out problems of :mod:`edgerun.reasoning` (default 300) and the first ``--gsm8k``
GSM8K test problems (default 100; the last number after ``</think>`` is the answer). Per row: accuracy
with a Wilson interval, mean generated tokens with a bootstrap interval, tokens and wall-time ratios vs
untrimmed (paired bootstrap; wall time also as median and quartiles of per-problem ratios), accuracy
difference vs untrimmed (paired bootstrap), verifier calls / ms / share of wall time, where the
thinking was closed, and how often a trim turned a right untrimmed answer wrong (a thought that would
have corrected the answer was cut).

Writes ``benchmarks/results/trimr_table.json`` and ``.md`` (and the replies in ``trimr_replies.json``).

    python benchmarks/trimr_table.py [--n 300] [--gsm8k 100] [--pilot 30] [--max-new 640]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgerun  # noqa: E402
from edgerun import catalog, data, reasoning, trimr  # noqa: E402
from edgerun.atomic import atomic_file  # noqa: E402
from profilers.accuracy import bootstrap_mean, paired_difference, paired_ratio, wilson_interval  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TAG = "trimr_table"
ROWS = ("untrimmed", "trimr-rule", "trimr-llm", "trimr-llm-sync", "budget")
ANSWER_PROMPT = "The answer is"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_gguf(checkpoint: Path, quant: str) -> Path:
    """The System-2 checkpoint as a GGUF (cached beside it; redone when the checkpoint is newer)."""
    out = checkpoint.with_name(f"{checkpoint.name}.{quant}.gguf")
    src = checkpoint / "model.safetensors"
    if not out.is_file() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run([sys.executable, "-m", "edgerun.cli", "export", str(checkpoint), "--quant", quant, "-o",
                        str(out), "--force", "--no-verify"], check=True)
    return out


def thinking_tokens(session, reply: str) -> int:
    """Tokens of a reply's thinking section (up to and including ``</think>``; all of it when unclosed)."""
    head = reply.split(reasoning.THINK_CLOSE)[0] + (reasoning.THINK_CLOSE if reasoning.THINK_CLOSE in reply else "")
    return len(session.backend.tokenize(head))


def calibrate_budget(session, configs: dict, pilot: list, cap: int) -> tuple[int, dict]:
    """Budget forcing's B from a pilot set (problems not scored): the untrimmed and the TrimR-rule rows are
    run on it, and B is the smallest thinking budget with mean(min(untrimmed thinking tokens, B)) >= the
    TrimR-rule row's mean thinking tokens there."""
    lengths, trimmed = [], []
    for q, _, _ in pilot:
        lengths.append(run_row(session, "untrimmed", q, configs, None, cap)["thinking_tokens"])
        trimmed.append(run_row(session, "trimr-rule", q, configs, None, cap)["thinking_tokens"])
    target = statistics.mean(trimmed)
    budget = max(lengths)
    for b in range(1, max(lengths) + 1):
        if statistics.mean(min(x, b) for x in lengths) >= target:
            budget = b
            break
    return budget, {"B": budget, "pilot_n": len(pilot), "pilot_untrimmed_thinking": statistics.mean(lengths),
                    "pilot_trimr_rule_thinking": target}


def thoughts_of(reply: str) -> list[str]:
    """The thoughts of a reply's thinking section, split as TrimR splits them (nothing closed)."""
    cfg = trimr.TrimConfig(verifier=trimr.RuleVerifier(), confirmations=10**6, budget_share=1.0,
                           max_thoughts=10**6, loop_repeats=10**6)

    class Silent:
        name = "none"

        def judge(self, *a):
            return trimr.Verdict(-1, False, None)

    worker = trimr.VerifierWorker(Silent(), "")
    mon = trimr.ThinkingMonitor(cfg, worker, budget_tokens=10**9)
    try:
        for ch in reply:
            mon.feed(ch)
        mon.flush()
    finally:
        worker.close()
    return mon.thoughts


def verifier_agreement(llm, questions: list[str], replies: list[str]) -> dict:
    """The LLM verifier against the rule verifier on the same untrimmed thoughts (synchronously): how often
    they agree on "reaches an answer" and on "same answer as the previous thought" (the rule verifier is
    exact on the testbed's replies, which state ``answer is N``)."""
    rule = trimr.RuleVerifier()
    agree_a = agree_s = n_a = n_s = 0
    confusion = {"answer": {"tp": 0, "fp": 0, "fn": 0, "tn": 0}, "same": {"tp": 0, "fp": 0, "fn": 0, "tn": 0}}
    ms = []
    for q, reply in zip(questions, replies):
        prev_r = None
        prev_text = ""
        for t in thoughts_of(reply):
            r = rule.judge(q, t, prev_r, prev_text)
            lv = llm.judge(q, t, prev_r, prev_text)        # asked "same" whenever the true previous answered
            ms.append(lv.ms)
            n_a += 1
            agree_a += r.reaches_answer == lv.reaches_answer
            key = ("t" if lv.reaches_answer == r.reaches_answer else "f") + ("p" if lv.reaches_answer else "n")
            confusion["answer"][key] += 1
            if r.same_as_previous is not None and lv.same_as_previous is not None:
                n_s += 1
                agree_s += r.same_as_previous == lv.same_as_previous
                key = ("t" if lv.same_as_previous == r.same_as_previous else "f") + ("p" if lv.same_as_previous else "n")
                confusion["same"][key] += 1
            prev_r, prev_text = r, t
    return {"thoughts": n_a, "answer_agreement": agree_a / n_a if n_a else None,
            "same_pairs": n_s, "same_agreement": agree_s / n_s if n_s else None,
            "confusion_vs_rule": confusion, "ms_per_judgement": statistics.mean(ms) if ms else None}


def budget_forced(session, question: str, budget: int, cap: int) -> tuple[str, int]:
    """Budget forcing: think at most ``budget`` tokens, then ``</think>`` + the answer prompt; (reply, tokens)."""
    s = session
    s.clear()
    tokens = s._encode([{"role": "user", "content": question}])
    sampling = dataclasses.replace(s.sampling, max_tokens=budget)
    first = "".join(s.backend.stream(tokens, sampling))
    generated = s.backend.last_stats.generated_tokens
    if reasoning.THINK_CLOSE in first or reasoning.THINK_OPEN not in first:
        rest_budget = cap - generated
        if s.backend.last_stats.finish_reason == "length" and rest_budget > 0:
            tail = "".join(s.backend.stream(tokens + s.backend.tokenize_markup(first),
                                            dataclasses.replace(s.sampling, max_tokens=rest_budget)))
            generated += s.backend.last_stats.generated_tokens
            return first + tail, generated
        return first, generated
    inject = f"\n{reasoning.THINK_CLOSE}\n{ANSWER_PROMPT}"
    kept = first + inject
    tail = "".join(s.backend.stream(tokens + s.backend.tokenize_markup(kept),
                                    dataclasses.replace(s.sampling, max_tokens=max(1, cap - generated))))
    return kept + tail, generated + s.backend.last_stats.generated_tokens


def run_row(session, row: str, question: str, configs: dict, budget: int | None, cap: int) -> dict:
    t0 = time.perf_counter()
    if row == "budget":
        reply, tokens = budget_forced(session, question, budget, cap)
        thinking = {}
    else:
        session.trim = configs.get(row)
        session.clear()
        reply = "".join(session.chat(question))
        tokens = session.last_turn.stats.generated_tokens
        thinking = session.last_turn.thinking
    wall = time.perf_counter() - t0
    return {"reply": reply, "tokens": tokens, "wall_s": round(wall, 4), "thinking": thinking,
            "thinking_tokens": thinking_tokens(session, reply)}


def correct_gsm8k(reply: str, gold: str) -> bool:
    got = reasoning.final_answer(reply)
    try:
        return got is not None and abs(float(got) - float(gold.replace(",", ""))) < 1e-6
    except ValueError:
        return False


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per row: accuracy, tokens, wall time and verifier figures; comparisons against ``untrimmed`` are
    paired over the problems the row ran (the first n: a row may run on a prefix of the set)."""
    out = {}
    for row, items in results.items():
        base = results["untrimmed"][:len(items)]
        if not items:
            continue
        hits = [it["correct"] for it in items]
        n = len(items)
        lo, hi = wilson_interval(sum(hits), n)
        r = {"n": n, "accuracy": sum(hits) / n, "accuracy_ci95": [lo, hi],
             "tokens": bootstrap_mean([it["tokens"] for it in items]),
             "thinking_tokens": bootstrap_mean([it["thinking_tokens"] for it in items]),
             "wall_s_mean": statistics.mean(it["wall_s"] for it in items),
             "capped": sum(1 for it in items if reasoning.THINK_OPEN in it["reply"]
                           and reasoning.THINK_CLOSE not in it["reply"]) / n}
        if row != "untrimmed":
            r["tokens_vs_untrimmed"] = paired_ratio([it["tokens"] for it in items], [b["tokens"] for b in base])
            r["wall_vs_untrimmed"] = paired_ratio([it["wall_s"] for it in items], [b["wall_s"] for b in base])
            ratios = sorted(it["wall_s"] / b["wall_s"] for it, b in zip(items, base))
            q = statistics.quantiles(ratios, n=4)
            r["wall_ratio_per_problem"] = {"median": q[1], "q1": q[0], "q3": q[2], "n": len(ratios)}
            r["accuracy_minus_untrimmed"] = paired_difference([float(h) for h in hits],
                                                              [float(b["correct"]) for b in base])
            r["trim_broke_a_right_answer"] = sum(1 for it, b in zip(items, base) if b["correct"] and not it["correct"])
            r["trim_fixed_a_wrong_answer"] = sum(1 for it, b in zip(items, base) if not b["correct"] and it["correct"])
        th = [it["thinking"] for it in items if it["thinking"]]
        if th:
            closed: dict[str, int] = {}
            for t in th:
                closed[t["closed"]] = closed.get(t["closed"], 0) + 1
            calls = sum(t["verifier_calls"] for t in th)
            ms = sum(t["verifier_ms_total"] for t in th)
            wall = sum(it["wall_s"] for it in items)
            r["closed"] = closed
            # verifier busy time over the row's wall time (the verifier runs on its own core: busy, not
            # necessarily added, time)
            r["verifier"] = {"calls_per_reply": calls / len(th), "ms_per_call": ms / calls if calls else None,
                             "ms_share_of_wall": ms / 1e3 / wall if wall else None,
                             "pending_at_close_mean": statistics.mean(t["pending_at_close"] for t in th),
                             "errors": sum(len(t["verifier_errors"]) for t in th)}
        out[row] = r
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="held-out testbed problems")
    ap.add_argument("--gsm8k", type=int, default=100, help="first GSM8K test problems (0: none)")
    ap.add_argument("--pilot", type=int, default=30,
                    help="problems per set, after the scored ones, that set the budget-forcing B")
    ap.add_argument("--max-new", type=int, default=640, help="reply cap (tokens)")
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--threads", type=int, default=1, help="threads of the reasoning model")
    ap.add_argument("--model", type=Path, default=None, help="System-2 checkpoint (default: the reasoning cache)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--agreement", type=int, default=40,
                    help="untrimmed replies whose thoughts both verifiers judge, to compare them (0: none)")
    ap.add_argument("--llm-n", type=int, default=None,
                    help="run the trimr-llm row on the first N problems of each set only (default all)")
    ap.add_argument("--results", type=Path, default=None, help="directory of the result files")
    ap.add_argument("--sets", default="testbed,gsm8k", help="sets to run: testbed, gsm8k")
    ap.add_argument("--tag", default="trimr_table", help="stem of the result files")
    args = ap.parse_args(argv)
    global RESULTS, TAG
    RESULTS, TAG = args.results or RESULTS, args.tag
    wanted = args.sets.split(",")
    rows = [r for r in ROWS if r in args.rows.split(",")]
    ckpt = args.model or catalog.home() / "cache" / "reasoning" / "smollm2-135m-system2"
    if not (ckpt / "edgerun_train.json").is_file():
        log(f"no System-2 model at {ckpt}: run benchmarks/reasoning_train.py --style system2 first")
        return 2
    gguf = export_gguf(ckpt, args.quant)
    session = edgerun.load(str(gguf), temperature=0.0, max_tokens=args.max_new, threads=args.threads, seed=0,
                           progress=False)
    trimr.check_template(session.template.source, str(gguf))
    configs = {"untrimmed": None, "trimr-rule": trimr.TrimConfig(verifier=trimr.RuleVerifier())}
    llm = None
    if "trimr-llm" in rows:
        llm = trimr.open_llm_verifier(threads=1)
        configs["trimr-llm"] = trimr.TrimConfig(verifier=llm)
    if "trimr-llm-sync" in rows:      # the LLM verifier's verdicts applied before decoding goes on: its judgement
        llm = llm or trimr.open_llm_verifier(threads=1)          # without its latency
        configs["trimr-llm-sync"] = trimr.TrimConfig(verifier=llm, wait=True, wait_timeout=60.0)
    n_pilot = args.pilot
    tb = reasoning.problems("test", args.n + n_pilot)
    sets = {}
    if "testbed" in wanted:
        sets["testbed"] = ([(p.question, p.answer, p.kind) for p in tb[:args.n]],
                           [(p.question, p.answer, p.kind) for p in tb[args.n:]])
    if args.gsm8k and "gsm8k" in wanted:
        gsm = [(p["question"], p["answer"], "gsm8k") for p in data.gsm8k_problems()[:args.gsm8k + n_pilot]]
        sets["gsm8k"] = (gsm[:args.gsm8k], gsm[args.gsm8k:])
    train = json.loads((ckpt / "edgerun_train.json").read_text())
    payload = {"settings": {"model": str(ckpt), "gguf": gguf.name, "threads": args.threads, "verifier_threads": 1,
                            "max_new_tokens": args.max_new, "greedy": True, "confirmations": 2,
                            "train": {k: v for k, v in train.items()
                                      if k in ("steps", "tokens", "seconds", "loss_first", "loss_last", "examples")}},
               "sets": {}}
    replies = {}
    for name, (items, pilot) in sets.items():
        budget, pilot_record = (calibrate_budget(session, configs, pilot, args.max_new) if "budget" in rows
                                else (None, {"B": None, "pilot_n": 0}))
        log(f"{name} pilot: {pilot_record}")
        results: dict[str, list[dict]] = {r: [] for r in rows}
        t_set = time.perf_counter()
        for i, (q, gold, kind) in enumerate(items):
            order = rows[i % len(rows):] + rows[:i % len(rows)]
            for row in order:
                if row.startswith("trimr-llm") and args.llm_n is not None and i >= args.llm_n:
                    continue
                it = run_row(session, row, q, configs, budget, args.max_new)
                it["correct"] = (reasoning.final_answer(it["reply"]) == gold if name == "testbed"
                                 else correct_gsm8k(it["reply"], gold))
                it["kind"] = kind
                results[row].append(it)
            if (i + 1) % 25 == 0:
                acc = {r: sum(x["correct"] for x in results[r]) for r in rows}
                log(f"{name} {i + 1}/{len(items)} correct {acc}  {time.perf_counter() - t_set:.0f} s")
        payload["sets"][name] = summarize(results)
        payload["sets"][name]["budget_forcing"] = pilot_record
        payload["sets"][name]["per_kind"] = {
            r: {k: sum(x["correct"] for x in results[r] if x["kind"] == k) / max(1, sum(1 for x in results[r] if x["kind"] == k))
                for k in sorted({x["kind"] for x in results[r]})} for r in rows}
        replies[name] = {r: [x["reply"] for x in results[r]] for r in rows}
        if llm is not None and name == "testbed" and args.agreement:
            k = args.agreement
            payload["sets"][name]["llm_verifier_vs_rule"] = verifier_agreement(
                llm, [q for q, _, _ in items[:k]], [x["reply"] for x in results["untrimmed"][:k]])
        payload["load_average"] = os.getloadavg()
        write(payload, replies)
    session.close()
    if llm is not None:
        llm.close()
    return 0


def _ci(x: dict) -> str:
    return f"{x['mean']:.1f} [{x['ci95'][0]:.1f}, {x['ci95'][1]:.1f}]"


def _ratio(x: dict | None) -> str:
    return f"{x['ratio']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]" if x else ""


def write(payload: dict, replies: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_file(RESULTS / f"{TAG}.json", force=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
    with atomic_file(RESULTS / f"{TAG}.replies.json", force=True) as tmp:
        tmp.write_text(json.dumps(replies) + "\n")
    s = payload["settings"]
    lines = [f"# TrimR on the System-2 testbed model ({s['gguf']}, llama.cpp, greedy, {s['threads']} thread; "
             f"LLM verifier SmolLM2-135M-Instruct on 1 more thread)", "",
             f"Cap {s['max_new_tokens']} tokens; M = {s['confirmations']}. Rows interleaved per problem. Load average "
             f"{tuple(round(x, 2) for x in payload.get('load_average', ()))}.", ""]
    for name, rows in payload["sets"].items():
        bf = rows["budget_forcing"]
        lines += [f"## {name}", "", (f"Budget forcing at B = {bf['B']} thinking tokens, set on {bf['pilot_n']} unscored "
                  f"pilot problems (untrimmed thinking {bf['pilot_untrimmed_thinking']:.1f} tokens, TrimR-rule "
                  f"{bf['pilot_trimr_rule_thinking']:.1f}). " if bf["B"] is not None else "") + "Thinking tokens per row: "
                  + ", ".join(f"{r} {v['thinking_tokens']['mean']:.1f}" for r, v in rows.items()
                              if isinstance(v, dict) and "thinking_tokens" in v) + ".", "",
                  "| row | n | accuracy [95% CI] | vs untrimmed (paired) | tokens [95% CI] | tokens vs untrimmed "
                  "| wall vs untrimmed | per-problem wall ratio median (IQR) | closed | verifier calls/reply, ms/call, "
                  "busy share of wall | right->wrong / wrong->right |", "|" + "---|" * 11]
        for row, r in rows.items():
            if row in ("per_kind", "llm_verifier_vs_rule", "budget_forcing"):
                continue
            d = r.get("accuracy_minus_untrimmed")
            w = r.get("wall_ratio_per_problem")
            v = r.get("verifier")
            cells = [row, str(r["n"]), f"{r['accuracy']:.3f} [{r['accuracy_ci95'][0]:.3f}, {r['accuracy_ci95'][1]:.3f}]",
                     f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "",
                     _ci(r["tokens"]), _ratio(r.get("tokens_vs_untrimmed")), _ratio(r.get("wall_vs_untrimmed")),
                     f"{w['median']:.3f} ({w['q1']:.3f}-{w['q3']:.3f})" if w else "",
                     ", ".join(f"{k} {c}" for k, c in sorted(r.get("closed", {}).items())),
                     (f"{v['calls_per_reply']:.1f}, {v['ms_per_call']:.1f}, {v['ms_share_of_wall']:.1%}"
                      if v and v["ms_per_call"] is not None else ""),
                     f"{r['trim_broke_a_right_answer']} / {r['trim_fixed_a_wrong_answer']}"
                     if "trim_broke_a_right_answer" in r else ""]
            lines.append("| " + " | ".join(cells) + " |")
        pk = rows.get("per_kind", {})
        if pk and name == "testbed":
            kinds = sorted({k for acc in pk.values() for k in acc})
            lines += ["", "| row | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
            lines += ["| " + row + " | " + " | ".join(f"{acc[k]:.3f}" if k in acc else "" for k in kinds) + " |" for row, acc in pk.items()]
        ag = rows.get("llm_verifier_vs_rule")
        if ag:
            c = ag["confusion_vs_rule"]
            lines += ["", f"LLM verifier against the rule verifier on the thoughts of the first untrimmed replies "
                      f"({ag['thoughts']} thoughts, {ag['same_pairs']} same-answer pairs; the rule verifier is exact "
                      f"on this testbed): reaches-an-answer agreement {ag['answer_agreement']:.3f} "
                      f"(said yes on {c['answer']['tp'] + c['answer']['fp']}, of which {c['answer']['fp']} wrongly), "
                      + (f"same-answer agreement {ag['same_agreement']:.3f} (said same on "
                         f"{c['same']['tp'] + c['same']['fp']}, of which {c['same']['fp']} wrongly); "
                         if ag["same_agreement"] is not None else "")
                      + f"{ag['ms_per_judgement']:.0f} ms per judgement."]
        lines.append("")
    with atomic_file(RESULTS / f"{TAG}.md", force=True) as tmp:
        tmp.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
