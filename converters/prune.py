"""PreMoe PEP: keep the top-b routed experts of every MoE layer for a task, route top-a among them.

Pei et al., "PreMoe", arXiv 2505.17639, Sec. 3.2 ("probabilistic expert pruning"): from a task's TCESS
pattern, each layer keeps its b highest-scoring routed experts (b >= a); the router is sliced to
those experts (rows in the same order as the expert tensors) and routes top-a; shared experts and
dense parts are untouched.

Two checkpoint kinds are pruned on disk, tensor by tensor:

- the Granite host of a carved model (what the GGUF/ONNX engines run): router rows and expert
  tensors sliced; the routed down-projections, scaled by k for near-uniform top-k weights
  (:mod:`converters.moe_export`), are rescaled to the new a;
- a carved checkpoint in the expert-store layout (exact CMoE routing, torch): only the kept experts'
  tensors are copied.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from edgerun.atomic import atomic_dir
from edgerun.errors import UsageError
from edgerun.formats import safetensors as st_format
from edgerun.moe.store import MOE_KEY, is_carved, layer_file

_SPEC = re.compile(r"^([A-Za-z0-9_-]+):(\d+)/(\d+)$")


def parse_spec(spec: str) -> tuple[str, int, int]:
    """``TASK:a/b`` -> (task, a, b).

    Raises:
        UsageError: malformed, a < 1 or a > b.
    """
    m = _SPEC.match(spec.strip())
    if not m:
        raise UsageError(f"bad --prune-experts '{spec}'; expected TASK:a/b, e.g. math:2/4")
    task, a, b = m.group(1), int(m.group(2)), int(m.group(3))
    if not 1 <= a <= b:
        raise UsageError(f"--prune-experts {spec}: need 1 <= a <= b")
    return task, a, b


def _check(keep: list[list[int]], a: int, n_layers: int, n_experts: int) -> None:
    b = len(keep[0]) if keep else 0
    if len(keep) != n_layers:
        raise UsageError(f"the pattern covers {len(keep)} MoE layers, the model has {n_layers}")
    if b > n_experts:
        raise UsageError(f"b = {b} exceeds the {n_experts} routed experts per layer")
    if not 1 <= a <= b:
        raise UsageError(f"need 1 <= a <= b, got a = {a}, b = {b}")


def prune_host(host: str | Path, out: str | Path, keep: list[list[int]], a: int, record: dict,
               force: bool = False) -> Path:
    """Prune a Granite-hosted carved model (HF ``granitemoeshared`` checkpoint) to the experts ``keep``.

    Args:
        host: the host checkpoint. out: output directory.
        keep: per layer, the expert ids to keep (all of the same length b).
        a: experts routed per token after pruning.
        record: what to note in ``edgerun_moe.pruned`` (task, pattern file, score).

    Raises:
        UsageError: not a host checkpoint; mismatched layers; bad a/b.
    """
    from safetensors.torch import load_file, save_file

    host, out = Path(host), Path(out)
    files = st_format.checkpoint_files(host)
    cfg = st_format.read_config(host)
    if cfg.get("model_type") != "granitemoeshared" or MOE_KEY not in cfg:
        raise UsageError(f"{host} is not the engine host of a carved model")
    _check(keep, a, cfg["num_hidden_layers"], cfg["num_local_experts"])
    k_old = cfg["num_experts_per_tok"]
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    for i, ids in enumerate(keep):
        idx = torch.tensor(ids, dtype=torch.long)
        p = f"model.layers.{i}.block_sparse_moe."
        state[p + "router.weight"] = state[p + "router.weight"][idx].contiguous()
        state[p + "experts.gate_up_proj"] = state[p + "experts.gate_up_proj"][idx].contiguous()
        # each chosen expert's weight stays ~1: the near-uniform softmax gives 1/a instead of 1/k
        state[p + "experts.down_proj"] = (state[p + "experts.down_proj"][idx] * (a / k_old)).contiguous()
    cfg = dict(cfg)
    cfg["num_local_experts"], cfg["num_experts_per_tok"] = len(keep[0]), a
    cfg[MOE_KEY] = {**cfg[MOE_KEY], "pruned": {**record, "a": a, "b": len(keep[0]), "keep": keep}}
    with atomic_dir(out, force=force) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        for f in host.iterdir():
            if f.is_file() and f.name not in ("config.json",) and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
    return out


def prune_carved(carved: str | Path, out: str | Path, keep: list[list[int]], a: int, record: dict,
                 force: bool = False) -> Path:
    """Prune a carved checkpoint (expert-store layout, exact CMoE routing) to the experts ``keep``.

    Only the kept experts' tensors are read from the store.

    Raises:
        UsageError: not a carved checkpoint; mismatched layers; bad a/b.
    """
    from safetensors.torch import save_file

    from edgerun.moe.store import read_layer

    carved, out = Path(carved), Path(out)
    cfg = st_format.read_config(carved)
    if not is_carved(cfg):
        raise UsageError(f"{carved} is not a carved checkpoint")
    meta = cfg[MOE_KEY]
    _check(keep, a, cfg["num_hidden_layers"], meta["routed"])
    with atomic_dir(out, force=force) as tmp:
        (tmp / "experts").mkdir()
        for i, ids in enumerate(keep):
            t = read_layer(carved, i, experts=ids)
            idx = torch.tensor(ids, dtype=torch.long)
            new = {k: v for k, v in t.items() if not k.startswith("experts.")}
            for k in ("router.gate", "router.up", "router.scale", "router.bias"):
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
