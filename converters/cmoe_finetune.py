"""CMoE's optional light fine-tuning of a carved MoE: gate scale, bias load balancing, LoRA.

CMoE (Pei et al., "CMoE: Converting Mixture-of-Experts from Dense to Accelerate LLM Inference",
arXiv 2502.04416, Sec. 4.3 and the released code) carves training-free and then optionally recovers
quality with a short fine-tune on calibration text:

- the **learnable gate scale**: each selected expert's gate is ``1 + p_j * alpha_j`` (``alpha``
  starts at 0, the training-free gates), trained with the next-token loss;
- **bias load balancing** (auxiliary-loss-free, as in DeepSeek-V3): after each step every routed
  expert's selection bias moves by ``+-bias_step`` (0.001) towards the mean load — up for experts
  chosen less than average, down for the others; the bias only changes which experts are selected;
- **LoRA** (rank 8, alpha 16; peft) on the attention projections and on the shared and routed expert
  weights (peft's ``target_parameters``), merged into the weights at the end.

CMoE's analytical router (representative-neuron rows) stays fixed, as released. A **fitted** linear
router (the carve's default, :mod:`converters.carve`) is trained as well (not in the paper): each MoE
layer's router logits are distilled towards the oracle's expert set on the layer's input (the k
experts whose dropped remainder has the smallest output norm, :meth:`CarvedMoE.oracle_select`), by a
cross-entropy of the router's softmax against the uniform distribution over the oracle's k experts,
added to the next-token loss with weight ``router_distill``; the layer inputs are detached, so this
term trains the routers only. The selection bias then stays 0 (no bias balancing), so the engine
exports still route exactly as the carved model. Training runs on the calibration split (the same
text the carve profiled), is bounded by ``minutes`` and ``steps``, and the result is written as a new
carved checkpoint in the same store layout (the config records the fine-tune), atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgerun.atomic import atomic_dir
from edgerun.calibration import all_windows
from edgerun.errors import UsageError
from edgerun.moe import store

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_PARAMETERS = ["mlp.shared_gate", "mlp.shared_up", "mlp.shared_down", "mlp.expert_gate", "mlp.expert_up",
                   "mlp.expert_down"]


@dataclass
class FinetuneReport:
    """What a fine-tune did: steps, tokens, seconds, the loss curve, the expert-load imbalance.

    Attributes:
        steps: optimizer steps run. tokens: training tokens seen. seconds: wall time (s).
        loss_first, loss_last: mean next-token loss (nats/token) of the first and last 10% of steps.
        imbalance_first, imbalance_last: max expert load / mean load, averaged over layers, in the
            first and last 10% of steps (1.0 = perfectly balanced).
        lora: LoRA settings used ({} without LoRA).
        router_distill: weight of the oracle-distillation term (0: routers frozen).
        distill_loss_first, distill_loss_last: that term (nats, mean over layers) in the first and last 10%.
    """

    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float
    imbalance_first: float
    imbalance_last: float
    lora: dict = field(default_factory=dict)
    router_distill: float = 0.0
    distill_loss_first: float | None = None
    distill_loss_last: float | None = None


def _imbalance(counts: torch.Tensor) -> float:
    """max load / mean load of one layer's selection counts (n_routed,)."""
    mean = counts.float().mean()
    return float(counts.max() / mean) if mean > 0 else 1.0


