"""One plan per message: which model (task experts), which KV-cache layout, which engine settings, and why.

The session asks :class:`Planner` once per user message, with the message and its prompt token
count, and applies the returned :class:`Plan` in one place. The plan combines:

- **Task experts** (PreMoe TAER: Pei et al., "PreMoe", arXiv 2505.17639, Sec. 3.3). Stored per-task
  patterns (:mod:`edgerun.moe.tcess`) hold a retrieval key (the key MoE layer's TCESS vector). The raw
  message (no chat template) runs through the model only up to the key router, its TCESS vector is
  the query key, the nearest stored key by L2 distance names the task, and the model to run keeps
  only that task's top-b experts per layer, routing top-a. torch reads them from the carved
  checkpoint's expert store (:func:`edgerun.moe.store.select_experts`); llama.cpp runs a GGUF of the
  engine host pruned to the pattern, built by an *assembler* the caller passes in (the runtime
  writes no GGUF itself: ``converters.assemble.GGUFAssembler``, which the CLI passes).
- **KV layout** (KVTuner: Li et al., ICML 2025, Sec. 4: layouts searched offline, chosen online): the
  highest-quality layout whose cache for prompt + reply fits the memory the device budget leaves
  after the *chosen model's* weights. So fewer experts leave room for a more precise cache.
- **Engine settings** fixed at load (threads, context, llama.cpp's KV types).

A plan that changes the model or the layout costs a re-prefill of the conversation (the new model
or layout starts from an empty cache); the plan says so in its reasons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edgerun.errors import UsageError

if TYPE_CHECKING:  # the layout module imports torch; the llama.cpp chat path plans without it
    from edgerun.kv.layout import Layout


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def model_file_bytes(path: str | Path) -> int:
    """Bytes of a model's weight files: a GGUF file's size, or every ``*.safetensors`` under a checkpoint
    directory (an expert store's ``experts/`` included). For float32 checkpoints this is what torch holds
    resident; the planner uses it for a model that is not loaded yet."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*.safetensors"))


# --- the plan -----------------------------------------------------------------------------------------

@dataclass
class ExpertChoice:
    """The task experts chosen for one message (PreMoe TAER).

    Attributes:
        task: retrieved task. distance: L2 distance of the query key to the task's stored key.
        retrieval_ms: time to compute the query key and pick the task, ms.
        assembly_ms: time to build the task's model, ms (0 when cached).
        a, b: experts routed per token / kept per MoE layer.
    """

    task: str
    distance: float
    retrieval_ms: float
    assembly_ms: float
    a: int
    b: int


@dataclass
class KVChoice:
    """The KV-cache layout chosen for one message (KVTuner).

    Attributes:
        layout: the :class:`~edgerun.kv.layout.Layout`. tokens: prompt + reply budget it was sized for.
        kv_bytes: its peak cache bytes at ``tokens``. available_bytes: device budget minus the weights.
        reason: one sentence: why this layout (what the next better one would have needed).
    """

    layout: Layout
    tokens: int
    kv_bytes: int
    available_bytes: int
    reason: str = ""


@dataclass
class Plan:
    """What runs for one message.

    Attributes:
        engine: backend name. model_path: the model to run (the loaded one, or the task's model).
        weights_bytes: bytes of that model's weights. budget_bytes: the device's memory budget (0: none).
        experts: the task-expert choice, or None (no adaptive experts).
        kv: the KV-layout choice, or None (the engine's cache as loaded).
        settings: engine settings fixed at load (threads, context, KV types).
        reasons: one sentence per decision, for ``/stats`` and the API.
        model_changed, kv_changed: differs from the previous message's model / layout (the
            conversation is re-prefilled under it).
    """

    engine: str
    model_path: Path
    weights_bytes: int
    budget_bytes: int
    experts: ExpertChoice | None = None
    kv: KVChoice | None = None
    settings: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    model_changed: bool = False
    kv_changed: bool = False

    def as_dict(self) -> dict:
        """JSON-ready form (paths as strings, the layout by name and average bits)."""
        d = {"engine": self.engine, "model_path": str(self.model_path), "weights_bytes": self.weights_bytes,
             "budget_bytes": self.budget_bytes, "settings": dict(self.settings), "reasons": list(self.reasons),
             "model_changed": self.model_changed, "kv_changed": self.kv_changed,
             "experts": asdict(self.experts) if self.experts else None, "kv": None}
        if self.kv is not None:
            d["kv"] = {"layout": self.kv.layout.name, "average_bits": self.kv.layout.average_bits,
                       "tokens": self.kv.tokens, "kv_bytes": self.kv.kv_bytes,
                       "available_bytes": self.kv.available_bytes, "reason": self.kv.reason}
        return d


