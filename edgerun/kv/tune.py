"""Offline search of layer-wise KV precision layouts (KVTuner, Li et al., ICML 2025, Sec. 4).

Steps, each saved in the output directory so an interrupted search resumes:

1. **Sensitivity**: for every decoder layer i and every quantized pair p (KV8 ... KV2), the
   end-to-end KL divergence ``KL(P_KV16 || P_{layer i at p})`` of the next-token distributions,
   nats/token, with only that layer's K/V quantized (:func:`kl_sensitivity`; layers x pairs short
   teacher-forced forwards on calibration windows, :func:`edgerun.calibration.calibration_windows`).
   KVTuner's Sec. 4.2 measures a layer's attention-output error instead (kept as :func:`sensitivity`);
   on SmolLM2-135M that ranks layers 0 and 24 as the least sensitive while end to end they cost about
   twice as much KL per bit as the rest, so the end-to-end measure is the one the search uses.
2. **Search**, one of:

   - ``dp`` (default): an exact per-layer choice. With the layers' KLs taken as additive (a first-order
     model of small, independent perturbations), dynamic programming over layers gives, for every
     total of bits, the layout with the least summed KL (:func:`dp_front`), so each layer gets its own
     pair and layer 0 can stay precise. ``points`` of these layouts, spread over the average bits up
     to the budget, are then verified by the real evaluator (step 3), which is what the front reports.
   - ``nsga2``: KVTuner's own search (Sec. 4.3-4.4): intra-layer Pareto pruning of the pairs
     (:func:`non_dominated`), k-means clustering of the layers' log-sensitivity profiles into
     ``groups`` (scikit-learn), then Optuna NSGA-II over group assignments with the real evaluator as
     the objective; it makes no additivity assumption, so it is the check of the DP's model.

3. **Evaluation** of a layout: the KL divergence of next-token distributions to the unquantized
   cache on long held-out contexts (windows of ``context`` held-out tokens,
   :func:`edgerun.data.token_windows`: documents concatenated, BOS first when the model uses one) and
   the perplexity, with the constraint average bits <= budget; the uniform layouts are evaluated on
   the same contexts as the baselines. Evaluations are teacher-forced: the whole context runs through
   the packed quantized cache in one forward, which in per-token mode is exactly what incremental
   decoding computes; in KIVI mode the prefill quantizes every token outside the last window at once,
   so early query positions see quantized keys that decoding would still hold in full precision (a
   slightly pessimistic approximation).

Parallel evaluation: every evaluation of a layout (the sensitivity's forwards, the uniform baselines,
the DP's verified layouts, each NSGA-II generation) goes through one function,
``evaluate(spec, layouts) -> results in order``. By default it runs here, one layout after the other
(:class:`LocalEvaluations`); ``edgerun kv tune --cluster`` passes one that spreads the layouts over a
Ray cluster (``profilers/cluster.py``), which rebuilds the same evaluator on each node from an
:class:`EvaluationSpec` (which text, split and windows) and its own copy of the checkpoint. NSGA-II
runs as Optuna's ask/tell, a generation at a time: the trials of a generation are asked in order,
the new layouts among them evaluated together, and the trials told in order, which proposes the same
trials as asking and telling one at a time (the sampler's generation and parents depend only on the
completed trials of earlier generations), so a cluster run gives the local run's front for a seed.

Outputs: ``sensitivity.json``, ``dp.json`` (verified DP layouts) or ``study.journal`` (Optuna
journal storage), ``trials.json``, one layout YAML per Pareto point (``pareto-XX-<bits>b.yaml``),
``front.png`` (KL and perplexity vs average bits, with the uniform layouts) and, if asked, the
front's task accuracy.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from edgerun import data
from edgerun.atomic import atomic_file
from edgerun.calibration import forward_windows
from edgerun.errors import UsageError
from edgerun.kv.cache import MODES, PAIRS, KVSpec, QuantizedKVCache
from edgerun.kv.layout import Layout

QUANT_PAIRS = [p for p in PAIRS if p != "KV16"]
UNIFORM = ("KV8", "K8V4", "KV4", "K4V2", "KV2")


def pair_bits(name: str) -> float:
    """Average bits of a pair: (K bits + V bits) / 2."""
    k, v = PAIRS[name]
    return (k + v) / 2


T = TypeVar("T")


def non_dominated(items: Sequence[T], objectives: Callable[[T], tuple[float, ...]]) -> list[T]:
    """The items no other item dominates, in their order (Pareto front; every objective minimized).

    ``b`` dominates ``a`` when each of b's objectives is <= a's and at least one is <; items with
    equal objectives all stay. ``objectives(item)`` gives the tuple of values (e.g. (average bits,
    error)). KVTuner (Li et al., ICML 2025) uses it twice: intra-layer pruning of (K, V) pairs
    (Sec. 4.3) and the front of the multi-objective search (Sec. 4.4).
    """
    values = [tuple(objectives(x)) for x in items]
    return [x for x, v in zip(items, values)
            if not any(w != v and all(wi <= vi for wi, vi in zip(w, v)) for w in values)]


def _cache_kwarg(module) -> str:
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _forward_logprobs(model, ids: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """log-softmax of the next-token logits, float32 (tokens, vocab), through the layout's packed cache."""
    kw = {}
    if layout is not None:
        kw[_cache_kwarg(model)] = QuantizedKVCache(layout.specs())
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=layout is not None, **kw)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


