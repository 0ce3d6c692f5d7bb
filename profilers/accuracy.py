"""The quality protocol every issue measures with: perplexity on held-out calibration text.

Protocol (identical for every backend):

1. Text: the held-out split of a catalog calibration dataset (:mod:`edgerun.data`: the last 20% of
   documents), documents joined by blank lines.
2. Tokens: the model's own tokenizer on that plain text (no special tokens parsed).
3. Windows: consecutive non-overlapping windows of ``window`` tokens (default 512) from the start,
   the first ``n_windows`` of them. Each window is evaluated from an empty KV cache, preceded by BOS
   when the model adds one to prompts.
4. Score: every window token that has context inside the window is scored (all of them after a
   BOS, all but the first otherwise); perplexity = exp(mean negative log-likelihood in nats).

Results always name the model they were measured on; a result on an exported model is reported next
to its source measured in the same run (e.g. "Q4_1-dequantized SmolLM2"), since no format above
about 5 bits can beat a Q4_1 source.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from edgerun import data
from edgerun.errors import UsageError


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


def eval_windows(backend, dataset: str = "wiki", split: str = "heldout", window: int = 512,
                 n_windows: int = 8) -> list[list[int]]:
    """Token windows of the protocol for ``backend``'s tokenizer (BOS included when the model uses it).

    Raises:
        UsageError: the text has fewer than ``n_windows`` full windows, or bad sizes.
    """
    if window < 2 or n_windows < 1:
        raise UsageError("perplexity needs window >= 2 tokens and at least one window")
    tokens = backend.tokenize(data.text(dataset, split))
    available = len(tokens) // window
    if available < n_windows:
        raise UsageError(f"{dataset} ({split}) has {len(tokens)} tokens: {available} windows of {window}, "
                         f"fewer than the {n_windows} asked for")
    prefix = backend.encode_prompt("")  # [BOS] for models that add one, else []
    return [prefix + tokens[i * window:(i + 1) * window] for i in range(n_windows)]


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
        UsageError: too little text for the windows asked for.
    """
    windows = eval_windows(backend, dataset, split, window, n_windows)
    if len(windows[0]) > getattr(backend, "n_ctx", len(windows[0])):
        raise UsageError(f"window of {len(windows[0])} tokens exceeds the model context of {backend.n_ctx}")
    iterator = windows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(windows, desc=f"perplexity {model}", unit="window", leave=False)
    total, count = 0.0, 0
    for w in iterator:
        lp = np.asarray(backend.token_logprobs(w), dtype=np.float64)
        total -= float(lp.sum())
        count += len(lp)
    nll = total / count
    return PerplexityResult(model=model, perplexity=math.exp(nll), nll=nll, tokens_scored=count,
                            windows=len(windows), window=window, dataset=dataset, split=split)
