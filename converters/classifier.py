"""Train a text classifier on a causal LM and write it as a checkpoint that ``edgerun certify`` loads.

The classifier (:class:`edgerun.robustness.classifier.TextClassifier`) reads the final hidden state at
the last token of the task prompt. Two ways to train it, both bounded to minutes on 2 cores:

- ``method="head"``: a linear head on the frozen model (logistic regression on the features; seconds
  once the features are computed);
- ``method="lora"``: LoRA adapters (peft) on the top-H decoder layers plus the head, the lower layers
  frozen and run once per input; the adapters are merged into the written weights.

Training inputs are augmented with randomized copies (each word deleted with a probability drawn from
``augment_omegas``), so that the base classifier stays accurate on the randomized inputs smoothing
feeds it (as RanMASK trains on masked inputs).

FRS's fine-tuning phase (Eq. 4 of He et al., ICLR 2025; its exact form is reconstructed): after every
optimizer step the trained parameters are clipped to norm ``phase1_clip`` (per tensor) and receive
Gaussian noise of std ``phase1_sigma``. Here the trained parameters are the head and, with LoRA, the
top-H layers' adapters (the paper perturbs the top-H layers' weights themselves).

Written checkpoint (a plain HF directory, so ``edgerun export`` takes its LM; the head is not exported):
config.json, model.safetensors (the base weights, hard-linked when unchanged, else with the merged
adapters), tokenizer files, ``classifier/head.safetensors`` (``weight`` float32 ``[C, hidden]``, ``bias``
``[C]``) and ``classifier/classifier.json`` (task, labels, method, training settings and accuracy on the training set).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from edgerun.atomic import atomic_dir
from edgerun.errors import UsageError
from edgerun.robustness.classifier import HEAD_FILE, HEAD_META, TextClassifier, get_task
from edgerun.robustness.frs import randomize

# the base's record of where its weights came from does not describe the classifier's
_NOT_COPIED = ("edgerun_source.json",)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def augmented(examples: Sequence[tuple[str, int]], copies: int, omegas: Sequence[float],
              seed: int) -> list[tuple[list[str], int]]:
    """``examples`` as word lists, each followed by ``copies`` randomized versions (word deletion with a
    probability drawn from ``omegas``; an empty result keeps one word)."""
    rng = np.random.default_rng(seed)
    out = []
    for text, label in examples:
        words = text.split()
        out.append((words, label))
        for _ in range(copies):
            omega = float(omegas[int(rng.integers(len(omegas)))])
            kept = randomize(words, [False] * len(words), omega, omega, rng) or words[:1]
            out.append((kept, label))
    return out


def _phase1(params: Sequence[torch.nn.Parameter], clip: float | None, sigma: float, gen: torch.Generator) -> None:
    """Eq. 4 [reconstructed]: theta <- Clip_rho(theta) + N(0, sigma^2), per tensor, after a step."""
    with torch.no_grad():
        for p in params:
            if clip is not None:
                norm = float(p.norm())
                if norm > clip:
                    p.mul_(clip / norm)
            if sigma > 0:
                p.add_(sigma * torch.randn(p.shape, generator=gen))


def train_classifier(base: str | Path, examples: Sequence[tuple[str, int]], out: str | Path, *, task: str = "sst2",
                     method: str = "head", top_layers: int = 10, epochs: int = 3, lr: float | None = None,
                     weight_decay: float = 1e-3, l2: float = 0.1, augment: int = 2, augment_omegas: Sequence[float] = (0.1, 0.3, 0.5),
                     lora_rank: int = 8, phase1_sigma: float = 0.0, phase1_clip: float | None = None,
                     batch: int = 16, dtype: str = "bfloat16", seed: int = 0, force: bool = False,
                     log: Callable[[str], None] = print) -> Path:
    """Train a classifier for ``task`` on ``examples`` and write it to ``out`` (atomically).

    Args:
        base: HF checkpoint directory of the LM (e.g. the default model's float32 source).
        examples: ``(text, label)`` pairs, labels ``0..C-1``.
        method: ``"head"`` (linear head on frozen features, full-batch Adam for 300 steps) or ``"lora"``
            (rank ``lora_rank`` adapters on every linear layer of the top ``top_layers`` decoder layers plus
            the head, ``epochs`` passes of minibatch Adam).
        lr: learning rate (default 0.01 for the head, 5e-4 for LoRA). weight_decay: AdamW's (LoRA).
        l2: the head's L2 penalty on standardized features (0.1: the best of 0, 0.003, 0.01, 0.03, 0.1, 0.3, 1
            on the first 250 SST-2 eval sentences, 84.8% there).
        augment, augment_omegas: randomized copies per example and their deletion probabilities.
        phase1_sigma, phase1_clip: FRS's fine-tuning-phase noise and clipping (off by default).
        batch: sequences per forward. dtype: the model's dtype for the frozen part and the features
            (the runtime's default, ``bfloat16``); LoRA layers train in float32.
        seed: shuffling, augmentation, initialization and phase-1 noise. force: replace ``out``.
        log: progress lines.

    Returns:
        ``out``.

    Raises:
        UsageError: an unknown task or method, no examples, a label out of range, bad settings.
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    spec = get_task(task)
    if method not in ("head", "lora"):
        raise UsageError(f"unknown training method '{method}'; use head or lora")
    if not examples:
        raise UsageError("no training examples")
    if any(not 0 <= int(y) < len(spec.labels) for _, y in examples):
        raise UsageError(f"labels must be in 0..{len(spec.labels) - 1}")
    if epochs < 1 or augment < 0 or lora_rank < 1 or phase1_sigma < 0:
        raise UsageError("need epochs >= 1, augment >= 0, lora rank >= 1 and phase-1 sigma >= 0")
    base, out = Path(base), Path(out)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    clf = TextClassifier.prompted(base, task, dtype=dtype)
    if not 1 <= top_layers <= clf.n_layers:
        raise UsageError(f"top layers must be in 1..{clf.n_layers}, got {top_layers}")
    data = augmented(examples, augment, augment_omegas, seed)
    labels = torch.tensor([y for _, y in data])
    log(f"training a {method} classifier for {task} on {len(examples)} examples ({len(data)} with augmentation)")
    gen = torch.Generator().manual_seed(seed)
    hidden_size = clf.model.config.hidden_size
    head = torch.nn.Linear(hidden_size, len(spec.labels))
    if method == "lora":  # start from the prompted classifier: the label words' LM-head rows
        with torch.no_grad():
            head.weight.copy_(clf.head_weight)
            head.bias.zero_()
    deltas: dict[str, torch.Tensor] = {}
    if method == "head":
        feats = clf.features([w for w, _ in data], batch)
        mean, std = feats.mean(0), feats.std(0) + 1e-6          # standardize, then fold into the head
        x = (feats - mean) / std
        torch.nn.init.zeros_(head.weight)
        opt = torch.optim.Adam(head.parameters(), lr=lr or 0.01)
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x), labels) + l2 * head.weight.pow(2).sum()
            loss.backward()
            opt.step()
            _phase1(list(head.parameters()), phase1_clip, phase1_sigma, gen)
        with torch.no_grad():
            weight = head.weight / std
            bias = head.bias - weight @ mean
            train_acc = float(((feats @ weight.T + bias).argmax(-1) == labels).float().mean())
    else:
        weight, bias, train_acc, deltas = _train_lora(clf, data, labels, head, top_layers, epochs, lr or 5e-4,
                                                      weight_decay, lora_rank, phase1_sigma, phase1_clip, batch,
                                                      seed, gen, log)
    meta = {"task": task, "labels": list(spec.labels), "kind": "head", "method": method, "template": spec.template,
            "base": str(base), "examples": len(examples), "augment": augment, "augment_omegas": list(augment_omegas),
            "top_layers": top_layers if method == "lora" else 0, "lora_rank": lora_rank if method == "lora" else 0,
            "epochs": epochs if method == "lora" else 0, "l2": l2 if method == "head" else 0, "phase1_sigma": phase1_sigma, "phase1_clip": phase1_clip,
            "dtype": dtype, "seed": seed, "train_accuracy": train_acc, "train_seconds": time.perf_counter() - t0}
    _write(base, out, weight, bias, deltas, meta, force)
    log(f"wrote {out} (training accuracy {train_acc:.3f}, {meta['train_seconds']:.0f} s)")
    return out