class Evaluator:
    """Teacher-forced quality of a layout: KL to the unquantized cache and perplexity on long contexts.

    Args:
        model: a transformers causal LM (float32). windows: (1, T) int64 token windows.
    """

    def __init__(self, model, windows: list[torch.Tensor]):
        self.model, self.windows = model, windows
        self.reference = [_forward_logprobs(model, w, None) for w in windows]

    def __call__(self, layout: Layout) -> dict:
        """{'kl': mean KL(P_ref || P_layout) in nats/token, 'ppl': perplexity, 'nll': nats/token}."""
        kl_sum = nll_sum = 0.0
        n_kl = n_nll = 0
        for w, ref in zip(self.windows, self.reference):
            lp = _forward_logprobs(self.model, w, layout)
            kl_sum += float((ref.exp() * (ref - lp)).sum())
            n_kl += lp.shape[0]
            tgt = w[0, 1:]
            nll_sum += float(-lp[:-1].gather(1, tgt[:, None]).sum())
            n_nll += tgt.numel()
        nll = nll_sum / n_nll
        return {"kl": kl_sum / n_kl, "ppl": math.exp(nll), "nll": nll}


@dataclass(frozen=True)
class EvaluationSpec:
    """Which token windows an evaluator scores layouts on: all another process needs, with the checkpoint,
    to rebuild the same :class:`Evaluator` (:func:`edgerun.data.token_windows` of ``dataset``'s ``split``:
    ``count`` windows of ``length`` text tokens, BOS first when the model uses one)."""

    dataset: str
    split: str
    length: int
    count: int

    def windows(self, tokenizer) -> list[torch.Tensor]:
        """The spec's windows as (1, T) int64 tensors, cut by ``tokenizer``."""
        return [torch.tensor([w]) for w in data.token_windows(tokenizer, self.dataset, self.split, self.length,
                                                               self.count)]


Evaluate = Callable[[EvaluationSpec, Sequence[Layout]], Iterable[dict]]
"""``evaluate(spec, layouts)``: each layout's :meth:`Evaluator.__call__` result, in the layouts' order."""


class LocalEvaluations:
    """The default :data:`Evaluate`: one evaluator per spec on a model in this process, layouts one by one.

    Args:
        model: a transformers causal LM (float32). tokenizer: its tokenizer.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._evaluators: dict[EvaluationSpec, Evaluator] = {}

    def evaluator(self, spec: EvaluationSpec) -> Evaluator:
        """The evaluator of ``spec`` (built once: its reference forward runs then)."""
        if spec not in self._evaluators:
            self._evaluators[spec] = Evaluator(self.model, spec.windows(self.tokenizer))
        return self._evaluators[spec]

    def __call__(self, spec: EvaluationSpec, layouts: Sequence[Layout]) -> Iterator[dict]:
        """Yield each layout's quality as it is computed (so a caller can save progress between layouts)."""
        evaluator = self.evaluator(spec)
        for lay in layouts:
            yield evaluator(lay)


# --- sensitivity --------------------------------------------------------------------------------