def finetune(carved: str | Path, out: str | Path, minutes: float = 3.0, steps: int | None = None,
             seq_len: int = 256, lr: float = 2e-4, rank: int = 8, lora: bool = True, bias_step: float = 1e-3,
             dataset: str = "wiki", seed: int = 0, force: bool = False,
             progress: Callable[[int, float], None] | None = None,
             router_distill: float | None = None) -> tuple[Path, FinetuneReport]:
    """Fine-tune a carved checkpoint's gate scales (and LoRA) with bias load balancing; write a new one.

    Args:
        carved: a carved checkpoint (edgerun's store layout, made by ``edgerun carve``).
        out: output checkpoint directory (written atomically).
        minutes: wall-time bound of the training loop (minutes). steps: optional step bound.
        seq_len: tokens per training window (one window per step). lr: AdamW learning rate.
        rank: LoRA rank (alpha = 2 x rank). lora: False trains the gate scales and bias only.
        bias_step: load-balancing bias update per step (analytical routers only). dataset: catalog text
            (calibration split).
        progress: called as ``progress(step, loss)``.
        router_distill: weight of the oracle distillation of fitted routers (module doc); None: 1.0 for a
            checkpoint with the fitted router, 0 (frozen) for the analytical one.

    Returns:
        (output path, :class:`FinetuneReport`).

    Raises:
        UsageError: not a carved checkpoint, non-positive bounds, output exists without ``force``.
        ModelFileError: missing or corrupted checkpoint files.
    """
    carved, out = Path(carved), Path(out)
    cfg_path = carved / "config.json"
    if not cfg_path.is_file() or not store.is_carved(json.loads(cfg_path.read_text())):
        raise UsageError(f"{carved} is not a carved checkpoint: carve it first (edgerun carve SRC --config SxAyEz)")
    if minutes <= 0 or (steps is not None and steps <= 0):
        raise UsageError("--finetune needs a positive time bound (minutes) and step count")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    from transformers import AutoTokenizer   # heavy: only a fine-tune needs it

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(carved)
    model = store.load_model(carved)
    moes = [layer.mlp for layer in model.model.layers]
    windows = all_windows(tokenizer, seq_len, dataset)

    for p in model.parameters():
        p.requires_grad_(False)
    lora_info: dict = {}
    if lora:
        model, lora_info = add_lora(model, rank)
    fitted = all(m.router_kind == "fitted" for m in moes)
    distill = (1.0 if fitted else 0.0) if router_distill is None else float(router_distill)
    if distill and not fitted:
        raise UsageError("router distillation trains a fitted linear router; this checkpoint routes with CMoE's "
                         "analytical router (carve with --router fitted)")
    if distill:
        bias_step = 0.0     # the trained router balances nothing by bias: the engine export stays exact
    for moe in moes:
        moe.scale.requires_grad_(True)
        moe.router_weight.requires_grad_(bool(distill))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)

    loads: list[torch.Tensor] = [torch.zeros(m.n_routed) for m in moes]

    def count_hook(i):
        def hook(module, args, output):
            with torch.no_grad():
                flat = args[0].reshape(-1, args[0].shape[-1])
                selected = torch.topk(module.selection_scores(flat), module.top_k,
                                      dim=-1).indices
                loads[i] += torch.bincount(selected.flatten(), minlength=module.n_routed).float()
        return hook

    handles = [m.register_forward_hook(count_hook(i)) for i, m in enumerate(moes)]
    distill_terms: list[torch.Tensor] = []

    def distill_hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).detach()
        with torch.no_grad():
            oracle = module.oracle_select(x)                                  # (n, k)
        logp = torch.log_softmax(module.router_logits(x), dim=-1)             # (n, E), grad to router_weight
        distill_terms.append(-logp.gather(1, oracle).mean())

    if distill:
        handles += [m.register_forward_pre_hook(distill_hook) for m in moes]
    losses, imbalances, distill_losses = [], [], []
    model.train()
    t0 = time.perf_counter()
    step = 0
    try:
        while time.perf_counter() - t0 < minutes * 60 and (steps is None or step < steps):
            ids = windows[step % len(windows)]
            for i in range(len(loads)):
                loads[i].zero_()
            distill_terms.clear()
            loss = model(input_ids=ids, labels=ids).loss
            total = loss
            if distill_terms:
                term = torch.stack(distill_terms).mean()
                distill_losses.append(term.item())
                total = loss + distill * term
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            with torch.no_grad():                       # auxiliary-loss-free balancing of the selection
                for moe, counts in zip(moes, loads):
                    moe.bias += bias_step * torch.sign(counts.mean() - counts)
            losses.append(loss.item())
            imbalances.append(sum(_imbalance(c) for c in loads) / len(loads))
            step += 1
            if progress:
                progress(step, losses[-1])
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - t0
    if lora:
        model = model.merge_and_unload()
    model.eval()

    k = max(1, math.ceil(0.1 * step))
    report = FinetuneReport(steps=step, tokens=step * seq_len, seconds=round(seconds, 1),
                            loss_first=sum(losses[:k]) / k, loss_last=sum(losses[-k:]) / k,
                            imbalance_first=sum(imbalances[:k]) / k, imbalance_last=sum(imbalances[-k:]) / k,
                            lora=lora_info, router_distill=distill,
                            distill_loss_first=sum(distill_losses[:k]) / k if distill_losses else None,
                            distill_loss_last=sum(distill_losses[-k:]) / k if distill_losses else None)
    _save(model, carved, out, report, lr, bias_step, dataset, force)
    return out, report


def add_lora(model, rank: int = 8, alpha: int | None = None):
    """Wrap a carved torch model (:func:`edgerun.moe.store.load_model`) with LoRA adapters (peft).

    LoRA of rank ``rank`` (Hu et al. 2021) on the attention projections (:data:`LORA_MODULES`, ``nn.Linear``)
    and on the shared and routed expert tensors (:data:`LORA_PARAMETERS`, peft's ``target_parameters``:
    the routed tensors (n_routed, m, d) / (n_routed, d, m) get one adapter per expert). Dropout is 0: peft's
    parameter adapters do not support any. Only the adapters are trainable afterwards; ``merge_and_unload()``
    folds them back into the carved tensors.

    Args:
        rank: LoRA rank r. alpha: LoRA alpha (None: 2 r).

    Returns:
        (the peft model, a record of the settings: rank, alpha, modules, parameters).
    """
    from peft import LoraConfig, get_peft_model   # optional: LoRA only

    alpha = 2 * rank if alpha is None else alpha
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_MODULES,
                        target_parameters=LORA_PARAMETERS)
    return get_peft_model(model, config), {"rank": rank, "alpha": alpha, "modules": LORA_MODULES,
                                           "parameters": LORA_PARAMETERS}


def _save(model, carved: Path, out: Path, report: FinetuneReport, lr: float, bias_step: float, dataset: str,
          force: bool) -> None:
    cfg = json.loads((carved / "config.json").read_text())
    cfg[store.MOE_KEY] = {**cfg[store.MOE_KEY], "finetune": {**asdict(report), "lr": lr, "bias_step": bias_step,
                                                             "dataset": dataset, "split": "calibration",
                                                             "source": str(carved)}}
    with atomic_dir(out, force=force) as tmp:
        store.save_model(model, carved, tmp, cfg)
