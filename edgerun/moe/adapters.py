"""One view over the MoE layers of a torch model: collect router statistics, prune experts.

Two kinds of layers are known:

- :class:`~edgerun.moe.layer.CarvedMoE` (exact CMoE routing): the router logits are CMoE's analytical
  scores ``|u.x| SiLU(g.x)``, probabilities their softmax, the choice the top-k of ``probs + bias``;
- standard transformers MoE blocks whose router is a submodule returning
  ``(router_logits, top_k_weights, top_k_index)`` with ``weight``, ``top_k`` and ``num_experts``
  attributes (transformers 5: Mixtral, Qwen2-MoE, DeepSeek-V3, Granite MoE): the logits are the
  router's, probabilities their softmax (DeepSeek-style routers score with a sigmoid; their
  "probability" is the sigmoid score), the choice the router's own top-k indices.

Pruning keeps a given subset of routed experts per layer (router rows and expert tensors sliced
together, in the same order) and routes top-a among them; shared experts and dense parts are
untouched. For DeepSeek-style group-limited routing the pruned layer routes over one group.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from edgerun.errors import UsageError
from edgerun.moe.layer import CarvedMoE
from edgerun.moe.tcess import TcessCollector


@dataclass
class MoELayer:
    """One MoE layer: its decoder-layer index, the block module and (for standard MoE) its router and experts."""

    index: int
    block: torch.nn.Module
    router: torch.nn.Module | None = None
    experts: torch.nn.Module | None = None

    @property
    def carved(self) -> bool:
        return isinstance(self.block, CarvedMoE)

    @property
    def n_experts(self) -> int:
        return self.block.n_routed if self.carved else int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return self.block.top_k if self.carved else int(self.router.top_k)


def moe_layers(model) -> list[MoELayer]:
    """The MoE layers of a transformers causal LM (carved or standard), in depth order.

    Raises:
        UsageError: the model has no MoE layer (a dense model).
    """
    out = []
    for i, layer in enumerate(model.model.layers):
        for name in ("mlp", "block_sparse_moe"):
            block = getattr(layer, name, None)
            if block is None:
                continue
            if isinstance(block, CarvedMoE):
                out.append(MoELayer(i, block))
                break
            router = getattr(block, "gate", None) or getattr(block, "router", None)
            experts = getattr(block, "experts", None)
            if router is not None and hasattr(router, "weight") and hasattr(router, "top_k") and experts is not None:
                out.append(MoELayer(i, block, router, experts))
                break
    if not out:
        raise UsageError("this model has no mixture-of-experts layers (a dense model); carve one with 'edgerun carve'")
    return out


def fingerprint(model, name: str = "") -> dict:
    """What a pattern must match: MoE layer count, experts per layer, top-k, and the routing that runs.

    ``routing`` is ``"carved"`` for CMoE's exact routing in a carved checkpoint (torch engine) and
    ``"standard"`` for a model whose MoE blocks have their own router module (an engine host of a carved
    checkpoint, Mixtral, Qwen2-MoE, ...): router scores, and so TCESS keys, of one do not transfer to the
    other.
    """
    layers = moe_layers(model)
    return {"name": name, "layers": len(layers), "experts": layers[0].n_experts, "top_k": layers[0].top_k,
            "moe_layer_indices": [m.index for m in layers],
            "routing": "carved" if layers[0].carved else "standard"}


def carved_router_logits(block: CarvedMoE, x: torch.Tensor) -> torch.Tensor:
    """A carved layer's router scores (tokens, E) float32, the "logits" its softmax is taken over: the fitted
    linear router's ``W x`` or CMoE's analytical ``|u.x| SiLU(g.x)`` (:meth:`CarvedMoE.router_logits`)."""
    return block.router_logits(x.reshape(-1, x.shape[-1]))


@contextlib.contextmanager
def collecting(model, collector: TcessCollector):
    """Hooks that feed every MoE layer's routing into ``collector`` while the model runs: router logits,
    probabilities, the chosen experts, the expert activation mass (carved layers: every expert's
    ``sum |h|``, which runs all of them; standard layers: the router probabilities) and the layer input."""
    layers = moe_layers(model)
    handles = []
    for n, m in enumerate(layers):
        if m.carved:
            def hook(mod, args, n=n):
                x = args[0].reshape(-1, args[0].shape[-1])
                logits = carved_router_logits(mod, x)
                selected, _, probs = mod.route(x)
                collector.add(n, logits, probs, selected, mass=mod.expert_mass(x), hidden=x)
            handles.append(m.block.register_forward_pre_hook(hook))
        else:
            sigmoid = hasattr(m.router, "e_score_correction_bias")

            def hook(mod, args, out, n=n, sigmoid=sigmoid):
                logits, _, indices = out
                logits = logits.float()
                probs = logits.sigmoid() if sigmoid else torch.softmax(logits, dim=-1)
                collector.add(n, logits, probs, indices, hidden=args[0])   # mass: the router's probabilities
            handles.append(m.router.register_forward_hook(hook))
    try:
        yield layers
    finally:
        for h in handles:
            h.remove()


def check_keep(keep: list[list[int]], a: int, layers: list[MoELayer]) -> None:
    """Validate a per-layer expert subset and the new top-k.

    Raises:
        UsageError: wrong number of layers, b larger than the experts available, a < 1 or a > b.
    """
    if len(keep) != len(layers):
        raise UsageError(f"the pattern covers {len(keep)} MoE layers, the model has {len(layers)}")
    b = len(keep[0])
    n = layers[0].n_experts
    if not 1 <= a <= b:
        raise UsageError(f"need 1 <= a <= b, got a = {a}, b = {b}")
    if b > n:
        raise UsageError(f"b = {b} exceeds the {n} routed experts per layer")
    for ids in keep:
        if len(ids) != b or len(set(ids)) != b or min(ids) < 0 or max(ids) >= n:
            raise UsageError(f"each layer must keep {b} distinct experts among 0..{n - 1}")


def prune(model, keep: list[list[int]], a: int) -> None:
    """Keep experts ``keep[l]`` (ids, in the given order) of every MoE layer and route top-``a`` among them, in place."""
    layers = moe_layers(model)
    check_keep(keep, a, layers)
    with torch.no_grad():
        for m, ids in zip(layers, keep):
            idx = torch.tensor(ids, dtype=torch.long)
            if m.carved:
                blk = m.block
                for name in ("expert_gate", "expert_up", "expert_down", "router_gate", "router_up", "router_weight",
                             "scale"):
                    p = getattr(blk, name)
                    setattr(blk, name, torch.nn.Parameter(p.data[idx].clone(), requires_grad=p.requires_grad))
                blk.bias = blk.bias[idx].clone()
                blk.n_routed, blk.top_k = len(ids), a
                continue
            r, e = m.router, m.experts
            r.weight = torch.nn.Parameter(r.weight.data[idx].clone())
            if hasattr(r, "e_score_correction_bias"):
                r.e_score_correction_bias = r.e_score_correction_bias[idx].clone()
                if len(ids) != m.n_experts:  # the kept experts no longer form the original groups
                    r.num_group, r.topk_group = 1, 1
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(e, name)
                setattr(e, name, torch.nn.Parameter(p.data[idx].clone()))
            for obj in (r, e):
                if hasattr(obj, "num_experts"):
                    obj.num_experts = len(ids)
            r.top_k = a
            if hasattr(m.block, "top_k"):
                m.block.top_k = a