def _train_lora(clf: TextClassifier, data, labels, head, top_layers, epochs, lr, weight_decay, rank,
                phase1_sigma, phase1_clip, batch, seed, gen, log):
    import copy

    from peft import LoraConfig, inject_adapter_in_model  # heavy: peft

    n_lower = clf.n_layers - top_layers
    hidden = clf.lower(clf.encode([w for w, _ in data]), n_lower, batch)
    top = copy.deepcopy(clf.layers[n_lower:]).float()
    top = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=list(LORA_TARGETS)), top)
    norm = copy.deepcopy(clf.model.model.norm).float()
    for p in list(top.parameters()) + list(norm.parameters()):
        p.requires_grad_("lora_" in _name_of(top, p))
    params = [p for p in top.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)

    def forward(idx):
        width = max(hidden[i].shape[0] for i in idx)
        h = torch.zeros(len(idx), width, hidden[idx[0]].shape[1])
        for row, i in enumerate(idx):
            h[row, :hidden[i].shape[0]] = hidden[i].float()
        h = norm(clf._run_layers(h, top))
        last = torch.stack([h[row, hidden[i].shape[0] - 1] for row, i in enumerate(idx)])
        return head(last)

    for epoch in range(epochs):
        order = rng.permutation(len(hidden))
        total = 0.0
        for start in range(0, len(order), batch):
            idx = [int(i) for i in order[start:start + batch]]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(forward(idx), labels[idx])
            loss.backward()
            opt.step()
            _phase1(params, phase1_clip, phase1_sigma, gen)
            total += float(loss.detach()) * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(hidden):.4f}")
    with torch.no_grad():
        correct = 0
        for start in range(0, len(hidden), batch):
            idx = list(range(start, min(start + batch, len(hidden))))
            correct += int((forward(idx).argmax(-1) == labels[idx]).sum())
        deltas = {}
        for name, module in top.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                scale = module.scaling["default"]
                delta = (module.lora_B["default"].weight @ module.lora_A["default"].weight) * scale
                layer = n_lower + int(name.split(".")[0])
                deltas[f"model.layers.{layer}.{name.split('.', 1)[1]}.weight"] = delta
    return head.weight.detach().clone(), head.bias.detach().clone(), correct / len(hidden), deltas


def _name_of(module: torch.nn.Module, param: torch.nn.Parameter) -> str:
    for name, p in module.named_parameters():
        if p is param:
            return name
    return ""


def _write(base: Path, out: Path, weight, bias, deltas, meta, force) -> None:
    from safetensors.torch import load_file, save_file  # heavy: safetensors' torch bindings

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, force=force) as tmp:
        for f in base.iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name not in _NOT_COPIED:
                if f.suffix == ".safetensors" and not deltas:
                    try:                     # unchanged weights: share the base's file
                        os.link(f, tmp / f.name)
                        continue
                    except OSError:
                        pass
                if f.suffix != ".safetensors":
                    shutil.copy2(f, tmp / f.name)
        if deltas:
            for f in sorted(base.glob("*.safetensors")):
                state = load_file(str(f))
                for key, delta in deltas.items():
                    if key in state:
                        state[key] = (state[key].float() + delta.to(torch.float32)).to(state[key].dtype)
                save_file(state, str(tmp / f.name), metadata={"format": "pt"})
        (tmp / HEAD_FILE).parent.mkdir()
        save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(tmp / HEAD_FILE))
        (tmp / HEAD_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