def sensitivity(model, windows: list[torch.Tensor], mode: str = "per-token", group_size: int = 32,
                window: int = 32, progress: bool = False) -> np.ndarray:
    """Relative attention-output error per (layer, pair): float64 (layers, len(QUANT_PAIRS)).

    Each layer's attention is re-run on its clean inputs with only its own K/V quantized (KVTuner
    Sec. 4.2); errors are averaged over the windows. ``mode``, ``group_size`` and ``window`` are the
    cache's (per-token or KIVI, quantization group, KIVI full-precision window in tokens);
    ``windows``: (1, T) int64 token tensors.
    """
    layers = model.model.layers
    n = len(layers)
    captured: list[list[tuple]] = [[] for _ in range(n)]

    def hook_for(i):
        def pre(module, args, kwargs):
            captured[i].append((args, dict(kwargs)))
        return pre

    def out_hook_for(i):
        def post(module, args, kwargs, output):
            captured[i][-1] = (*captured[i][-1], output[0] if isinstance(output, tuple) else output)
        return post

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.register_forward_pre_hook(hook_for(i), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(out_hook_for(i), with_kwargs=True))
    forward_windows(model, windows, handles)
    errors = np.zeros((n, len(QUANT_PAIRS)))
    kwarg = _cache_kwarg(layers[0].self_attn)
    steps = [(i, j) for i in range(n) for j in range(len(QUANT_PAIRS))]
    if progress:
        steps = tqdm(steps, desc="KV sensitivity", unit="pair", leave=False)
    for i, j in steps:
        k, v = PAIRS[QUANT_PAIRS[j]]
        specs = [KVSpec(16, 16, mode, group_size, window)] * n
        specs = specs[:i] + [KVSpec(k, v, mode, group_size, window)] + specs[i + 1:]
        total = 0.0
        for args, kwargs, clean in captured[i]:
            kw = {**kwargs, kwarg: QuantizedKVCache(specs)}
            with torch.inference_mode():
                out = layers[i].self_attn(*args, **kw)
            out = out[0] if isinstance(out, tuple) else out
            total += float(torch.linalg.norm(out - clean) / torch.linalg.norm(clean).clamp_min(1e-12))
        errors[i, j] = total / len(captured[i])
    return errors


def pareto_pairs(errors: np.ndarray) -> list[str]:
    """KV16 and the quantized pairs of one layer that no other pair dominates on (average bits, error).

    Args:
        errors: float (len(QUANT_PAIRS),) this layer's sensitivity.
    """
    error = dict(zip(QUANT_PAIRS, errors))
    return ["KV16"] + non_dominated(QUANT_PAIRS, lambda p: (pair_bits(p), error[p]))


def kl_sensitivity(model, windows: list[torch.Tensor] | EvaluationSpec, mode: str = "per-token", group_size: int = 32,
                   window: int = 32, progress: bool = False, evaluate: Evaluate | None = None,
                   n_layers: int | None = None) -> np.ndarray:
    """End-to-end sensitivity: KL(P_KV16 || P) in nats/token with only layer i's K/V at pair j.

    Returns float64 (layers, len(QUANT_PAIRS)): the mean over the windows' positions of the KL divergence
    between the next-token distributions of the unquantized cache and of a layout that is KV16 except
    layer i at ``QUANT_PAIRS[j]`` (layers x pairs teacher-forced forwards of every window). ``windows``:
    (1, T) int64 token tensors, or the :class:`EvaluationSpec` of them when ``evaluate`` (an
    :data:`Evaluate`, e.g. a cluster's) computes the layouts; ``mode``, ``group_size`` and ``window`` are
    the cache's. ``model`` may be None with ``evaluate`` and ``n_layers``.
    """
    n = n_layers if n_layers is not None else model.config.num_hidden_layers
    steps = [(i, j) for i in range(n) for j in range(len(QUANT_PAIRS))]
    layouts = []
    for i, j in steps:
        pairs = [PAIRS["KV16"]] * n
        pairs[i] = PAIRS[QUANT_PAIRS[j]]
        layouts.append(Layout(pairs, mode, group_size, window))
    if evaluate is None:
        evaluator = Evaluator(model, windows)
        results: Iterable[dict] = (evaluator(lay) for lay in layouts)
    else:
        results = evaluate(windows, layouts)
    if progress:
        results = tqdm(results, total=len(layouts), desc="KV sensitivity (KL)", unit="forward", leave=False)
    out = np.zeros((n, len(QUANT_PAIRS)))
    for (i, j), q in zip(steps, results):
        out[i, j] = max(0.0, q["kl"])
    return out


