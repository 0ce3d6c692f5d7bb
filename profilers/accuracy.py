"""The quality protocol every result is measured with: perplexity on held-out calibration text.

Protocol (identical for every backend):

1. Text: the held-out split of a catalog calibration dataset (:mod:`edgerun.data`: the last 20% of
   documents), documents joined by blank lines.
2. Tokens: the model's own tokenizer on that plain text (no special tokens parsed).
3. Windows: consecutive non-overlapping windows of ``window`` tokens (default 512) from the start,
   the first ``n_windows`` of them, each preceded by BOS when the model's tokenizer adds one
   (:func:`edgerun.data.token_windows`, the splitter and BOS rule calibration uses too). Each
   window is evaluated from an empty KV cache.
4. Score: every window token that has context inside the window is scored (all of them after a
   BOS, all but the first otherwise); perplexity = exp(mean negative log-likelihood in nats).

Results always name the model they were measured on; a result on an exported model is reported next
to its source measured in the same run (e.g. "Q4_1-dequantized SmolLM2"), since no format above
about 5 bits can beat a Q4_1 source.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from tqdm import tqdm

from edgerun import data
from edgerun.atomic import atomic_file
from edgerun.errors import UsageError

if TYPE_CHECKING:
    from edgerun.kv.layout import Layout


@dataclass
class PerplexityResult:
    """Perplexity of one model on one text.

    Attributes:
        model: label of the model measured.
        perplexity: exp(mean NLL).
        nll: mean negative log-likelihood, nats/token.
        tokens_scored: number of predictions averaged.
        windows: windows evaluated.
        window: tokens per window.
        dataset, split: where the text came from.
    """

    model: str
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int
    window: int
    dataset: str
    split: str

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(backend, model: str, dataset: str = "wiki", split: str = "heldout", window: int = 512,
               n_windows: int = 8, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``backend`` by the protocol above.

    Args:
        backend: any :class:`edgerun.backends.base.Backend` (its ``token_logprobs`` is used).
        model: label naming what is measured, e.g. ``"SmolLM2-135M Q8_0 GGUF"``.
        dataset, split: catalog calibration dataset and split.
        window: tokens per window; n_windows: windows evaluated.
        progress: show a progress bar.

    Raises:
        UsageError: too little text for the windows asked for, a window below 2 tokens or no window,
            or a window longer than the backend's context.
    """
    if window < 2 or n_windows < 1:
        raise UsageError("perplexity needs window >= 2 tokens and at least one window")
    windows = data.token_windows(backend, dataset, split, window, n_windows)
    if len(windows[0]) > getattr(backend, "n_ctx", len(windows[0])):
        raise UsageError(f"window of {len(windows[0])} tokens exceeds the model context of {backend.n_ctx}")
    iterator = windows
    if progress:
        iterator = tqdm(windows, desc=f"perplexity {model}", unit="window", leave=False)
    total, count = 0.0, 0
    for w in iterator:
        lp = np.asarray(backend.token_logprobs(w), dtype=np.float64)
        total -= float(lp.sum())
        count += len(lp)
    nll = total / count
    return PerplexityResult(model=model, perplexity=math.exp(nll), nll=nll, tokens_scored=count,
                            windows=len(windows), window=window, dataset=dataset, split=split)


# --- task accuracy by log-likelihood of the choices ------------------------------------------------

@dataclass
class TaskResult:
    """Zero-shot multiple-choice accuracy of one model on one task.

    Attributes:
        model, task: labels. n: items scored.
        accuracy: share of items whose gold choice has the highest summed log-likelihood.
        accuracy_norm: the same with log-likelihood divided by the choice's length in bytes
            (favours neither short nor long answers; lm-eval-harness's ``acc_norm``).
        ci95, ci95_norm: Wilson 95% intervals (low, high) of the two.
        chance: accuracy of guessing (1 / number of choices, averaged).
    """

    model: str
    task: str
    n: int
    accuracy: float
    accuracy_norm: float
    ci95: tuple[float, float]
    ci95_norm: tuple[float, float]
    chance: float

    def as_dict(self) -> dict:
        return asdict(self)


