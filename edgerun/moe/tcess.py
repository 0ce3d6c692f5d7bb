"""PreMoe's task-conditioned expert selection score (TCESS) and per-task expert patterns.

PreMoe (Pei et al., "PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval",
arXiv 2505.17639, Sec. 3.2): for MoE layer l, expert j and the calibration tokens X_T of task T,

    TCESS_{l,j}(T) = (1/|X_T|) * sum_{h in X_T} m_j(h),   m_j(h) = contribution of expert j for token h
                                                          if j is among the router's top-k, else 0.

The contribution is selectable (the released code uses the raw logit, and so does the default here,
chosen by measurement: see ``DEFAULT_SCORE``):

- ``raw-logit``: the router logit z_j (as released; it ranks frequently chosen experts with negative
  logits below rarely chosen ones with positive logits);
- ``frequency``: 1 (how often the expert is chosen);
- ``probability``: the router's softmax probability p_j over all experts;
- ``softplus``: softplus(z_j) (a positive, monotone transform of the logit).

One pass collects per layer and expert the top-k counts and the sums of raw logits, probabilities
and softplus(logits) over the chosen tokens, so every score function is available afterwards.
"Router logits" are those of the router the model actually runs with: CMoE's analytical scores under
exact torch routing, the linear router's logits for an engine host, the gate's logits for a standard
MoE (Mixtral, Qwen2-MoE, DeepSeek-style).

A **pattern** (JSON, never pickle) holds, for one task: the statistics, the retrieval key for TAER
and each layer's expert ranking (descending score).

The retrieval key (``key_kind``; the paper's is ``layer``):

- ``layer``: the key layer's TCESS vector (PreMoe's: E numbers, the query runs up to that router);
- ``mass``: every MoE layer's mean normalised expert mass, concatenated (L x E numbers): per token the
  share ``M_j / sum_k M_k`` of expert j's activation mass ``M_j = sum_{i in E_j} |h_i|`` (carved layers;
  for a standard MoE layer the router's softmax probability over all experts stands in), averaged over
  the tokens. The query runs the whole decoder stack on the prompt;
- ``frequency``: every MoE layer's top-k frequency, concatenated (L x E);
- for ``mass`` and ``frequency``, ``key_depth`` > 0 keeps only the first ``key_depth`` MoE layers (the
  query then stops after them: cheaper, see the measurement);
- ``hidden``: the mean input of the key MoE layer (d numbers; the query runs up to that layer).

The default (``DEFAULT_KEY``) is PreMoe's ``layer``: measured on the carved SmolLM2 S2A2E8 with the
fitted router (benchmarks/results/premoe_retrieval.md, 7 tasks x 10 held-out prompts) it finds the
task for 53% of prompts at 63 ms per query; ``mass`` finds 63% but runs the whole stack (2.4 s per
query there, 1 thread on a loaded 2-core machine), over a second, which a chat turn should not wait.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from edgerun.atomic import atomic_file
from edgerun.errors import ModelFileError, UsageError

SCORES = ("raw-logit", "frequency", "probability", "softplus")
# The default from measurement (benchmarks/results/premoe_table.md, carved SmolLM2 S2A2E8, 7 tasks):
# pruning to a/b = 2/3 by each task's own pattern, raw-logit TCESS gave the lowest held-out perplexity
# on all 7 tasks; frequency, probability and softplus rank the experts identically there (CMoE's
# probabilities are nearly tied) and trail by 1-10%.
DEFAULT_SCORE = "raw-logit"
KEYS = ("mass", "layer", "frequency", "hidden")
DEFAULT_KEY = "layer"
DEFAULT_KEY_DEPTH = 0
PATTERN_VERSION = 2


@dataclass
class LayerStats:
    """Sums over the calibration tokens for one MoE layer, per expert (lists of floats, length E).

    ``mass_sum`` (normalised expert mass, see the module doc) is empty in patterns made before it.
    """

    count: list[float]
    logit_sum: list[float]
    prob_sum: list[float]
    softplus_sum: list[float]
    mass_sum: list[float] = field(default_factory=list)


class TcessCollector:
    """Accumulates TCESS statistics for every MoE layer of a model in one pass.

    Args:
        n_layers: MoE layers. n_experts: routed experts per layer. top_k: experts chosen per token.
        key_layer: the MoE layer whose input is summed for the ``hidden`` key.
    """

    def __init__(self, n_layers: int, n_experts: int, top_k: int, key_layer: int = 0):
        self.n_layers, self.n_experts, self.top_k, self.key_layer = n_layers, n_experts, top_k, key_layer
        self.tokens = 0
        zeros = lambda: torch.zeros(n_layers, n_experts, dtype=torch.float64)  # noqa: E731
        self.count, self.logit_sum, self.prob_sum, self.softplus_sum = zeros(), zeros(), zeros(), zeros()
        self.mass_sum = zeros()
        self.hidden_sum: torch.Tensor | None = None
        self._seen_layers: set[int] = set()

    def add(self, layer: int, logits: torch.Tensor, probs: torch.Tensor | None = None,
            selected: torch.Tensor | None = None, mass: torch.Tensor | None = None,
            hidden: torch.Tensor | None = None) -> None:
        """Add one layer's router output for a batch of tokens.

        Args:
            layer: MoE layer index.
            logits: (tokens, E) router logits (float).
            probs: (tokens, E) router probabilities (default softmax of the logits).
            selected: (tokens, top_k) chosen experts (default top-k of the logits).
            mass: (tokens, E) non-negative expert activation mass (default: ``probs``); normalised per token.
            hidden: (tokens, d) the layer's input, summed for the ``hidden`` key at the key layer.
        """
        logits = logits.reshape(-1, logits.shape[-1]).double()
        probs = torch.softmax(logits, dim=-1) if probs is None else probs.reshape(logits.shape).double()
        if selected is None:
            selected = logits.topk(self.top_k, dim=-1).indices
        chosen = torch.zeros_like(logits).scatter_(1, selected.reshape(len(logits), -1), 1.0)
        self.count[layer] += chosen.sum(0)
        self.logit_sum[layer] += (chosen * logits).sum(0)
        self.prob_sum[layer] += (chosen * probs).sum(0)
        self.softplus_sum[layer] += (chosen * F.softplus(logits)).sum(0)
        mass = probs if mass is None else mass.reshape(logits.shape).double()
        self.mass_sum[layer] += (mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)).sum(0)
        if hidden is not None and layer == self.key_layer:
            h = hidden.reshape(len(logits), -1).double().sum(0)
            self.hidden_sum = h if self.hidden_sum is None else self.hidden_sum + h
        if layer == 0:
            self.tokens += len(logits)

    def layer_stats(self) -> list[LayerStats]:
        return [LayerStats(self.count[i].tolist(), self.logit_sum[i].tolist(), self.prob_sum[i].tolist(),
                           self.softplus_sum[i].tolist(), self.mass_sum[i].tolist()) for i in range(self.n_layers)]

    def key(self, kind: str, key_layer: int = 0, score: str = DEFAULT_SCORE, depth: int = 0) -> torch.Tensor:
        """The retrieval key of what was collected (see :func:`key_vector`)."""
        hidden = self.hidden_sum.tolist() if self.hidden_sum is not None else []
        return key_vector(self.layer_stats(), self.tokens, kind, key_layer, score, hidden, depth)


def key_vector(stats: list[LayerStats], tokens: int, kind: str, key_layer: int = 0, score: str = DEFAULT_SCORE,
               hidden_sum: list[float] | None = None, depth: int = 0) -> torch.Tensor:
    """A retrieval key (float64) from per-layer statistics over ``tokens`` tokens (kinds: module doc).

    ``depth`` > 0: ``mass`` and ``frequency`` use the first ``depth`` MoE layers only.

    Returns:
        ``layer``: (E,); ``mass`` and ``frequency``: (L * E,) (L = ``depth`` when given); ``hidden``: (d,).

    Raises:
        UsageError: an unknown kind, or statistics that lack what the kind needs (a pattern made before
            it: calibrate again).
    """
    if kind not in KEYS:
        raise UsageError(f"unknown retrieval key '{kind}'; valid: {', '.join(KEYS)}")
    n = max(tokens, 1)
    if kind == "layer":
        return scores(stats[key_layer], tokens, score)
    if depth > 0:                      # only the all-layer keys are cut to the first layers
        stats = stats[:depth]
    if kind == "frequency":
        return torch.tensor([c for s in stats for c in s.count], dtype=torch.float64) / n
    if kind == "mass":
        if any(not s.mass_sum for s in stats):
            raise UsageError("this pattern has no expert-mass statistics (made before them); calibrate it again "
                             "with 'edgerun experts calibrate'")
        return torch.tensor([c for s in stats for c in s.mass_sum], dtype=torch.float64) / n
    if not hidden_sum:
        raise UsageError("this pattern has no hidden-state statistics; calibrate it again with 'edgerun experts "
                         "calibrate'")
    return torch.tensor(hidden_sum, dtype=torch.float64) / n


def scores(stats: LayerStats, tokens: int, score: str = DEFAULT_SCORE) -> torch.Tensor:
    """TCESS per expert (E,) float64 for one layer under the chosen contribution.

    Raises:
        UsageError: an unknown score function.
    """
    if score not in SCORES:
        raise UsageError(f"unknown score function '{score}'; valid: {', '.join(SCORES)}")
    source = {"raw-logit": stats.logit_sum, "frequency": stats.count, "probability": stats.prob_sum,
              "softplus": stats.softplus_sum}[score]
    return torch.tensor(source, dtype=torch.float64) / max(tokens, 1)


@dataclass
class Pattern:
    """A task's expert pattern.

    Attributes:
        task: task name. tokens: calibration tokens seen.
        model: fingerprint of the model it belongs to (``layers``, ``experts``, ``top_k``, ``name``).
        score: score function. key_layer: the layer of the ``layer`` and ``hidden`` keys.
        stats: per-layer sums (all score functions can be recomputed from them).
        key_kind: the retrieval key (module doc); ``layer`` for patterns made before the others.
        hidden_sum: the key layer's input summed over the tokens (d,), empty when not collected.
        key_depth: MoE layers of the ``mass``/``frequency`` keys (0: all).
    """

    task: str
    tokens: int
    model: dict
    score: str
    key_layer: int
    stats: list[LayerStats] = field(default_factory=list)
    key_kind: str = "layer"
    hidden_sum: list[float] = field(default_factory=list)
    key_depth: int = 0
    version: int = PATTERN_VERSION

    def layer_scores(self, layer: int, score: str | None = None) -> torch.Tensor:
        return scores(self.stats[layer], self.tokens, score or self.score)

    def key(self, score: str | None = None, kind: str | None = None, depth: int | None = None) -> torch.Tensor:
        """Retrieval key of ``kind`` (default the pattern's ``key_kind`` and ``key_depth``; :func:`key_vector`)."""
        return key_vector(self.stats, self.tokens, kind or self.key_kind, self.key_layer, score or self.score,
                          self.hidden_sum, self.key_depth if depth is None else depth)

    def digest(self) -> str:
        """SHA-256 (hex, 16 characters) of the pattern's content: what an assembled model built from it is keyed by."""
        import hashlib

        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def ranking(self, layer: int, score: str | None = None) -> list[int]:
        """Experts of ``layer`` by descending TCESS (ties by expert index)."""
        s = self.layer_scores(layer, score)
        return sorted(range(len(s)), key=lambda j: (-float(s[j]), j))

    def keep(self, b: int, score: str | None = None) -> list[list[int]]:
        """Per layer, the ``b`` experts to keep (ascending ids)."""
        return [sorted(self.ranking(i, score)[:b]) for i in range(len(self.stats))]

    def to_json(self) -> dict:
        d = asdict(self)
        d["rankings"] = [self.ranking(i) for i in range(len(self.stats))]
        d["key_vector"] = self.key().tolist()
        return d


def save(pattern: Pattern, directory: str | Path) -> Path:
    """Write ``<directory>/<task>.json`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{pattern.task}.json"
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(pattern.to_json(), indent=1), encoding="utf-8")
    return path


def load(path: str | Path) -> Pattern:
    """Read a pattern file.

    Raises:
        ModelFileError: unreadable, not JSON, or missing fields (a corrupted pattern).
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        stats = [LayerStats(**s) for s in d["stats"]]
        p = Pattern(task=d["task"], tokens=int(d["tokens"]), model=dict(d["model"]), score=d["score"],
                    key_layer=int(d["key_layer"]), stats=stats, key_kind=str(d.get("key_kind", "layer")),
                    hidden_sum=[float(v) for v in d.get("hidden_sum", [])], key_depth=int(d.get("key_depth", 0)),
                    version=int(d.get("version", 1)))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ModelFileError(f"{path} is not a valid expert pattern ({type(e).__name__}: {e}); "
                             "calibrate it again with 'edgerun experts calibrate'") from None
    if p.score not in SCORES or not 0 <= p.key_layer < len(stats) or p.key_kind not in KEYS or p.key_depth < 0:
        raise ModelFileError(f"{path} is not a valid expert pattern (score {p.score!r}, key layer {p.key_layer}, "
                             f"key {p.key_kind!r})")
    # mass_sum may be empty (patterns made before it); every other list has one number per expert
    values = [v for s in stats for k, v in asdict(s).items() if not (k == "mass_sum" and v == [])]
    widths = {len(v) if isinstance(v, list) else -1 for v in values}
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for v in values
                  for x in (v if isinstance(v, list) else [None]))
    if len(widths) != 1 or widths == {0} or not numbers:
        raise ModelFileError(f"{path} is not a valid expert pattern (per-layer statistics are not equal-length "
                             "lists of numbers); calibrate it again with 'edgerun experts calibrate'")
    return p