def dp_front(kl: np.ndarray, pairs: Sequence[str] | None = None) -> list[tuple[list[str], float]]:
    """Per-layer pairs minimizing the summed KL for every total of bits (additive model; exact DP).

    Args:
        kl: float (layers, len(pairs)) cost of each layer at each pair (e.g. :func:`kl_sensitivity`);
            KV16 is always available at cost 0.
        pairs: names of ``kl``'s columns (default :data:`QUANT_PAIRS`).

    Returns:
        The additive Pareto front: ``(per-layer pair names, predicted summed KL)`` for increasing average
        bits, each with strictly less predicted KL than the one before. Costs are counted in K + V bits
        per layer (integers), so the DP is over at most 32 x layers totals; ties keep the first
        (cheapest, then lexically first) choice.
    """
    pairs = list(QUANT_PAIRS if pairs is None else pairs)
    options = [("KV16", 32, 0.0)]
    n = kl.shape[0]
    best = {0: (0.0, [])}                          # total K+V bits -> (summed KL, choice so far)
    for i in range(n):
        layer = options + [(p, sum(PAIRS[p]), float(kl[i, j])) for j, p in enumerate(pairs)]
        nxt: dict[int, tuple[float, list[str]]] = {}
        for total, (cost, choice) in best.items():
            for name, bits, c in layer:
                key, value = total + bits, cost + c
                if key not in nxt or value < nxt[key][0] - 1e-15:
                    nxt[key] = (value, choice + [name])
        best = nxt
    front, last = [], math.inf
    for total in sorted(best):
        cost, choice = best[total]
        if cost < last - 1e-15:
            front.append((choice, cost))
            last = cost
    return front


def pick_points(front: list[tuple[list[str], float]], budget: float, points: int) -> list[tuple[list[str], float]]:
    """``points`` layouts of a DP front spread over average bits 2 .. ``budget``: for each of ``points``
    evenly spaced targets the layout with the most bits not above it (distinct layouts, cheapest first)."""
    def avg(choice):
        return sum(sum(PAIRS[p]) for p in choice) / (2 * len(choice))

    usable = [f for f in front if avg(f[0]) <= budget + 1e-9]
    if not usable:
        return []
    lo = avg(usable[0][0])
    targets = [lo + (budget - lo) * k / max(1, points - 1) for k in range(points)]
    picked: dict[tuple, tuple[list[str], float]] = {}
    for t in targets:
        under = [f for f in usable if avg(f[0]) <= t + 1e-9]
        if under:
            picked.setdefault(tuple(under[-1][0]), under[-1])
    return sorted(picked.values(), key=lambda f: avg(f[0]))


def cluster_layers(errors: np.ndarray, groups: int, seed: int = 0) -> np.ndarray:
    """Group labels int (layers,): k-means over the layers' log10 sensitivity profiles (scikit-learn)."""
    from sklearn.cluster import KMeans  # heavy; only the search clusters

    feats = np.log10(np.maximum(errors, 1e-8))
    groups = max(1, min(groups, len({tuple(np.round(f, 6)) for f in feats})))
    labels = KMeans(n_clusters=groups, n_init=10, random_state=seed).fit_predict(feats)
    # order groups by mean sensitivity, most sensitive first, so group 0 is stable across runs
    order = np.argsort([-feats[labels == g].mean() for g in range(groups)])
    remap = {int(g): r for r, g in enumerate(order)}
    return np.array([remap[int(g)] for g in labels])


# --- the search ---------------------------------------------------------------------------------

@dataclass
class TuneResult:
    """What a search produced.

    Attributes:
        front: the Pareto layouts, lowest average bits first (``meta`` holds kl, ppl, trial).
        trials: every evaluated trial (dicts: number, avg_bits, kl, ppl, feasible, uniform).
        uniform: the uniform baselines evaluated (name -> {avg_bits, kl, ppl}).
        paths: files written. kv16: the unquantized reference {ppl, nll}.
    """

    front: list[Layout]
    trials: list[dict]
    uniform: dict
    paths: list[Path] = field(default_factory=list)
    kv16: dict = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)
    candidates: list[list[str]] = field(default_factory=list)


