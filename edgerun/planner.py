"""The per-query plan: which experts to load for this message (PreMoe TAER), within the device's budget.

Task-adaptive expert retrieval (Pei et al., "PreMoe", arXiv 2505.17639, Sec. 3.3): stored per-task
patterns (:mod:`edgerun.moe.tcess`) hold a retrieval key (the key MoE layer's TCESS vector). For each
new user message, the raw text (no chat template) runs through the model only up to the key router
(no expert weights are read for a key in the first MoE layer), its TCESS vector is the query key,
the nearest stored key by L2 distance names the task, and the model is rebuilt with only that task's
top-b experts per layer, routing top-a:

- llama.cpp: the engine host of the carved model pruned to the pattern and written as a GGUF at the
  session's type, assembled once per pattern and cached under ``$EDGERUN_HOME/cache/assembled``;
- torch: the carved checkpoint's expert store read selectively (only the kept experts' tensors).

The rebuilt model starts with an empty KV cache, so the conversation is prefilled again into it.
Later issues extend the plan (KV-cache layout).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgerun.errors import UsageError


@dataclass
class Plan:
    """What to run for one message.

    Attributes:
        task: retrieved task. distance: L2 distance of the query key to its pattern's key.
        retrieval_ms: time to compute the query key and pick the task.
        model_path: the model to run. engine: ``llama.cpp`` or ``torch``.
        changed: the previous message used another pattern (the model is rebuilt).
        assembly_ms: time to assemble this pattern's model (0 when cached).
        a, b: experts routed per token / kept per layer.
    """

    task: str
    distance: float
    retrieval_ms: float
    model_path: Path
    engine: str
    changed: bool
    assembly_ms: float
    a: int
    b: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["model_path"] = str(self.model_path)
        return d


def parse_keep(spec: str) -> tuple[int, int]:
    """``a/b`` -> (a, b).

    Raises:
        UsageError: malformed or a < 1 or a > b.
    """
    try:
        a, b = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"bad --keep '{spec}'; expected a/b, e.g. 2/4") from None
    if not 1 <= a <= b:
        raise UsageError(f"--keep {spec}: need 1 <= a <= b")
    return a, b


class ExpertPlanner:
    """Chooses the task pattern for each message and provides the model built for it.

    Args:
        model_dir: a carved checkpoint (expert store) or its engine host checkpoint.
        patterns_dir: stored patterns (``edgerun experts calibrate``), made on the routing that runs:
            the host's for ``engine="llama.cpp"``, the carved model's for ``engine="torch"``.
        a, b: route top-a among the top-b experts per layer.
        engine: ``llama.cpp`` (assembled GGUFs from the host) or ``torch`` (exact CMoE routing).
        quant: GGUF type of assembled models.

    Raises:
        UsageError: a dense model, patterns for another model, bad a/b.
    """

    def __init__(self, model_dir: str | Path, patterns_dir: str | Path, a: int, b: int, engine: str = "llama.cpp",
                 quant: str = "Q8_0", log=None):
        from edgerun.formats.safetensors import read_config
        from edgerun.moe import calibrate as cal
        from edgerun.moe import tcess
        from edgerun.moe.store import MOE_KEY, is_carved

        self.model_dir = Path(model_dir)
        cfg = read_config(self.model_dir)
        if MOE_KEY not in cfg:
            raise UsageError(f"{model_dir} is not a carved mixture of experts; --adaptive-experts needs one "
                             "('edgerun carve')")
        self.engine, self.quant, self.a, self.b = engine, quant, a, b
        self._log = log or (lambda m: None)
        if engine == "llama.cpp" and is_carved(cfg):
            from converters.export import granite_cache

            self.model_dir = granite_cache(self.model_dir, progress=False, log=self._log)
        elif engine == "torch" and not is_carved(cfg):
            raise UsageError("the torch engine runs exact CMoE routing: give the carved checkpoint, not its host")
        self.patterns = tcess.load_dir(patterns_dir)
        self.key_model, self.tokenizer = cal.load_model(self.model_dir)
        fp = {k: v for k, v in _fingerprint(self.key_model).items()}
        for p in self.patterns:
            tcess.check_model(p, fp)
        if b > fp["experts"]:
            raise UsageError(f"--keep {a}/{b}: b exceeds the {fp['experts']} routed experts per layer")
        self.key_layer = self.patterns[0].key_layer
        self.score = self.patterns[0].score
        self.keys = torch.stack([p.key() for p in self.patterns])          # (tasks, experts)
        self.current: str | None = None
        self.last: Plan | None = None

    def retrieve(self, text: str) -> tuple[str, float]:
        """(task, L2 distance) of the stored key nearest to the query key of ``text``."""
        from edgerun.moe.calibrate import query_key

        q = query_key(self.key_model, self.tokenizer, text, self.key_layer, self.score)
        d = torch.linalg.norm(self.keys - q[None, :], dim=1)
        i = int(torch.argmin(d))
        return self.patterns[i].task, float(d[i])

    def plan(self, text: str) -> Plan:
        """Retrieve the task of ``text`` and make sure its model exists (assembling it if needed)."""
        t0 = time.perf_counter()
        task, distance = self.retrieve(text)
        retrieval_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        path = self.model_for(task)
        assembly_ms = (time.perf_counter() - t1) * 1e3
        plan = Plan(task=task, distance=distance, retrieval_ms=retrieval_ms, model_path=path, engine=self.engine,
                    changed=task != self.current, assembly_ms=assembly_ms, a=self.a, b=self.b)
        self.current, self.last = task, plan
        return plan

    def model_for(self, task: str) -> Path:
        """The model pruned to ``task``'s pattern: a cached GGUF (llama.cpp) or pruned store (torch)."""
        from edgerun import catalog

        pattern = next(p for p in self.patterns if p.task == task)
        keep = pattern.keep(self.b)
        tag = f"{self.model_dir.name}-{task}-{self.a}of{self.b}-{pattern.score}"
        root = catalog.home() / "cache" / "assembled"
        record = {"task": task, "score": pattern.score}
        if self.engine == "torch":
            from converters.prune import prune_carved

            out = root / tag
            if not (out / "config.json").is_file():
                self._log(f"assembling the {task} experts ({self.a}/{self.b}) from the expert store")
                prune_carved(self.model_dir, out, keep, self.a, record, force=True)
            return out
        gguf_path = root / f"{tag}-{self.quant}.gguf"
        if not gguf_path.is_file():
            from converters import gguf as gguf_writer
            from converters.prune import prune_host

            self._log(f"assembling a {self.quant} GGUF with the {task} experts ({self.a}/{self.b})")
            host = root / tag
            if not (host / "config.json").is_file():
                prune_host(self.model_dir, host, keep, self.a, record, force=True)
            f32 = root / f"{tag}-F32.gguf"
            gguf_writer.write_f32(host, f32, name=tag, force=True)
            if self.quant == "F32":
                f32.rename(gguf_path)
            else:
                gguf_writer.quantize(f32, gguf_path, self.quant, force=True)
                f32.unlink()
        return gguf_path


