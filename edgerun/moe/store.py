"""The expert store of a carved checkpoint: one safetensors file per MoE layer, one name per expert tensor.

Checkpoint layout (a Hugging Face Llama checkpoint whose FFNs live apart)::

    config.json                  the dense model's config + "edgerun_moe": {method, SxAyEz, sizes, calibration,
                                 router: "fitted" | "analytical" (older: "cmoe-analytical"), k_a}
    model.safetensors            every tensor except the FFNs (embeddings, attention, norms)
    experts/layer-00.safetensors one file per decoder layer:
        shared.gate_proj.weight  (x*m, d)   shared.up_proj.weight (x*m, d)   shared.down_proj.weight (d, x*m)
        router.gate              (z-x, d)   router.up (z-x, d): L2-normalised representative-neuron rows
        router.weight            (z-x, d)   the fitted linear router (absent in checkpoints carved before it)
        router.scale             (z-x,)     learnable gate scale (0 training-free)
        router.bias              (z-x,)     load-balancing selection bias (0 training-free)
        experts.{j}.gate_proj.weight (m, d)  experts.{j}.up_proj.weight (m, d)  experts.{j}.down_proj.weight (d, m)
        neurons.shared           int32 (x*m,)   neurons.experts int32 (z-x, m): the dense FFN's neuron ids

safetensors reads tensors by name, so a runtime can load a subset of experts
(:func:`read_layer` with ``experts=[...]``) without reading the others. No pickle anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgerun.atomic import atomic_dir
from edgerun.errors import ModelFileError, UsageError
from edgerun.formats import safetensors as st_format
from edgerun.moe.layer import CarvedMoE

MOE_KEY = "edgerun_moe"


def is_carved(config: dict) -> bool:
    """True for the config of a carved checkpoint in edgerun's store layout (not an engine export of one)."""
    return MOE_KEY in config and "export" not in config[MOE_KEY]


def layer_file(checkpoint: str | Path, layer: int) -> Path:
    """Path of ``layer``'s file in the store."""
    return Path(checkpoint) / "experts" / f"layer-{layer:02d}.safetensors"