def _fingerprint(model_dir: Path, settings: dict) -> str:
    cfg = (model_dir / "config.json").read_bytes() if (model_dir / "config.json").is_file() else b""
    h = hashlib.sha256(cfg + json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def tune(model_dir: str | Path, out_dir: str | Path, budget: float = 4.0, trials: int = 60, population: int = 12,
         mode: str = "per-token", groups: int = 4, group_size: int = 32, window: int = 32, context: int = 2048,
         contexts: int = 2, calib_windows: int = 2, calib_len: int = 512, dataset: str = "wiki", seed: int = 0,
         search: str = "dp", points: int = 24, progress: bool = True, log=print,
         evaluate: Evaluate | None = None, threads: int | None = None) -> TuneResult:
    """Search layer-wise KV layouts for a checkpoint under an average-bits budget (see the module doc).

    Args:
        model_dir: HF checkpoint (dense or a carved MoE). out_dir: results directory (resumable).
        budget: average bits cap, e.g. 4.0 (a resumed search may change it: layouts above the new cap
            leave the front). search: ``dp`` (exact per-layer choice under the additive KL model, then
            ``points`` layouts verified) or ``nsga2`` (KVTuner's grouped NSGA-II).
        trials: NSGA-II: distinct layouts to evaluate (including the seeded uniform layouts; samples over
            the budget or repeated are not evaluated and not counted). population: NSGA-II population.
        groups: NSGA-II: layer groups after clustering. points: DP: layouts verified by the evaluator.
        mode: ``per-token`` or ``kivi``. group_size, window: quantization group and KIVI full-precision
            window (tokens); seed: sampler and clustering seed; dataset: catalog text for calibration
            and evaluation. context, contexts: held-out evaluation windows.
        calib_windows, calib_len: calibration windows of the sensitivity.
        evaluate: computes layouts' quality (an :data:`Evaluate`); None: here, on the model loaded from
            ``model_dir`` (:class:`LocalEvaluations`). With another one (a cluster's), this process loads
            no model: it reads the layer count from ``config.json`` and only runs the search.
        threads: torch threads of the local evaluations (default: the physical cores). Float sums depend
            on how a matmul is split over threads (1 vs 2 threads differ at ~1e-7 relative), so runs
            compare exactly only at the same thread count (a cluster's evaluators use 1 each).

    Raises:
        UsageError: a budget below the cheapest layout (KV2 = 2.0 bits), bad mode or search, or a result
            directory made for another model or other settings.
    """
    from edgerun.backends.torch import TorchBackend  # heavy: only the search needs transformers

    if mode not in MODES:
        raise UsageError(f"unknown KV mode '{mode}'; use one of {', '.join(MODES)}")
    if search not in SEARCHES:
        raise UsageError(f"unknown search '{search}'; use one of {', '.join(SEARCHES)}")
    cheapest = min(pair_bits(p) for p in QUANT_PAIRS)
    if budget < cheapest:
        raise UsageError(f"budget {budget} bits is below the cheapest layout (KV2, {cheapest:.1f} average bits)")
    model_dir, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"mode": mode, "group_size": group_size, "window": window, "context": context,
                "contexts": contexts, "calib_windows": calib_windows, "calib_len": calib_len, "dataset": dataset,
                "sensitivity": "kl"}
    if search == "nsga2":
        settings.update(search="nsga2", groups=groups, seed=seed)
    fp = _fingerprint(model_dir, settings)
    if evaluate is None:
        engine = TorchBackend(model_dir, n_ctx=max(context, calib_len), threads=threads)
        evaluate = LocalEvaluations(engine.model, engine.tokenizer)
        n_layers = engine.model.config.num_hidden_layers
    else:
        from edgerun.kv.layout import model_kv_shape

        n_layers = model_kv_shape(model_dir).layers
    heldout = EvaluationSpec(dataset, "heldout", context, contexts)

    sens_path = out / "sensitivity.json"
    if sens_path.is_file() and json.loads(sens_path.read_text()).get("fingerprint") == fp:
        record = json.loads(sens_path.read_text())
        errors = np.array(record["kl"])
        log(f"sensitivity: reusing {sens_path}")
    else:
        if (out / "study.journal").exists() or (out / "dp.json").exists():
            raise UsageError(f"{out} holds a search made for another model or other settings; use a new directory")
        log(f"sensitivity (KL, one layer quantized at a time) of {n_layers} layers x {len(QUANT_PAIRS)} pairs on "
            f"{calib_windows} x {calib_len} tokens")
        calib = EvaluationSpec(dataset, "calibration", calib_len, calib_windows)   # = calibration_windows(...)
        errors = kl_sensitivity(None, calib, mode, group_size, window, progress=progress, evaluate=evaluate,
                                n_layers=n_layers)
        with atomic_file(sens_path, force=True) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fp, "settings": settings, "pairs": QUANT_PAIRS,
                                       "kl": errors.tolist()}, indent=1))

    log(f"reference (KV16) on {contexts} x {context} held-out tokens")
    uniform_path = out / "uniform.json"
    uniform = json.loads(uniform_path.read_text()) if uniform_path.is_file() else {}
    if uniform.get("fingerprint") != fp:
        uniform = {"fingerprint": fp, "layouts": {}}
    missing = [u for u in ("KV16",) + UNIFORM if u not in uniform["layouts"]]   # the baselines, whatever the budget
    lays = [Layout.uniform(u, n_layers, mode, group_size, window) for u in missing]
    for u, lay, q in zip(missing, lays, evaluate(heldout, lays)):
        uniform["layouts"][u] = {"avg_bits": lay.average_bits, **q}
        with atomic_file(uniform_path, force=True) as tmp:
            tmp.write_text(json.dumps(uniform, indent=1))
    log("uniform: " + ", ".join(f"{u} KL {r['kl']:.2e} PPL {r['ppl']:.3f}" for u, r in uniform["layouts"].items()))

    def layout_of(choice: list[str], name: str = "") -> Layout:
        return Layout([PAIRS[p] for p in choice], mode, group_size, window, name=name)

    if search == "dp":
        rows = _dp_search(errors, lambda lays: evaluate(heldout, lays), layout_of, uniform["layouts"], budget,
                          points, out, progress, log)
        seen = {tuple(r["choice"]) for r in rows}
        for k, u in enumerate(UNIFORM):        # the uniform layouts compete for the front too
            choice = [u] * n_layers
            if tuple(choice) not in seen:
                q = uniform["layouts"][u]
                rows.append({"number": len(rows) + k, "choice": choice, "avg_bits": q["avg_bits"], "kl": q["kl"],
                             "ppl": q["ppl"], "uniform": u})
        labels, candidates = np.arange(n_layers), [["KV16"] + list(QUANT_PAIRS)] * n_layers
    else:
        rows, labels, candidates = _nsga2_search(errors, lambda lays: evaluate(heldout, lays), layout_of,
                                                 uniform["layouts"], budget, trials, population, groups, seed, fp,
                                                 out, progress, log)
    return _write_results(rows, out, candidates, labels, layout_of, uniform["layouts"], budget, mode, errors)