# --- task experts (PreMoe TAER) -------------------------------------------------------------------------

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


class Assembler(Protocol):
    """Builds the model a task pattern selects, for an engine that cannot select experts at load.

    ``host(model_dir)`` returns the checkpoint the patterns were made on and the assembled models are
    cut from (e.g. a carved model's Granite host); ``assembler(host, tag, keep, a, record)`` returns the
    path of the model keeping ``keep[layer]`` experts per layer routing top-``a`` (cached by ``tag``).
    """

    def host(self, model_dir: Path) -> Path: ...

    def __call__(self, host: Path, tag: str, keep: list[list[int]], a: int, record: dict) -> Path: ...


# --- KV-cache layout (KVTuner) --------------------------------------------------------------------------

class KVPlanner:
    """The highest-quality KV layout whose cache fits the memory left after the weights.

    Candidates: the layouts given (a ``kv tune`` Pareto front or single files) plus KV16 (unquantized,
    the best quality when it fits). Quality order: KV16, then the search's measured KL to KV16
    (lowest first), then layouts without a measurement by average bits (highest first).

    Args:
        layouts: :class:`~edgerun.kv.layout.Layout` objects, or paths to layout YAMLs / directories of them.
        n_layers, n_kv_heads, head_dim: the model's attention shape.
        budget_bytes: the device's memory budget (``memory_budget_gib`` of a device config, in bytes).
        weights_bytes: resident weight bytes (the default for :meth:`choose`).
        fp_bits: bits of an unquantized K/V value (32 for float32).
        include_kv16: also consider the unquantized cache (for a Pareto front; not for one file).

    Raises:
        UsageError: no layouts. YamlError: a layout for another model.
    """

    def __init__(self, layouts, n_layers: int, n_kv_heads: int, head_dim: int, budget_bytes: int,
                 weights_bytes: int, fp_bits: int = 32, include_kv16: bool = True):
        from edgerun.kv import layout as kvl  # torch: only KV-layout sessions (torch engine) build a KVPlanner

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
        self.budget = int(budget_bytes)
        self.available = int(budget_bytes - weights_bytes)

    def bytes_for(self, layout: Layout, tokens: int) -> int:
        """Peak KV-cache bytes of ``layout`` while it grows to ``tokens`` tokens.

        Per-token caches grow steadily; a KIVI cache peaks just before a block leaves its
        full-precision window, so the last ``group_size`` lengths are checked.
        """
        if layout.mode != "kivi":
            return layout.cache_bytes(tokens, *self.shape, fp_bits=self.fp_bits)
        return max(layout.cache_bytes(n, *self.shape, fp_bits=self.fp_bits)
                   for n in range(max(1, tokens - layout.group_size + 1), tokens + 1))

    def choose(self, tokens: int, available: int | None = None) -> KVChoice:
        """The layout for a message of ``tokens`` tokens (prompt + reply budget), with its reason.

        ``available``: bytes left for the cache (default: budget minus the weights given at construction).

        Raises:
            UsageError: not even the cheapest layout fits (names it and the bytes it needs).
        """
        available = self.available if available is None else int(available)
        for i, lay in enumerate(self.layouts):
            need = self.bytes_for(lay, tokens)
            if need <= available:
                if i:
                    why = f"{self.layouts[i - 1].name} would need {_mib(self.bytes_for(self.layouts[i - 1], tokens))}; "
                else:
                    why = "the best-quality layout fits; "
                reason = (f"KV layout {lay.name} ({lay.average_bits:.2f} average bits): {why}{_mib(need)} for "
                          f"{tokens} tokens fits the {_mib(available)} the device budget leaves after the weights")
                return KVChoice(lay, tokens, need, available, reason)
        cheapest = min(self.layouts, key=lambda x: self.bytes_for(x, tokens))
        raise UsageError(f"the KV cache for {tokens} tokens does not fit: the cheapest layout {cheapest.name} "
                         f"({cheapest.average_bits:.2f} average bits) needs {_mib(self.bytes_for(cheapest, tokens))}, "
                         f"the device budget leaves {_mib(max(available, 0))} after the weights; "
                         "shorten the context (--ctx-size, --max-tokens) or use a device with more memory")

    @classmethod
    def for_backend(cls, backend, layouts, budget_bytes: int, include_kv16: bool = True) -> "KVPlanner":
        """A planner sized for a loaded torch backend's model (its attention shape, weights and dtype)."""
        cfg = backend.model.config
        n_head = cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
        p = next(backend.model.parameters())
        return cls(layouts, cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", n_head), hd, budget_bytes,
                   backend.memory().model_bytes, fp_bits=8 * p.element_size(), include_kv16=include_kv16)