def window_nlls(model, windows: Sequence[Sequence[int]]) -> list[float]:
    """Mean next-token NLL of each token window under a transformers causal LM, nats/token.

    For comparing torch models on the same windows (e.g. :func:`edgerun.data.token_windows`) item by item:
    one forward per window (no cache), position t's logits scored against token t + 1.

    Args:
        model: a transformers causal LM (``model(input_ids=...).logits``), in eval mode.
        windows: token id lists, each of 2+ tokens.

    Returns:
        One float per window.
    """
    import torch

    from edgerun.backends.base import log_softmax_at

    out = []
    with torch.inference_mode():
        for w in windows:
            logits = model(input_ids=torch.tensor([list(w)])).logits[0].float().numpy()
            out.append(-float(log_softmax_at(logits[:-1], w[1:]).mean()))
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _continuation_tokens(backend, context: str, choice: str, ctx_plain: list[int]) -> list[int]:
    """Tokens of ``choice`` as they follow ``context`` (tokenized together, so merges at the seam are kept)."""
    full = backend.tokenize(context + choice)
    if full[: len(ctx_plain)] == ctx_plain and len(full) > len(ctx_plain):
        return full[len(ctx_plain):]
    return backend.tokenize(choice)


def task_accuracy(backend, model: str, task: str, n: int = 100, progress: bool = False,
                  max_context: int | None = None) -> TaskResult:
    """Zero-shot accuracy of ``backend`` on ``n`` items of ``task`` (``edgerun.data.TASKS``).

    Each choice is scored by the sum of its tokens' log-probabilities after the context (the
    model's own tokenizer, BOS when the model uses one); contexts longer than ``max_context`` tokens
    (default: the backend's context minus 64) keep their last tokens.

    Raises:
        UsageError: unknown task or too few items.
    """
    items = data.task_items(task, n)
    limit = (max_context or getattr(backend, "n_ctx", 2048) - 64)
    bos = data.bos_prefix(backend)
    hits = hits_norm = 0
    chance = 0.0
    iterator = items
    if progress:
        iterator = tqdm(items, desc=f"{task} {model}", unit="item", leave=False)
    for item in iterator:
        ctx_plain = backend.tokenize(item.context)
        conts = [_continuation_tokens(backend, item.context, c, ctx_plain) for c in item.choices]
        keep = limit - max(len(c) for c in conts) - len(bos)
        ctx = bos + ctx_plain[-keep:]
        scores = [float(lp.sum()) for lp in backend.continuation_logprobs(ctx, conts)]
        norm = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, item.choices)]
        hits += int(max(range(len(scores)), key=scores.__getitem__) == item.gold)
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.gold)
        chance += 1 / len(item.choices)
    return TaskResult(model=model, task=task, n=len(items), accuracy=hits / len(items),
                      accuracy_norm=hits_norm / len(items), ci95=wilson_interval(hits, len(items)),
                      ci95_norm=wilson_interval(hits_norm, len(items)), chance=chance / len(items))