SEARCHES = ("dp", "nsga2")


def _dp_search(errors, evaluate_many, layout_of, uniform: dict, budget: float, points: int, out: Path,
               progress: bool, log) -> list[dict]:
    """The DP front's ``points`` layouts under the budget, each verified by ``evaluate_many`` (layouts ->
    their qualities in order; memoized in ``dp.json`` as they arrive, so an interrupted search resumes);
    rows as :func:`_write_results` takes them."""
    front = dp_front(errors)
    picked = pick_points(front, budget, points)
    memo_path = out / "dp.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    log(f"DP front: {len(front)} layouts, {len(picked)} verified up to {budget} bits"
        + (f" (resuming: {sum(1 for c, _ in picked if ','.join(c) in memo)} done)" if memo else ""))

    def save():
        with atomic_file(memo_path, force=True) as tmp:
            tmp.write_text(json.dumps(memo, indent=1))

    todo = []
    for choice, _ in picked:
        key = ",".join(choice)
        same = [u for u in UNIFORM if all(c == u for c in choice)]
        if key in memo or key in todo:
            continue
        if same:                               # a uniform layout: evaluated already
            memo[key] = {"kl": uniform[same[0]]["kl"], "ppl": uniform[same[0]]["ppl"]}
            save()
        else:
            todo.append(key)
    results = evaluate_many([layout_of(key.split(",")) for key in todo])
    if progress:
        results = tqdm(results, total=len(todo), desc="KV layouts (DP, verified)", unit="layout")
    for key, q in zip(todo, results):
        memo[key] = {"kl": q["kl"], "ppl": q["ppl"]}
        save()
    rows = []
    for number, (choice, predicted) in enumerate(picked):
        key = ",".join(choice)
        lay = layout_of(choice)
        same = [u for u in UNIFORM if all(c == u for c in choice)]
        rows.append({"number": number, "choice": choice, "avg_bits": lay.average_bits, "kl": memo[key]["kl"],
                     "ppl": memo[key]["ppl"], "predicted_kl": predicted, "uniform": same[0] if same else None})
    return rows


