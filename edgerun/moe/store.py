"""The expert store of a carved checkpoint: one safetensors file per MoE layer, one name per expert tensor.

Checkpoint layout (a Hugging Face Llama checkpoint whose FFNs live apart)::

    config.json                  the dense model's config + "edgerun_moe": {method, SxAyEz, sizes, calibration}
    model.safetensors            every tensor except the FFNs (embeddings, attention, norms)
    experts/layer-00.safetensors one file per decoder layer:
        shared.gate_proj.weight  (x*m, d)   shared.up_proj.weight (x*m, d)   shared.down_proj.weight (d, x*m)
        router.gate              (z-x, d)   router.up (z-x, d): L2-normalised representative-neuron rows
        router.scale             (z-x,)     learnable gate scale (0 training-free)
        router.bias              (z-x,)     load-balancing selection bias (0 training-free)
        experts.{j}.gate_proj.weight (m, d)  experts.{j}.up_proj.weight (m, d)  experts.{j}.down_proj.weight (d, m)
        neurons.shared           int32 (x*m,)   neurons.experts int32 (z-x, m): the dense FFN's neuron ids

safetensors reads tensors by name, so a runtime can load a subset of experts
(:func:`read_layer` with ``experts=[...]``) without reading the others. No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgerun.errors import ModelFileError
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
        "router.scale": moe.scale, "router.bias": moe.bias,
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
    from safetensors import safe_open

    from edgerun.formats import safetensors as st_format

    path = layer_file(checkpoint, layer)
    st_format.validate_file(path)
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if name.startswith("experts.") and experts is not None and int(name.split(".")[1]) not in experts:
                continue
            out[name] = f.get_tensor(name)
    return out


def load_layer(checkpoint: str | Path, layer: int, moe_cfg: dict, d_model: int) -> CarvedMoE:
    """A :class:`CarvedMoE` with every expert of ``layer`` loaded."""
    t = read_layer(checkpoint, layer)
    n_routed, m = moe_cfg["routed"], moe_cfg["expert_size"]
    moe = CarvedMoE(d_model, moe_cfg["shared_neurons"], n_routed, m, moe_cfg["active"])
    with torch.no_grad():
        moe.shared_gate.copy_(t["shared.gate_proj.weight"])
        moe.shared_up.copy_(t["shared.up_proj.weight"])
        moe.shared_down.copy_(t["shared.down_proj.weight"])
        moe.router_gate.copy_(t["router.gate"])
        moe.router_up.copy_(t["router.up"])
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
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgerun.formats import safetensors as st_format

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