def passkey_retrieval(backend, n: int = 40, chars: int = 2400, seed: int = 0, progress: bool = False) -> dict:
    """Pass-key retrieval (:func:`edgerun.data.passkey_items`), teacher-forced: one forward per item.

    Each item hides a 5-digit key once in ``chars`` characters of held-out text (~600 tokens at 2,400
    characters) and ends with "What is the pass key? The pass key is"; the key (" NNNNN", one token per
    digit with SmolLM2's tokenizer) is appended and the model's next-token distributions are read at
    its positions, through the engine's own cache path (a packed KV layout quantizes the context in
    that forward; in KIVI mode only the last ``window`` tokens stay in full precision, so the key,
    hundreds of tokens back, is read from quantized K/V). Two scores:

    - ``key_nll``: -log p(key | context), nats, summed over the key's tokens (lower is better): a
      continuous score, compared between layouts item by item (:func:`paired_difference`);
    - ``digit_accuracy``: per digit position, whether the true digit has the highest probability of
      the ten digit tokens given the true digits before it (chance 0.1); ``key_accuracy``: all five.

    Generation is not scored: the default model answers "The pass key is" with " a ..." before any
    digits (measured: the first token is " a" on 19 of 20 items), so greedy exact match measures the
    phrasing, not retrieval (it scored 3/30 even with the unquantized cache).

    Args:
        backend: an engine with ``logits(tokens)`` (float32 (len(tokens), vocab)) and ``tokenize``.
        n: items; chars: characters of held-out text per item; seed: item seed (same items for a seed).

    Returns:
        {"task": "passkey", "n", "key_nll" (mean, nats), "key_nll_items" (list, per item),
        "digit_accuracy", "digit_ci95" (Wilson over n x digits), "key_accuracy", "key_ci95" (Wilson),
        "prompt_tokens" (median)}.

    Raises:
        UsageError: held-out text shorter than ``chars`` (from :func:`edgerun.data.passkey_items`).
    """
    import statistics

    from edgerun.backends.base import log_softmax_at

    items = data.passkey_items(n, chars, seed)
    bos = data.bos_prefix(backend)
    digit_ids = {backend.tokenize(str(d))[-1]: d for d in range(10)}
    order = sorted(digit_ids)
    nll, digit_hits, digits, key_hits, lengths = [], 0, 0, 0, []
    iterator = tqdm(items, desc="passkey", unit="item", leave=False) if progress else items
    for item in iterator:
        ctx = bos + list(backend.tokenize(item.context))
        key = list(backend.tokenize(" " + item.key))
        logits = np.asarray(backend.logits(ctx + key))[len(ctx) - 1:len(ctx) + len(key) - 1]
        nll.append(-float(log_softmax_at(logits, key).sum()))
        # softmax is monotone: the digit with the highest logit is the most probable digit
        hits = [order[int(np.argmax(logits[i, order]))] == t for i, t in enumerate(key) if t in digit_ids]
        digit_hits += sum(hits)
        digits += len(hits)
        key_hits += int(bool(hits) and all(hits))
        lengths.append(len(ctx) + len(key))
    return {"task": "passkey", "n": len(items), "key_nll": float(np.mean(nll)), "key_nll_items": nll,
            "digit_accuracy": digit_hits / max(1, digits), "digit_ci95": list(wilson_interval(digit_hits, digits)),
            "key_accuracy": key_hits / len(items), "key_ci95": list(wilson_interval(key_hits, len(items))),
            "prompt_tokens": statistics.median(lengths)}


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = 9999) -> dict:
    """Mean of ``a[i] - b[i]`` over paired items with a 95% bootstrap interval (scipy BCa, paired resampling).

    Used to compare two configurations on the same items (e.g. a KV layout's per-item pass-key NLL
    against KV16's, or against a uniform layout at equal bits): the interval excludes 0 when the
    difference is beyond item-to-item noise.

    Returns:
        {"mean", "ci95" [low, high], "n"}.

    Raises:
        UsageError: different lengths, or fewer than 2 pairs.
    """
    from scipy.stats import bootstrap

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise UsageError(f"paired difference needs two equal-length series of 2+ items, got {a.shape} and {b.shape}")
    d = a - b
    if np.all(d == d[0]):
        return {"mean": float(d[0]), "ci95": [float(d[0]), float(d[0])], "n": len(d)}
    res = bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=resamples, method="BCa",
                    random_state=np.random.default_rng(seed))
    return {"mean": float(d.mean()), "ci95": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
            "n": len(d)}


