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
  tensors are copied (:func:`edgerun.moe.store.select_experts`, which the runtime uses too).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgerun.atomic import atomic_dir
from edgerun.errors import UsageError
from edgerun.formats import safetensors as st_format
from edgerun.moe.store import MOE_KEY, check_keep

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


def prune_host(host: str | Path, out: str | Path, keep: list[list[int]], a: int, record: dict,
               force: bool = False) -> Path:
    """Prune a Granite-hosted carved model (HF ``granitemoeshared`` checkpoint) to the experts ``keep``.

    Args:
        host: the host checkpoint. out: output directory.
        keep: per layer, the expert ids to keep (all of the same length b).
        a: experts routed per token after pruning.
        record: what to note in ``edgerun_moe.pruned`` (task, pattern file, score).
        force: replace an existing output.

    Returns:
        ``out``: the pruned host (router rows and expert tensors of the kept experts only).

    Raises:
        UsageError: not a host checkpoint; mismatched layers; bad a/b.
    """
    host, out = Path(host), Path(out)
    files = st_format.checkpoint_files(host)
    cfg = st_format.read_config(host)
    if cfg.get("model_type") != "granitemoeshared" or MOE_KEY not in cfg:
        raise UsageError(f"{host} is not the engine host of a carved model")
    check_keep(keep, a, cfg["num_hidden_layers"], cfg["num_local_experts"])
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


def prune_carved(carved: str | Path, out: str | Path, task: str, a: int, b: int, patterns: str | Path | None = None,
                 force: bool = False) -> Path:
    """PEP-prune a carved checkpoint in the expert-store layout to the top-b experts of ``task``, routing top-a.

    The task's TCESS pattern is calibrated on the carved model itself (its exact CMoE routing) and cached,
    or read from ``patterns`` (:func:`edgerun.moe.calibrate.task_pattern`); the kept experts' tensors are
    copied by :func:`edgerun.moe.store.select_experts`. The result is still a carved checkpoint (torch
    engine; ``edgerun export`` hosts it for GGUF/ONNX; ``edgerun recover`` recovers it).

    Args:
        carved: the carved checkpoint. out: output directory (written atomically). task: a built-in task
            or one in ``patterns``. a, b: route top-a of the kept top-b routed experts per layer.

    Returns:
        ``out``.

    Raises:
        UsageError: not a carved checkpoint; no such pattern or one made for another model; bad a/b.
    """
    from edgerun.moe import tcess
    from edgerun.moe.calibrate import task_pattern
    from edgerun.moe.store import is_carved, select_experts

    carved = Path(carved)
    cfg = st_format.read_config(carved)
    if not is_carved(cfg):
        raise UsageError(f"{carved} is not a carved checkpoint in the expert-store layout (edgerun carve makes one)")
    meta = cfg[MOE_KEY]
    check_keep([[0] * b] * cfg["num_hidden_layers"], a, cfg["num_hidden_layers"], meta["routed"])
    pattern, path = task_pattern(carved, task, patterns)
    tcess.check_model(pattern, {"layers": cfg["num_hidden_layers"], "experts": meta["routed"], "top_k": meta["active"],
                                "routing": "carved"})
    return select_experts(carved, out, pattern.keep(b), a,
                          {"task": task, "pattern": str(path), "score": pattern.score}, force=force)