def _fingerprint(model) -> dict:
    from edgerun.moe.adapters import fingerprint

    return fingerprint(model)


# --- KV-cache layout per query (KVTuner) -------------------------------------------------------------

@dataclass
class KVPlan:
    """The KV layout chosen for one message.

    Attributes:
        layout: the layout. tokens: prompt + reply budget it was sized for.
        kv_bytes: its packed cache bytes at ``tokens``. available_bytes: device budget minus weights.
        reason: one sentence for ``/stats``. changed: differs from the previous message's layout
            (the conversation is re-prefilled under it).
    """

    layout: object
    tokens: int
    kv_bytes: int
    available_bytes: int
    reason: str
    changed: bool

    def as_dict(self) -> dict:
        return {"kv_layout": self.layout.name, "kv_average_bits": self.layout.average_bits, "kv_tokens": self.tokens,
                "kv_bytes": self.kv_bytes, "kv_available_bytes": self.available_bytes, "kv_reason": self.reason,
                "kv_changed": self.changed}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class KVPlanner:
    """Per query, the highest-quality KV layout whose cache fits the device budget left after the weights.

    Candidates: the layouts given (a ``kv tune`` Pareto front or single files) plus KV16 (unquantized,
    the best quality when it fits). Quality order: KV16, then the search's measured KL to KV16
    (lowest first), then layouts without a measurement by average bits (highest first).

    Args:
        layouts: :class:`~edgerun.kv.layout.Layout` objects, or paths to layout YAMLs / directories of them.
        n_layers, n_kv_heads, head_dim: the model's attention shape.
        budget_bytes: the device's memory budget (``memory_budget_gib`` of a device config, in bytes).
        weights_bytes: resident weight bytes. fp_bits: bits of an unquantized K/V value (32 for float32).

    Raises:
        UsageError: no layouts. YamlError: a layout for another model.
    """

    def __init__(self, layouts, n_layers: int, n_kv_heads: int, head_dim: int, budget_bytes: int,
                 weights_bytes: int, fp_bits: int = 32, include_kv16: bool = True):
        from edgerun.kv import layout as kvl

        loaded = []
        for item in layouts:
            if isinstance(item, kvl.Layout):
                loaded.append(item)
                continue
            item = Path(item)
            files = sorted(item.glob("*.yaml")) if item.is_dir() else [item]
            if item.is_dir() and not files:
                raise UsageError(f"no layout YAML files in {item}")
            loaded += [kvl.load(f, n_layers) for f in files]
        for lay in loaded:
            if len(lay.pairs) != n_layers:
                raise kvl.yf.YamlError(f"KV layout {lay.name!r} is for {len(lay.pairs)} layers, the model has {n_layers}")
        if include_kv16 and not any(lay.average_bits >= 16 for lay in loaded):
            mode = loaded[0].mode if loaded else "per-token"
            loaded.append(kvl.Layout.uniform("KV16", n_layers, mode))
        if not loaded:
            raise UsageError("no KV layouts to plan with")
        self.layouts = sorted(loaded, key=lambda lay: lay.quality)
        self.shape = (n_kv_heads, head_dim)
        self.fp_bits = fp_bits
        self.available = int(budget_bytes - weights_bytes)
        self.current = None

    def bytes_for(self, layout, tokens: int) -> int:
        """Peak KV-cache bytes of ``layout`` while it grows to ``tokens`` tokens.

        Per-token caches grow steadily; a KIVI cache peaks just before a block leaves its
        full-precision window, so the last ``group_size`` lengths are checked.
        """
        if layout.mode != "kivi":
            return layout.cache_bytes(tokens, *self.shape, fp_bits=self.fp_bits)
        return max(layout.cache_bytes(n, *self.shape, fp_bits=self.fp_bits)
                   for n in range(max(1, tokens - layout.group_size + 1), tokens + 1))

    def choose(self, tokens: int) -> KVPlan:
        """The plan for a message of ``tokens`` tokens (prompt + reply budget).

        Raises:
            UsageError: not even the cheapest layout fits (names it and the bytes it needs).
        """
        for lay in self.layouts:
            need = self.bytes_for(lay, tokens)
            if need <= self.available:
                better = [x for x in self.layouts[:self.layouts.index(lay)]]
                if better:
                    why = (f"{better[-1].name} would need {_mib(self.bytes_for(better[-1], tokens))}; ")
                else:
                    why = "the best-quality layout fits; "
                reason = (f"{lay.name} ({lay.average_bits:.2f} average bits): {why}{_mib(need)} for {tokens} tokens "
                          f"fits the {_mib(self.available)} the device budget leaves after the weights")
                changed = self.current is not None and self.current is not lay
                self.current = lay
                return KVPlan(lay, tokens, need, self.available, reason, changed)
        cheapest = min(self.layouts, key=lambda x: self.bytes_for(x, tokens))
        raise UsageError(f"the KV cache for {tokens} tokens does not fit: the cheapest layout {cheapest.name} "
                         f"({cheapest.average_bits:.2f} average bits) needs {_mib(self.bytes_for(cheapest, tokens))}, "
                         f"the device budget leaves {_mib(max(self.available, 0))} after the weights; "
                         "shorten the context (--ctx-size, --max-tokens) or use a device with more memory")

    @classmethod
    def for_backend(cls, backend, layouts, budget_bytes: int, include_kv16: bool = True) -> "KVPlanner":
        """A planner sized for a loaded torch backend's model (its attention shape, weights and dtype).

        ``include_kv16``: also consider the unquantized cache (for a Pareto front; not for one file).
        """
        cfg = backend.model.config
        n_head = cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
        p = next(backend.model.parameters())
        return cls(layouts, cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", n_head), hd, budget_bytes,
                   backend.memory().model_bytes, fp_bits=8 * p.element_size(), include_kv16=include_kv16)