def layer_tensors(moe: CarvedMoE, neurons_shared: torch.Tensor, neurons_experts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The store's tensors of one carved layer (contiguous float32 / int32)."""
    t = {
        "shared.gate_proj.weight": moe.shared_gate, "shared.up_proj.weight": moe.shared_up,
        "shared.down_proj.weight": moe.shared_down, "router.gate": moe.router_gate, "router.up": moe.router_up,
        "router.scale": moe.scale, "router.bias": moe.bias, "router.weight": moe.router_weight,
        "neurons.shared": neurons_shared.to(torch.int32), "neurons.experts": neurons_experts.to(torch.int32),
    }
    for j in range(moe.n_routed):
        t[f"experts.{j}.gate_proj.weight"] = moe.expert_gate[j]
        t[f"experts.{j}.up_proj.weight"] = moe.expert_up[j]
        t[f"experts.{j}.down_proj.weight"] = moe.expert_down[j]
    return {k: v.detach().contiguous().clone() for k, v in t.items()}


def read_layer(checkpoint: str | Path, layer: int, experts: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one layer; with ``experts``, only those routed experts' weights are read from disk.

    Raises:
        ModelFileError: a missing or corrupted layer file.
    """
    path = layer_file(checkpoint, layer)
    st_format.validate_file(path)
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if name.startswith("experts.") and experts is not None and int(name.split(".")[1]) not in experts:
                continue
            out[name] = f.get_tensor(name)
    return out


def router_kind(moe_cfg: dict) -> str:
    """The router a carved checkpoint routes with (its ``edgerun_moe`` config): ``fitted`` or ``analytical``."""
    return "fitted" if moe_cfg.get("router") == "fitted" else "analytical"


def load_layer(checkpoint: str | Path, layer: int, moe_cfg: dict, d_model: int) -> CarvedMoE:
    """A :class:`CarvedMoE` with every expert of ``layer`` loaded, routing with the checkpoint's router.

    Raises:
        ModelFileError: a missing or corrupted layer file, or a fitted router without its weights.
    """
    t = read_layer(checkpoint, layer)
    n_routed, m = moe_cfg["routed"], moe_cfg["expert_size"]
    kind = router_kind(moe_cfg)
    if kind == "fitted" and "router.weight" not in t:
        raise ModelFileError(f"{layer_file(checkpoint, layer)} has no router.weight, but the config says the router "
                             "is fitted; carve it again")
    moe = CarvedMoE(d_model, moe_cfg["shared_neurons"], n_routed, m, moe_cfg["active"], router_kind=kind)
    with torch.no_grad():
        moe.shared_gate.copy_(t["shared.gate_proj.weight"])
        moe.shared_up.copy_(t["shared.up_proj.weight"])
        moe.shared_down.copy_(t["shared.down_proj.weight"])
        moe.router_gate.copy_(t["router.gate"])
        moe.router_up.copy_(t["router.up"])
        if "router.weight" in t:
            moe.router_weight.copy_(t["router.weight"])
        moe.scale.copy_(t["router.scale"])
        moe.bias.copy_(t["router.bias"])
        moe.expert_gate.copy_(torch.stack([t[f"experts.{j}.gate_proj.weight"] for j in range(n_routed)]))
        moe.expert_up.copy_(torch.stack([t[f"experts.{j}.up_proj.weight"] for j in range(n_routed)]))
        moe.expert_down.copy_(torch.stack([t[f"experts.{j}.down_proj.weight"] for j in range(n_routed)]))
    return moe


def load_model(checkpoint: str | Path, dtype=torch.float32):
    """A transformers Llama model whose FFNs are the checkpoint's carved MoE layers (exact CMoE routing).

    Raises:
        ModelFileError: missing or inconsistent files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy (~1.5 s); the store's other users load no model

    checkpoint = Path(checkpoint)
    raw = json.loads((checkpoint / "config.json").read_text())
    moe_cfg = raw[MOE_KEY]
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    st_format.validate_file(checkpoint / "model.safetensors")
    state = load_file(str(checkpoint / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if ".mlp." not in k and k != "lm_head.weight"]
    if bad or unexpected:
        raise ModelFileError(f"{checkpoint}: tensors do not match the model (missing {bad[:2]}, unexpected {unexpected[:2]})")
    for i, layer in enumerate(model.model.layers):
        layer.mlp = load_layer(checkpoint, i, moe_cfg, config.hidden_size).to(dtype)
    model.tie_weights()
    model.eval()
    return model


def save_model(model, source: str | Path, directory: str | Path, config: dict) -> None:
    """Write a carved torch model (:func:`load_model`'s kind, LoRA merged) into ``directory`` in the store layout.

    ``model.safetensors`` gets every tensor outside the FFNs (float32; ``lm_head.weight`` left out when
    the embeddings are tied), ``experts/layer-XX.safetensors`` each layer's :class:`CarvedMoE` tensors with
    the neuron ids of ``source``'s store (the same layer files the model was loaded from, so the expert
    count is the model's), ``config.json`` is ``config``; every other file of ``source`` (tokenizer,
    generation config) is copied. ``directory`` must exist: callers write into an atomic temporary
    directory (:func:`edgerun.atomic.atomic_dir`) so the checkpoint appears whole or not at all.

    Raises:
        ModelFileError: a missing or corrupted layer file in ``source``.
    """
    source, directory = Path(source), Path(directory)
    dense = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".mlp." not in k}
    if config.get("tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    save_file(dense, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "experts").mkdir()
    for i, layer in enumerate(model.model.layers):
        old = read_layer(source, i, experts=[])
        save_file(layer_tensors(layer.mlp, old["neurons.shared"], old["neurons.experts"]),
                  str(layer_file(directory, i)), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for f in source.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, directory / f.name)


def check_keep(keep: list[list[int]], a: int, n_layers: int, n_experts: int) -> None:
    """Check a per-layer expert selection ``keep`` (n_layers lists of b ids) routing top-``a``.

    Raises:
        UsageError: wrong number of layers, b above the routed experts, or not 1 <= a <= b.
    """
    b = len(keep[0]) if keep else 0
    if len(keep) != n_layers:
        raise UsageError(f"the pattern covers {len(keep)} MoE layers, the model has {n_layers}")
    if b > n_experts:
        raise UsageError(f"b = {b} exceeds the {n_experts} routed experts per layer")
    if not 1 <= a <= b:
        raise UsageError(f"need 1 <= a <= b, got a = {a}, b = {b}")


def select_experts(carved: str | Path, out: str | Path, keep: list[list[int]], a: int, record: dict,
                 force: bool = False) -> Path:
    """Write a carved checkpoint (expert-store layout, exact CMoE routing) keeping only the experts ``keep``.

    Only the kept experts' tensors are read from the store (PreMoe PEP on the store, and TAER's
    per-task model in the torch engine).

    Args:
        carved: the carved checkpoint. out: output directory (written atomically).
        keep: per MoE layer, the routed expert ids to keep (all of the same length b).
        a: experts routed per token after pruning.
        record: what to note in ``edgerun_moe.pruned`` (task, pattern file, score).

    Raises:
        UsageError: not a carved checkpoint; mismatched layers; bad a/b.
    """
    carved, out = Path(carved), Path(out)
    cfg = st_format.read_config(carved)
    if not is_carved(cfg):
        raise UsageError(f"{carved} is not a carved checkpoint")
    meta = cfg[MOE_KEY]
    check_keep(keep, a, cfg["num_hidden_layers"], meta["routed"])
    with atomic_dir(out, force=force) as tmp:
        (tmp / "experts").mkdir()
        for i, ids in enumerate(keep):
            t = read_layer(carved, i, experts=ids)
            idx = torch.tensor(ids, dtype=torch.long)
            new = {k: v for k, v in t.items() if not k.startswith("experts.")}
            for k in ("router.gate", "router.up", "router.scale", "router.bias", "router.weight"):
                if k in t:
                    new[k] = t[k][idx].contiguous()
            new["neurons.experts"] = t["neurons.experts"][idx].contiguous()
            for n, j in enumerate(ids):
                for part in ("gate_proj", "up_proj", "down_proj"):
                    new[f"experts.{n}.{part}.weight"] = t[f"experts.{j}.{part}.weight"]
            save_file(new, str(layer_file(tmp, i)), metadata={"format": "pt"})
        cfg = dict(cfg)
        cfg[MOE_KEY] = {**meta, "routed": len(keep[0]), "active": a, "top_k": a,
                        "pruned": {**record, "a": a, "b": len(keep[0]), "keep": keep}}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        for f in carved.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
    return out