def bootstrap_mean(x: Sequence[float], seed: int = 0, resamples: int = 9999) -> dict:
    """Mean of ``x`` with a 95% bootstrap interval (scipy BCa), e.g. mean generated tokens per reply.

    Returns:
        {"mean", "ci95" [low, high], "n"}; a constant series has the point interval.

    Raises:
        UsageError: fewer than 2 items.
    """
    from scipy.stats import bootstrap

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise UsageError(f"a bootstrap mean needs a series of 2+ items, got shape {x.shape}")
    if np.all(x == x[0]):
        return {"mean": float(x[0]), "ci95": [float(x[0]), float(x[0])], "n": len(x)}
    res = bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=resamples, method="BCa",
                    random_state=np.random.default_rng(seed))
    return {"mean": float(x.mean()), "ci95": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
            "n": len(x)}


def paired_ratio(a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = 9999) -> dict:
    """``mean(a) / mean(b)`` over paired items with a 95% bootstrap interval (scipy BCa, items resampled in pairs).

    Used for a length ratio on the same prompts (e.g. a merged model's reply tokens over the long
    model's): the interval excludes 1 when the ratio is beyond prompt-to-prompt noise.

    Returns:
        {"ratio", "ci95" [low, high], "n"}; when ``a`` is a constant multiple of ``b`` the point interval.

    Raises:
        UsageError: different lengths, fewer than 2 pairs, or ``mean(b)`` of 0.
    """
    from scipy.stats import bootstrap

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise UsageError(f"a paired ratio needs two equal-length series of 2+ items, got {a.shape} and {b.shape}")
    if b.mean() == 0:
        raise UsageError("a paired ratio needs a denominator series with a non-zero mean")
    ratio = float(a.mean() / b.mean())
    if np.allclose(a, ratio * b, rtol=1e-12, atol=0):
        return {"ratio": ratio, "ci95": [ratio, ratio], "n": len(a)}

    def stat(x, y, axis=-1):
        return np.mean(x, axis=axis) / np.mean(y, axis=axis)

    res = bootstrap((a, b), stat, paired=True, vectorized=True, confidence_level=0.95, n_resamples=resamples,
                    method="BCa", random_state=np.random.default_rng(seed))
    return {"ratio": ratio, "ci95": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
            "n": len(a)}


def kv_front_accuracy(model_dir: str | Path, front: list[Layout], out_dir: str | Path, task: str = "arc-easy",
                   n: int = 100, progress: bool = False) -> list[dict]:
    """Zero-shot log-likelihood accuracy of ``task`` for each KVTuner Pareto layout (and KV16), saved into the YAMLs.

    Returns rows {name, avg_bits, accuracy, ci95}; ``accuracy.json`` in ``out_dir``.

    Raises:
        UsageError: an empty front.
    """
    # heavy (torch + transformers, as the KV layouts are): perplexity on llama.cpp never needs them
    from edgerun.backends.torch import TorchBackend
    from edgerun.kv.layout import Layout

    if not front:
        raise UsageError("no Pareto layouts to score: the search found none under the budget")
    engine = TorchBackend(model_dir)
    rows = []
    for lay in [Layout.uniform("KV16", len(front[0].pairs), front[0].mode)] + list(front):
        engine.set_kv_layout(lay)
        r = task_accuracy(engine, lay.name, task, n, progress=progress)
        rows.append({"name": lay.name, "avg_bits": lay.average_bits, "task": task, "n": r.n,
                     "accuracy": r.accuracy, "ci95": list(r.ci95), "accuracy_norm": r.accuracy_norm})
        if lay.name != "KV16":
            lay.meta[f"{task}_accuracy"] = r.accuracy
            path = next(Path(out_dir).glob(f"pareto-{lay.name.rsplit('-', 1)[-1]}-*.yaml"), None)
            if path is not None:
                lay.save(path)
    with atomic_file(Path(out_dir) / "accuracy.json", force=True) as tmp:
        tmp.write_text(json.dumps(rows, indent=1))
    return rows