def generation_slots(study, sampler, population: int) -> int:
    """Trials left to ask in the NSGA-II generation the next trial joins (a generation holds ``population``).

    Optuna's GA samplers place a new trial in the generation of the latest completed trials while it
    has fewer than ``population`` completed members, else in the next one; trials asked together before
    any is told all join the same generation, so a batch must stop at this count to propose what asking
    and telling one at a time would.
    """
    generation = 0                             # the latest generation with completed trials (enqueued ones have none)
    while sampler.get_population(study, generation + 1):
        generation += 1
    members = len(sampler.get_population(study, generation))
    return population - members if members < population else population


def _nsga2_search(errors, evaluate_many, layout_of, uniform: dict, budget: float, trials: int, population: int,
                  groups: int, seed: int, fp: str, out: Path, progress: bool, log):
    """KVTuner's grouped search: Pareto pairs per layer, k-means groups, Optuna NSGA-II (journal storage,
    resumable), asked and told a generation at a time: the generation's trials are asked in order, its
    new layouts evaluated together by ``evaluate_many`` (layouts -> qualities in order), the trials told
    in order as their results arrive. Returns (rows with per-layer choices, group labels, per-group
    candidates)."""
    import optuna  # heavy: only this search needs it
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    n_layers = errors.shape[0]
    pareto = [pareto_pairs(errors[i]) for i in range(n_layers)]
    labels = cluster_layers(errors, groups, seed)
    n_groups = int(labels.max()) + 1
    candidates = []
    for g in range(n_groups):
        members = [i for i in range(n_layers) if labels[i] == g]
        names = {p for i in members for p in pareto[i]}
        candidates.append(sorted(names, key=lambda p: (pair_bits(p), p)))
    log("groups: " + "; ".join(f"{g}: layers {[i for i in range(n_layers) if labels[i] == g]} -> "
                               f"{'/'.join(candidates[g])}" for g in range(n_groups)))

    def per_layer(choice: list[str]) -> list[str]:
        return [choice[labels[i]] for i in range(n_layers)]

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"kvtuner-{fp}", storage=storage, sampler=sampler,
                                directions=["minimize", "minimize"], load_if_exists=True)

    def evaluated() -> dict:
        """Quality of each distinct layout evaluated so far (choice tuple -> (kl, ppl))."""
        return {tuple(t.params[f"g{g}"] for g in range(n_groups)): (t.values[0], t.user_attrs["ppl"])
                for t in study.trials
                if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("evaluated")}

    memo = evaluated()
    if not study.trials:
        for u in UNIFORM:
            if pair_bits(u) <= budget and all(u in c for c in candidates):
                study.enqueue_trial({f"g{g}": u for g in range(n_groups)}, user_attrs={"uniform": u})

    # trials an interrupted run asked but never told: failed, so the sampler leaves them out
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)

    # --trials counts distinct layouts evaluated: infeasible and repeated samples are free, so they do
    # not use it up (bounded at 10 x trials samples in all, for small search spaces)
    if memo:
        log(f"resuming: {len(memo)} of {trials} trials done")
    asks_left = max(10 * trials - len(study.trials), 1)
    bar = tqdm(total=trials, initial=len(memo), desc="KV search (NSGA-II)", unit="trial") \
        if progress and len(memo) < trials else None
    try:
        while len(memo) < trials and asks_left > 0:
            # ask the generation's trials in order, until it is full or they reach --trials new layouts
            batch, new = [], {}                # new: choice -> index among the layouts to evaluate
            slots = generation_slots(study, sampler, population)
            while len(batch) < slots and asks_left > 0 and len(memo) + len(new) < trials:
                trial = study.ask()
                asks_left -= 1
                choice = tuple(trial.suggest_categorical(f"g{g}", candidates[g]) for g in range(n_groups))
                lay = layout_of(per_layer(list(choice)))
                batch.append((trial, choice, lay))
                if lay.average_bits > budget or choice in memo or choice in new:
                    continue                   # infeasible, or its quality is (or will be) known
                same = [u for u in UNIFORM if all(c == u for c in choice)]
                if same:
                    memo[choice] = (uniform[same[0]]["kl"], uniform[same[0]]["ppl"])
                else:
                    new[choice] = lay
            results = iter(evaluate_many(list(new.values())))
            pending = list(new)                # choices whose results are still to come, in order
            for trial, choice, lay in batch:   # told in order, each as soon as its quality is known
                trial.set_user_attr("avg_bits", lay.average_bits)
                trial.set_constraint("avg_bits", lay.average_bits - budget)   # feasible when <= 0
                if lay.average_bits > budget:  # infeasible: not evaluated (the constraint ranks it last)
                    trial.set_user_attr("evaluated", False)
                    study.tell(trial, (1e3, lay.average_bits))
                    continue
                while choice not in memo:
                    q = next(results)
                    memo[pending.pop(0)] = (q["kl"], q["ppl"])
                trial.set_user_attr("evaluated", True)
                trial.set_user_attr("ppl", memo[choice][1])
                study.tell(trial, (memo[choice][0], lay.average_bits))
                if bar:
                    bar.n = min(len(memo), trials)
                    bar.refresh()
    finally:
        if bar:
            bar.close()
    rows = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE or not t.user_attrs.get("evaluated"):
            continue
        choice = [t.params[f"g{g}"] for g in range(n_groups)]
        rows.append({"number": t.number, "choice": per_layer(choice), "avg_bits": t.user_attrs["avg_bits"],
                     "kl": t.values[0], "ppl": t.user_attrs["ppl"], "uniform": t.user_attrs.get("uniform")})
    return rows, labels, candidates


