"""A carved CMoE checkpoint as a standard MoE architecture that transformers, llama.cpp and ONNX run.

The host is Granite's MoE with a shared expert (transformers ``GraniteMoeSharedForCausalLM``,
llama.cpp ``granitemoe``): Llama attention, RMSNorm, an ungated shared SwiGLU expert of its own
width, and routed SwiGLU experts chosen by a *linear* router, ``top-k`` of the router logits, each
weighted by the softmax over the chosen logits. With Granite's multipliers neutral (attention
multiplier 1/sqrt(head_dim), embedding and residual multipliers 1, logits scaling 1) the dense part
is exactly Llama.

Every chosen expert of a carved layer is weighted 1 (training-free). The export:

- **the router**: a carved checkpoint with the **fitted** router (the default, :mod:`converters.carve`)
  already routes with a linear map W (z-x, d); the host's router is exactly ``temperature x W``, and
  with a power-of-two temperature (2^-7) every logit is scaled exactly, so the host selects the same
  experts as the carved model by construction (router agreement 100%, measured and recorded all the
  same). With the **analytical** router (CMoE's non-linear ``|u.x| SiLU(g.x)``), or a non-zero
  balancing bias after ``--finetune``, a linear W is fitted by least squares to what the carved model
  selects on; its *router agreement* (share of held-out tokens whose top-k set equals the carved
  model's) is measured and recorded; for the analytical router it is low (CMoE's probabilities are
  nearly tied);
- **flat weights**: the exported router's logits are scaled by the small temperature, so the
  softmax over the chosen logits is close to uniform (1/k), and every routed expert's down
  projection is multiplied by k, making each chosen expert's weight ~1 as in CMoE. The top-k order
  (and so the choice) does not depend on the temperature.

After ``--finetune`` the router is fitted to what the carved model then selects on (scores + the
balancing bias); the learned gate scales (gates ``1 + p_j alpha_j``) have no place in Granite's softmax weights and are
dropped (their largest |alpha| is recorded); LoRA is already merged into the weights.

The result is an HF checkpoint (``model_type: granitemoeshared``) that is also the source of the
GGUF (``granitemoe``) and ONNX writers; its routing is "the exported routing" that the engines'
logits are compared against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer

from converters.source import copy_tokenizer
from edgerun import data
from edgerun.atomic import atomic_dir
from edgerun.calibration import calibration_windows, run_with_input_hooks
from edgerun.errors import UsageError
from edgerun.formats import safetensors as st_format
from edgerun.moe.layer import CarvedMoE
from edgerun.moe.store import MOE_KEY, is_carved, load_model

ROUTER_TEMPERATURE = 2.0 ** -7   # a power of two: scaling the logits by it is exact in floating point


def topk_agreement(logits: torch.Tensor, reference: torch.Tensor, k: int) -> float:
    """Share of rows whose top-k index set under ``logits`` equals the one under ``reference`` (both (n, E))."""
    a = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(k, dim=1).indices, True)
    b = torch.zeros_like(reference, dtype=torch.bool).scatter_(1, reference.topk(k, dim=1).indices, True)
    return float((a == b).all(dim=1).float().mean())


def exact_linear_router(moe: CarvedMoE) -> torch.Tensor | None:
    """The carved layer's own router weights (z-x, d) when a linear engine router reproduces its choice
    exactly (fitted router, zero selection bias); None otherwise."""
    if moe.router_kind == "fitted" and not bool(moe.bias.any()):
        return moe.router_weight.detach().float().clone()
    return None


def fit_linear_router(moe: CarvedMoE, x: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """A linear router (z-x, d) fitted by ridge least squares to a carved layer's selection scores on FFN
    inputs x (tokens, d).

    Analytical router: the target is log(p + bias) (CMoE's softmax probabilities), i.e. the analytical
    scores up to a per-token constant, so the linear logits rank experts as CMoE's scores do wherever a
    linear map can. Fitted router: the target is its logits + bias.

    Args:
        moe: the carved layer (z = shared + routed experts, x = shared). x: (tokens, d) FFN inputs.
        ridge: ridge penalty added to the diagonal of x^T x / tokens.

    Returns:
        (z - x, d) float32 router weights, one row per routed expert.
    """
    x = x.float()
    with torch.no_grad():
        # what the carved layer selects on (the bias is 0 unless --finetune balanced the load)
        sel = moe.selection_scores(x)
        target = sel if moe.router_kind == "fitted" else torch.log(sel.clamp_min(1e-12))     # (n, E)
        target = target - target.mean(dim=1, keepdim=True)
        gram = x.T @ x / len(x) + ridge * torch.eye(x.shape[1])
        return torch.linalg.solve(gram, x.T @ target / len(x)).T.contiguous()


def _ffn_inputs_by_layer(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """FFN inputs (tokens, d) of every layer of the exact carved model, over ``windows``."""
    seen: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    run_with_input_hooks(model, {i: layer.mlp for i, layer in enumerate(model.model.layers)}, windows,
                         lambda i, x: seen[i].append(x.float()))
    return [torch.cat(s) for s in seen]


def to_granite(carved: str | Path, out: str | Path, tokens: int = 4096, heldout_tokens: int = 2048,
               temperature: float = ROUTER_TEMPERATURE, force: bool = False,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a carved checkpoint as a GraniteMoeShared HF checkpoint with a fitted linear router.

    Args:
        carved: carved checkpoint directory (``edgerun carve``).
        out: output directory.
        tokens: calibration tokens (wiki calibration split) to fit the routers on.
        heldout_tokens: held-out wiki tokens to measure router agreement on (one window of
            :func:`edgerun.data.token_windows`, BOS first when the model uses one).
        temperature: scale of the exported router logits (small: near-uniform top-k weights).
        force: replace an existing output.

    Returns:
        ``out``; its ``config.json`` records the per-layer router agreement under ``edgerun_moe``.

    Raises:
        UsageError: not a carved checkpoint; output exists without ``force``; too little wiki text.
    """
    carved, out = Path(carved), Path(out)
    st_format.checkpoint_files(carved)
    cfg = st_format.read_config(carved)
    if not is_carved(cfg):
        raise UsageError(f"{carved} is not a carved MoE checkpoint (edgerun carve makes one)")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    meta = dict(cfg[MOE_KEY])
    k = meta["active"]
    tokenizer = AutoTokenizer.from_pretrained(carved)
    model = load_model(carved)
    seq = min(512, tokens)
    # fit on calibration windows after those the carve used; measure on the held-out split
    skip = meta["calibration"]["tokens"] // seq
    windows = calibration_windows(tokenizer, skip + tokens // seq, seq)[skip:]
    held_ids = data.token_windows(tokenizer, "wiki", "heldout", heldout_tokens, 1)[0]
    # the fitted router without a bias is exported as it is: the fit's inputs are only needed otherwise
    need_fit = any(exact_linear_router(layer.mlp) is None for layer in model.model.layers)
    train_x = _ffn_inputs_by_layer(model, windows) if need_fit else None
    held_x = _ffn_inputs_by_layer(model, [torch.tensor([held_ids])])
    routers, agreement, exact = [], [], []
    for i, layer in enumerate(model.model.layers):
        w = exact_linear_router(layer.mlp)
        exact.append(w is not None)
        if w is None:
            w = fit_linear_router(layer.mlp, train_x[i])
        with torch.no_grad():
            scores = layer.mlp.selection_scores(held_x[i])
            agreement.append(topk_agreement(F.linear(held_x[i], temperature * w), scores, k))
        routers.append(w)
        if progress:
            progress(i + 1, len(model.model.layers))

    state = _granite_state(model, routers, temperature, k)
    gcfg = _granite_config(cfg, meta)
    meta.update(export="granitemoeshared", router_temperature=temperature,
                host_router="exact" if all(exact) else "fitted-to-carved" if not any(exact) else "mixed",
                router_fit={"tokens": len(windows) * seq, "heldout_tokens": heldout_tokens},
                router_agreement=agreement, router_agreement_mean=sum(agreement) / len(agreement))
    if "finetune" in meta:   # Granite weights chosen experts by a softmax: the learned 1 + p*alpha gates become ~1
        meta["finetune_gate_scale_dropped_max"] = max(float(layer.mlp.scale.abs().max()) for layer in model.model.layers)
    gcfg[MOE_KEY] = meta
    with atomic_dir(out, force=force) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(gcfg, indent=2), encoding="utf-8")
        copy_tokenizer(carved, tmp)
    return out


def _granite_config(cfg: dict, meta: dict) -> dict:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id",
            "tie_word_embeddings", "rope_parameters", "attention_bias", "hidden_act")
    g = {key: cfg[key] for key in keep if key in cfg}
    g.update(model_type="granitemoeshared", architectures=["GraniteMoeSharedForCausalLM"],
             intermediate_size=meta["expert_size"], shared_intermediate_size=meta["shared_neurons"],
             num_local_experts=meta["routed"], num_experts_per_tok=meta["active"],
             attention_multiplier=1.0 / math.sqrt(head_dim), embedding_multiplier=1.0, residual_multiplier=1.0,
             logits_scaling=1.0, dtype="float32")
    return g


def _granite_state(model, routers: list[torch.Tensor], temperature: float, k: int) -> dict[str, torch.Tensor]:
    state = {}
    for name, value in model.state_dict().items():
        if ".mlp." in name:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name] = value.detach().contiguous()
    for i, layer in enumerate(model.model.layers):
        moe: CarvedMoE = layer.mlp
        p = f"model.layers.{i}."
        state[p + "block_sparse_moe.router.weight"] = (temperature * routers[i]).contiguous()
        state[p + "block_sparse_moe.experts.gate_up_proj"] = torch.cat(
            [moe.expert_gate.detach(), moe.expert_up.detach()], dim=1).contiguous()        # (E, 2m, d)
        state[p + "block_sparse_moe.experts.down_proj"] = (k * moe.expert_down.detach()).contiguous()  # (E, d, m)
        if moe.shared_gate.shape[0]:
            state[p + "shared_mlp.input_linear.weight"] = torch.cat(
                [moe.shared_gate.detach(), moe.shared_up.detach()], dim=0).contiguous()   # (2S, d)
            state[p + "shared_mlp.output_linear.weight"] = moe.shared_down.detach().contiguous()
    return state
