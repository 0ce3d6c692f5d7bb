"""Fine-tune the System-1 and System-2 models of the reasoning testbed (TrimR, Long-to-Short merging).

Both start from SmolLM2-135M-Instruct as edgerun's export source (the catalog Q4_1 GGUF dequantized to
f32, as ``benchmarks/l2s_system2.py``) and learn the problems of :mod:`edgerun.reasoning` (train split):

- ``--style system1``: question -> ``The answer is N.``
- ``--style system2``: question -> ``<think>`` step-by-step solution, 2-5 reflections that re-derive or
  re-check it (a quarter correcting a planted slip) ``</think>`` then ``The answer is N.``; the
  checkpoint gets a chat template that knows the thinking markers
  (:data:`edgerun.reasoning.SYSTEM2_CHAT_TEMPLATE`).

A **full** fine-tune (float32 master weights, bfloat16 autocast), AdamW, loss on the reply tokens only,
linear warm-up then constant LR; batches are drawn from length buckets (less padding). Bounded by
``--minutes`` (default 30) and ``--steps``; deterministic for a seed and a step count (the data order is
a function of the seed and the step; nothing else is random), so ``--steps N --minutes 1000`` reproduces
a time-bounded run (its step count is in the record).

**Resumable**: every ``--save-every`` minutes the model, the optimizer state and the step are written
atomically to ``OUT.partial/``; a run started again with the same settings continues from there (the
state is read with ``torch.load(weights_only=True)``, tensors only; it is our own file). The finished
checkpoint (``config.json``, ``model.safetensors``, tokenizer files, ``edgerun_train.json`` with the
settings and the loss curve) is written atomically to ``--out`` (default
``$EDGERUN_HOME/cache/reasoning/smollm2-135m-<style>``) and exports to GGUF like any checkpoint.

    python benchmarks/reasoning_train.py --style system2 [--minutes 30] [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from converters.source import copy_tokenizer, open_source  # noqa: E402
from edgerun import catalog, reasoning  # noqa: E402
from edgerun.atomic import atomic_dir  # noqa: E402
from l2s_system2 import train_step  # noqa: E402

DEFAULTS = {"system1": {"lr": 1e-4, "batch": 16, "problems": 20000},
            "system2": {"lr": 1e-4, "batch": 4, "problems": 20000}}


def default_out(style: str) -> Path:
    return catalog.home() / "cache" / "reasoning" / f"smollm2-135m-{style}"


def examples(tokenizer, style: str, n: int, max_len: int, seed: int) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) of the first ``n`` train problems, those over ``max_len`` dropped."""
    reply = reasoning.system1_reply if style == "system1" else (lambda p: reasoning.system2_reply(p, seed))
    out = []
    for p in reasoning.problems("train", n, seed=seed):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p.question}],
                                               tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        a_ids = tokenizer(reply(p) + "<|im_end|>\n", add_special_tokens=False).input_ids
        if len(p_ids) + len(a_ids) <= max_len:
            out.append((p_ids + a_ids, len(p_ids)))
    return out


def batches(train: list, batch: int, seed: int) -> list[list[int]]:
    """Indices of every batch of one epoch: shuffled, then grouped by length within windows of 32 batches."""
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    out = []
    window = 32 * batch
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: len(train[j][0]))
        out += [chunk[k:k + batch] for k in range(0, len(chunk) - batch + 1, batch)]
    rng.shuffle(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--style", choices=("system1", "system2"), required=True)
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time bound of the training loop")
    ap.add_argument("--steps", type=int, default=None, help="step bound (reproduces a time-bounded run)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=20, help="linear LR warm-up steps")
    ap.add_argument("--batch", type=int, default=None, help="problems per step")
    ap.add_argument("--problems", type=int, default=None, help="train problems generated")
    ap.add_argument("--max-len", type=int, default=400, help="drop examples longer than this (tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between resumable saves")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    d = DEFAULTS[args.style]
    lr, bsz, n_problems = args.lr or d["lr"], args.batch or d["batch"], args.problems or d["problems"]
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import load_model, save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = open_source("smollm2-135m-instruct")
    out = args.out or default_out(args.style)
    if out.exists() and not args.force:
        print(f"{out} exists; pass --force to train again", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    settings = {"style": args.style, "lr": lr, "batch": bsz, "problems": n_problems, "max_len": args.max_len,
                "seed": args.seed, "warmup": args.warmup}
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    train = examples(tokenizer, args.style, n_problems, args.max_len, args.seed)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    losses: list[float] = []
    step, tokens, seconds_before = 0, 0, 0.0
    state_file = partial / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state["settings"] != settings:
            print(f"{partial} holds a run with other settings ({state['settings']}); delete it or pass the same "
                  "settings", file=sys.stderr)
            return 2
        load_model(model, str(partial / "model.safetensors"))
        optimizer.load_state_dict(torch.load(partial / "optimizer.pt", weights_only=True))
        sched.load_state_dict(state["scheduler"])
        step, tokens, losses, seconds_before = state["step"], state["tokens"], state["losses"], state["seconds"]
        print(f"resuming {partial} at step {step}", flush=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(f"{len(train)} training problems (<= {args.max_len} tokens), style {args.style}; "
          f"full fine-tune of {source.label}", flush=True)

    def save_partial(seconds: float) -> None:
        with atomic_dir(partial, force=True) as tmp:
            save_model(model, str(tmp / "model.safetensors"))      # tied embeddings stored once
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"settings": settings, "step": step, "tokens": tokens,
                                                        "losses": losses, "seconds": seconds,
                                                        "scheduler": sched.state_dict()}), encoding="utf-8")

    epoch_batches: dict[int, list[list[int]]] = {}
    t0 = time.perf_counter()
    last_save = t0
    while (time.perf_counter() - t0 + seconds_before < args.minutes * 60
           and (args.steps is None or step < args.steps)):
        per_epoch = len(batches(train, bsz, args.seed)) if not epoch_batches else len(next(iter(epoch_batches.values())))
        epoch = step // per_epoch
        if epoch not in epoch_batches:
            epoch_batches = {epoch: batches(train, bsz, args.seed + epoch)}
        batch = [train[j] for j in epoch_batches[epoch][step % per_epoch]]
        loss, n = train_step(model, optimizer, sched, batch, pad)
        losses.append(round(loss, 4))
        tokens += n
        step += 1
        if step % 10 == 0:
            recent = losses[-10:]
            print(f"step {step}  loss {sum(recent) / len(recent):.3f}  "
                  f"{time.perf_counter() - t0 + seconds_before:.0f} s", flush=True)
        if time.perf_counter() - last_save > args.save_every * 60:
            save_partial(time.perf_counter() - t0 + seconds_before)
            last_save = time.perf_counter()
    seconds = time.perf_counter() - t0 + seconds_before
    k = max(1, step // 10)
    record = {"base": source.as_dict(), "data": f"edgerun.reasoning train split, {args.style} replies",
              **settings, "examples": len(train), "steps": step, "epochs": round(step * bsz / len(train), 3),
              "tokens": tokens, "seconds": round(seconds, 1), "optimizer": "AdamW (wd 0), clip 1.0",
              "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
              "losses": losses, "finetune": "full; float32 master weights, bfloat16 autocast"}
    model.eval()
    with atomic_dir(out, force=args.force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(source.path, tmp)
        if args.style == "system2":
            (tmp / "chat_template.jinja").write_text(reasoning.SYSTEM2_CHAT_TEMPLATE, encoding="utf-8")
        (tmp / "edgerun_train.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {out}: {step} steps, {tokens} tokens, {seconds / 60:.1f} min, "
          f"loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