def _write_results(rows: list[dict], out: Path, candidates, labels, layout_of, uniform: dict, budget: float,
                   mode: str, errors: np.ndarray) -> TuneResult:
    """Keep the evaluated layouts under the budget, write the front's YAMLs, trials.json and front.png."""
    kv16 = uniform["KV16"]
    rows = [r for r in rows if r["avg_bits"] <= budget]   # evaluated under a larger budget by an earlier run
    front_rows = non_dominated(rows, lambda r: (r["avg_bits"], r["kl"]))
    unique = {}
    for r in sorted(front_rows, key=lambda r: (r["avg_bits"], r["kl"], r["number"])):
        unique.setdefault(tuple(r["choice"]), r)
    front_rows = list(unique.values())
    for old in out.glob("pareto-*.yaml"):
        old.unlink()
    front, paths = [], []
    for i, r in enumerate(front_rows):
        lay = layout_of(r["choice"], name=f"{mode}-pareto-{i:02d}")
        lay.meta = {"kl": r["kl"], "ppl": r["ppl"], "kv16_ppl": kv16["ppl"], "trial": r["number"], "budget": budget,
                    "groups": [int(x) for x in labels]}
        if "predicted_kl" in r:
            lay.meta["predicted_kl"] = r["predicted_kl"]
        path = lay.save(out / f"pareto-{i:02d}-{lay.average_bits:.2f}b.yaml")
        front.append(lay)
        paths.append(path)
    record = {"mode": mode, "budget": budget, "kv16": kv16, "groups": [int(x) for x in labels],
              "candidates": candidates, "sensitivity_kl": errors.tolist(), "trials": rows,
              "front": [r["number"] for r in front_rows], "uniform": uniform}
    with atomic_file(out / "trials.json", force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    paths.append(out / "trials.json")
    png = plot_front(rows, front_rows, uniform, out / "front.png", f"KV layouts ({mode}), budget {budget} bits")
    paths.append(png)
    return TuneResult(front, rows, uniform, paths, kv16, [int(x) for x in labels], candidates)


def plot_front(rows: list[dict], front_rows: list[dict], uniform: dict, path: Path, title: str) -> Path:
    """PNG of KL (left) and perplexity (right) vs average bits: all trials, the front, uniform layouts."""
    import matplotlib  # heavy; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "kl", "KL to KV16 (nats/token)"), (axes[1], "ppl", "perplexity")):
        ax.scatter([r["avg_bits"] for r in rows], [r[key] for r in rows], s=10, c="0.7", label="trials")
        fr = sorted(front_rows, key=lambda r: r["avg_bits"])
        ax.plot([r["avg_bits"] for r in fr], [r[key] for r in fr], "o-", c="C0", label="Pareto front")
        us = [(u, r) for u, r in uniform.items() if u != "KV16" and (key != "kl" or r[key] > 0)]
        ax.scatter([r["avg_bits"] for _, r in us], [r[key] for _, r in us], marker="s", c="C3", label="uniform")
        for u, r in us:
            ax.annotate(u, (r["avg_bits"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "ppl":
            ax.axhline(uniform["KV16"]["ppl"], c="k", lw=0.8, ls="--", label="KV16")
            ax.axhline(uniform["KV16"]["ppl"] * 1.01, c="k", lw=0.5, ls=":", label="KV16 +1%")
        else:
            ax.set_yscale("log")
        ax.set_xlabel("average bits (K and V, scales not counted)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