# --- the planner ------------------------------------------------------------------------------------------

class Planner:
    """Makes the one plan per message (see the module docstring). It keeps no state between messages:
    the session passes in what is loaded and the previous plan.

    Args:
        engine: backend name. budget_bytes: the device's memory budget in bytes (0: not checked).
        experts: task-expert retrieval (:class:`edgerun.moe.taer.ExpertPlanner`), or None; its
            ``resident_bytes`` (the retrieval model kept in memory) count against the budget.
        kv: per-message KV layouts, or None.
        settings: engine settings fixed at load (shown in every plan).
    """

    def __init__(self, engine: str, budget_bytes: int, experts=None, kv: KVPlanner | None = None,
                 settings: dict | None = None):
        self.engine, self.budget = engine, int(budget_bytes)
        self.experts, self.kv = experts, kv
        self.settings = dict(settings or {})

    def plan(self, message: str, n_prompt: int, reply_tokens: int, loaded: tuple[Path, int],
             previous: Plan | None = None) -> Plan:
        """The plan for ``message`` whose formatted prompt is ``n_prompt`` tokens, with ``reply_tokens`` of room.

        Args:
            loaded: (path, resident weight bytes) of the model loaded now.
            previous: the plan of the previous message (None for the first, or after ``/clear``).

        Raises:
            UsageError: the chosen model's weights (with the retrieval model) exceed the device budget,
                or no KV layout fits what is left.
        """
        reasons = []
        expert_choice = None
        path, weights = Path(loaded[0]), int(loaded[1])
        resident = 0
        if self.experts is not None:
            expert_choice, path = self.experts.choose(message)
            reasons.append(f"experts: task '{expert_choice.task}' (key distance {expert_choice.distance:.4f}), "
                           f"top-{expert_choice.a} of its {expert_choice.b} experts per layer")
            weights = int(loaded[1]) if path == Path(loaded[0]) else model_file_bytes(path)
            resident = int(getattr(self.experts, "resident_bytes", 0))
        else:
            reasons.append(f"model: {path.name} as loaded")
        if self.budget and weights + resident > self.budget:
            raise UsageError(f"the model's weights ({_mib(weights)}" + (f" + {_mib(resident)} for retrieval" if resident
                             else "") + f") exceed the device budget of {_mib(self.budget)}; use a smaller model or "
                             "variant, or a device with more memory")
        kv_choice = None
        if self.kv is not None:
            kv_choice = self.kv.choose(n_prompt + reply_tokens, available=self.budget - weights - resident)
            reasons.append(kv_choice.reason)
        model_changed = previous is not None and path != previous.model_path
        kv_changed = (previous is not None and kv_choice is not None and previous.kv is not None
                      and kv_choice.layout is not previous.kv.layout)
        if model_changed:
            reasons.append("a new model: the conversation is prefilled into it")
        elif kv_changed:
            reasons.append("a new KV layout: the conversation is re-prefilled under it")
        return Plan(engine=self.engine, model_path=path, weights_bytes=int(weights), budget_bytes=self.budget,
                    experts=expert_choice, kv=kv_choice, settings=dict(self.settings), reasons=reasons,
                    model_changed=model_changed, kv_changed=kv_changed)