def load_dir(directory: str | Path) -> list[Pattern]:
    """Every pattern in a directory, sorted by task name.

    Raises:
        UsageError: no pattern files there.
    """
    files = sorted(Path(directory).glob("*.json"))
    if not files:
        raise UsageError(f"no expert patterns in {directory}; make some with 'edgerun experts calibrate'")
    return [load(f) for f in files]


def check_model(pattern: Pattern, model: dict) -> None:
    """Refuse a pattern made for another model, naming the mismatch.

    Raises:
        UsageError: different number of layers, experts or top-k, or a pattern calibrated on another routing
            (a carved checkpoint's exact routing vs an engine host's or native MoE's router).
    """
    for key in ("layers", "experts", "top_k"):
        if pattern.model.get(key) != model.get(key):
            raise UsageError(f"pattern '{pattern.task}' was made for a model with {key} = {pattern.model.get(key)}, "
                             f"this model has {model.get(key)}")
    made_on, runs = pattern_routing(pattern), model.get("routing")
    if made_on and runs and made_on != runs:
        # e.g. patterns of a carved checkpoint (CMoE router) on its llama.cpp host (fitted linear router):
        # the query key of the other router lands near one stored key whatever the message (one task)
        raise UsageError(f"pattern '{pattern.task}' was made on {_ROUTING[made_on]}, but this engine routes with "
                         f"{_ROUTING[runs]}: their router scores do not match; calibrate the patterns on the model "
                         f"that runs (edgerun experts calibrate {model.get('name') or 'MODEL'} -o DIR)")


_ROUTING = {"carved": "a carved checkpoint's exact CMoE routing (torch)",
            "standard": "a standard MoE router (an engine host or a native MoE)"}


def pattern_routing(pattern: Pattern) -> str | None:
    """``"carved"`` or ``"standard"``: the routing ``pattern`` was calibrated on, or None when unknown.

    Patterns record it (``model["routing"]``); for older patterns it is read from the config of the
    model directory they name, when that still exists.
    """
    routing = pattern.model.get("routing")
    if routing in _ROUTING:
        return routing
    from edgerun.formats.safetensors import read_config
    from edgerun.moe.store import MOE_KEY, is_carved

    name = pattern.model.get("name")
    try:
        cfg = read_config(name) if name else None
    except ModelFileError:
        return None
    if cfg is None:
        return None
    if MOE_KEY in cfg:
        return "carved" if is_carved(cfg) else "standard"
    return "standard" if cfg.get("num_local_experts") else None
