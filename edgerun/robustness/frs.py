"""FRS: fuzzed randomized smoothing, certified robustness of a text classifier to backdoor triggers.

Method: He et al., "Certifying Language Model Robustness with Fuzzed Randomized Smoothing: An
Efficient Defense Against Backdoor Attacks", ICLR 2025 (arXiv 2502.06892). No code was published;
what follows is built from the paper's equations as quoted in its OpenReview discussion, and the parts
the sources leave open are reconstructions, marked **[reconstructed]** here and in ``docs/certify.md``.

Units: a *token* of the certificate is a whitespace-separated word of the input (SST-2 is stored
tokenized, so words are its tokens); edit distances count word edits.

1. **Fuzzed text randomization (FTR, Sec. 4.3).** A Monte-Carlo tree search over spans of the input,
   root = the whole text, children = finer spans (coarse to fine), UCT selection. A simulation
   mutates the node's span with random Damerau-Levenshtein edits (delete, substitute, insert,
   transpose adjacent words), at most ``max_edits`` (the threshold Lambda), and its reward is
   ``KL(P(y | mutant) || P(y | input))`` (Eqs. 8-10). The best-scoring spans are the vulnerable area;
   words inside it are randomized with probability omega_H, words outside with omega_L (Eqs. 11/13).
   [reconstructed]: the children of a span (two halves and, for 4+ words, the middle half), the
   reward squashing ``1 - exp(-KL)`` for UCT, the batched search with virtual visits, the area rule
   (the union of the spans whose mean KL is at least ``keep`` times the best, up to ``max_area`` of the
   words), and the
   randomization operation (deletion, or masking with ``"_"``); the paper's linguistically guided
   expansion is not reproduced.
2. **Parameter smoothing (BMPS, Sec. 4.2, Eq. 5).** K copies ``theta_k = theta + eps_k`` with
   ``eps_k ~ N(0, sigma^2 I)`` on every parameter of the top-H decoder layers (K = 20, sigma = 0.01,
   H = 10). Copies are regenerated from their seeds (:func:`noise_seeds`) into one working copy of
   the top layers, never stored; the stored weights are not touched. The lower layers are shared:
   their activations are computed once per distinct randomized input and reused by every copy.
3. **Certification (Sec. 4.4, Theorem 1, Corollary 1).** Copy k classifies randomized input x_k;
   the majority class c_A with n_A of K votes; ``p_A >= Beta(alpha; n_A, K - n_A + 1)``
   (Clopper-Pearson, one-sided 1 - alpha); a trigger of r words survives the randomization with
   probability ``Delta = 1 - omega^r``, and the radius is the largest r with
   ``p_A_lower - beta * Delta > 1/2`` [reconstructed: the RanMASK-style form of the condition,
   beta = 1], i.e. ``R_r = log(1 - (p_A_lower - 1/2) / beta) / (L * log omega)`` as a share of the L
   words. FRS's certificate uses omega_H: it holds *if the trigger lies inside the vulnerable area*
   (Corollary 1: ``R_new / R_old = log omega_M / log omega_H``); the unconditional radius, with omega_L,
   is reported beside it.

The uniform baseline (RanMASK/TextGuard-style: no search, omega_M on every word) runs through the same
code with ``FRSConfig(fuzz=False)``.
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from edgerun.errors import UsageError

MASK_WORD = "_"
MIN_KL = 1e-4            # nats: a span whose mutations move the prediction less is not vulnerable
RANDOMIZE_OPS = ("delete", "mask")


# --- certification arithmetic ---

def clopper_pearson_lower(n_a: int, n: int, alpha: float = 0.05) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion: ``Beta(alpha; n_a, n - n_a + 1)``.

    The p at which ``P(X >= n_a) = alpha`` for X ~ Binomial(n, p); 0 when ``n_a == 0``.

    Raises:
        UsageError: counts outside ``0 <= n_a <= n``, ``n >= 1``, or alpha outside (0, 1).
    """
    from scipy.stats import beta as beta_dist  # heavy: scipy.stats

    if n < 1 or not 0 <= n_a <= n:
        raise UsageError(f"need 0 <= n_a <= n and n >= 1, got n_a={n_a}, n={n}")
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    return 0.0 if n_a == 0 else float(beta_dist.ppf(alpha, n_a, n - n_a + 1))


def certified_radius(p_a_lower: float, n_words: int, omega: float, beta: float = 1.0) -> tuple[float, int]:
    """Certified radius against a trigger of r words randomized with probability ``omega`` each.

    Theorem 1 (trigger survival ``Delta = 1 - omega^r``) with the condition ``p_A_lower - beta * Delta > 1/2``
    [reconstructed, RanMASK-style]. Returns ``(R_r, r)``: ``R_r`` the share of the ``n_words`` words
    (``log(1 - (p_A_lower - 1/2) / beta) / (n_words * log omega)``, continuous, the paper's radius) and
    ``r`` the largest whole number of word edits certified. ``(-1.0, -1)`` when ``p_A_lower <= 1/2``
    (no certificate: the smoothed classifier abstains).

    Raises:
        UsageError: omega outside (0, 1), beta <= 0, n_words < 1.
    """
    if not 0 < omega < 1:
        raise UsageError(f"omega must be in (0, 1), got {omega}")
    if beta <= 0 or n_words < 1:
        raise UsageError(f"need beta > 0 and n_words >= 1, got beta={beta}, n_words={n_words}")
    margin = (p_a_lower - 0.5) / beta
    if margin <= 0:
        return -1.0, -1
    if margin >= 1:
        return math.inf, n_words
    edits = math.log(1 - margin) / math.log(omega)       # survival bound met with equality
    whole = math.ceil(edits) - 1 if edits == math.ceil(edits) else math.floor(edits)  # strict inequality
    return edits / n_words, max(0, min(whole, n_words))


def radius_ratio(omega_m: float, omega_h: float) -> float:
    """Corollary 1 (Eq. 18): how much larger the radius is with omega_H on the trigger than omega_M everywhere."""
    return math.log(omega_m) / math.log(omega_h)


# --- Damerau-Levenshtein edits over words ---

def damerau_levenshtein(a: Sequence[str], b: Sequence[str]) -> int:
    """Damerau-Levenshtein distance between two word sequences: the fewest insertions, deletions,
    substitutions and transpositions of adjacent words turning ``a`` into ``b`` (the unrestricted
    distance, a metric, computed with Lowrance and Wagner's algorithm)."""
    inf = len(a) + len(b)
    last_row: dict[str, int] = {}
    d = [[inf] * (len(b) + 2) for _ in range(len(a) + 2)]
    for i in range(len(a) + 1):
        d[i + 1][1] = i
    for j in range(len(b) + 1):
        d[1][j + 1] = j
    for i in range(1, len(a) + 1):
        last_col = 0
        for j in range(1, len(b) + 1):
            k, l = last_row.get(b[j - 1], 0), last_col
            cost = 0 if a[i - 1] == b[j - 1] else 1
            if cost == 0:
                last_col = j
            d[i + 1][j + 1] = min(d[i][j] + cost, d[i + 1][j] + 1, d[i][j + 1] + 1,
                                  d[k][l] + (i - k - 1) + 1 + (j - l - 1))
        last_row[a[i - 1]] = i
    return d[len(a) + 1][len(b) + 1]


def mutate_span(words: Sequence[str], start: int, end: int, max_edits: int, rng: np.random.Generator) -> list[str]:
    """``words`` with 1..``max_edits`` random word edits inside ``[start, end)``: delete, substitute (with
    :data:`MASK_WORD`), insert (:data:`MASK_WORD`) or transpose two adjacent words.

    Every edit stays inside the (shrinking or growing) span, so the mutant is within Damerau-Levenshtein
    distance ``max_edits`` of ``words`` and differs from it only there.
    """
    out = list(words)
    n_edits = int(rng.integers(1, max(1, min(max_edits, end - start)) + 1))
    for _ in range(n_edits):
        width = end - start
        ops = ["insert"] + (["delete", "substitute"] if width >= 1 else []) + (["transpose"] if width >= 2 else [])
        op = ops[int(rng.integers(len(ops)))]
        if op == "insert":
            out.insert(start + int(rng.integers(width + 1)), MASK_WORD)
            end += 1
        elif op == "delete":
            del out[start + int(rng.integers(width))]
            end -= 1
        elif op == "substitute":
            i = start + int(rng.integers(width))
            out[i] = MASK_WORD if out[i] != MASK_WORD else "."
        else:
            i = start + int(rng.integers(width - 1))
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


# --- vulnerable-area search (MCTS over spans) ---

@dataclass
class _Node:
    start: int
    end: int
    visits: int = 0
    value: float = 0.0          # sum of squashed rewards 1 - exp(-KL), for UCT
    kl: float = 0.0             # sum of KL rewards, for the area
    children: list["_Node"] | None = None

    def split(self) -> list["_Node"]:
        n = self.end - self.start
        if n <= 1:
            return []
        mid = self.start + n // 2
        kids = [_Node(self.start, mid), _Node(mid, self.end)]
        if n >= 4:
            kids.append(_Node(self.start + n // 4, self.end - n // 4))
        return kids


@dataclass(frozen=True)
class Span:
    """A vulnerable span: words ``[start, end)``, its mean KL reward and how often it was simulated."""

    start: int
    end: int
    score: float
    visits: int


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` in nats along the last axis, for probability tensors ``[..., C]``."""
    eps = 1e-12
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)


def find_vulnerable_spans(words: Sequence[str], probs: Callable[[list[list[str]]], torch.Tensor],
                          budget: int = 48, c: float = 1.0, max_edits: int = 3, keep: float = 0.8,
                          max_area: float = 0.3, batch: int = 8, seed: int = 0,
                          base: torch.Tensor | None = None) -> tuple[list[Span], int]:
    """Monte-Carlo tree search for the spans whose mutation moves the class distribution most (Sec. 4.3.1).

    Args:
        words: the input's words (L >= 1).
        probs: maps a list of word lists to class probabilities, float ``[n, C]`` (the unsmoothed classifier).
        budget: simulations. c: UCT exploration constant. max_edits: Damerau-Levenshtein threshold Lambda
            of a mutation (word edits). keep, max_area: the area is the union of the visited spans whose
            mean KL is at least ``keep`` times the best one's, best first, up to ``max_area`` of the words
            (at least one word); none when no mutation moved the prediction. batch: simulations evaluated per forward (leaves
            chosen with virtual visits). seed: the search's random generator. base: ``probs([words])[0]``
            if already known.

    Returns:
        ``(spans, n_queries)``: the vulnerable area as maximal runs of words (:class:`Span`, sorted by position,
        scored by the best node inside),
        and the number of classifier queries made (``budget``, plus one without ``base``).
    """
    n = len(words)
    rng = np.random.default_rng(seed)
    queries = 0
    if base is None:
        base = probs([list(words)])[0]
        queries += 1
    root = _Node(0, n)
    nodes = [root]
    done = 0
    while done < budget:
        leaves, mutants = [], []
        for _ in range(min(batch, budget - done)):
            path, node = [root], root
            while True:
                if node.children is None and node.visits > 0:
                    node.children = node.split()
                    nodes.extend(node.children)
                if not node.children:
                    break
                unvisited = [ch for ch in node.children if ch.visits == 0]
                if unvisited:
                    node = unvisited[0]
                else:
                    log_n = math.log(node.visits)
                    node = max(node.children, key=lambda ch: ch.value / ch.visits + c * math.sqrt(log_n / ch.visits))
                path.append(node)
                if node.visits == 0:
                    break
            for nd in path:
                nd.visits += 1                  # virtual visit until the batch is scored
            leaves.append(path)
            mutants.append(mutate_span(words, node.start, node.end, max_edits, rng))
        kls = kl_divergence(probs(mutants), base.unsqueeze(0)).clamp_min(0).tolist()
        queries += len(mutants)
        done += len(mutants)
        for path, kl in zip(leaves, kls):
            for nd in path:
                nd.value += 1 - math.exp(-kl)
                nd.kl += kl
    cap = max(1, int(max_area * n))
    ranked = sorted((nd for nd in nodes if nd.visits > 0 and nd.end - nd.start <= cap),
                    key=lambda nd: (-nd.kl / nd.visits, nd.end - nd.start, nd.start))
    if not ranked or ranked[0].kl / ranked[0].visits <= MIN_KL:
        return [], queries                       # nothing moves the prediction: no vulnerable area
    best = ranked[0].kl / ranked[0].visits
    covered: set[int] = set()
    for nd in ranked:
        if nd.kl / nd.visits < keep * best:
            break
        if len(covered | set(range(nd.start, nd.end))) <= cap:
            covered |= set(range(nd.start, nd.end))
    # the area as maximal runs of covered words, each scored by the best node inside it
    spans, run = [], []
    for i in range(n + 1):
        if i < n and i in covered:
            run.append(i)
        elif run:
            inner = [nd for nd in ranked if run[0] <= nd.start and nd.end <= run[-1] + 1]
            top = max(inner, key=lambda nd: nd.kl / nd.visits)
            spans.append(Span(run[0], run[-1] + 1, top.kl / top.visits, sum(nd.visits for nd in inner)))
            run = []
    return spans, queries


# --- text randomization ---

def randomize(words: Sequence[str], in_area: Sequence[bool], omega_in: float, omega_out: float,
              rng: np.random.Generator, op: str = "delete") -> list[str]:
    """Each word randomized independently: with probability ``omega_in`` inside the area, ``omega_out``
    outside (Eqs. 11/13). ``op``: ``"delete"`` drops the word, ``"mask"`` replaces it by :data:`MASK_WORD`."""
    draws = rng.random(len(words))
    hit = draws < np.where(np.asarray(in_area, dtype=bool), omega_in, omega_out)
    if op == "delete":
        return [w for w, h in zip(words, hit) if not h]
    return [MASK_WORD if h else w for w, h in zip(words, hit)]


# --- parameter smoothing ---

def noise_seeds(seed: int, k: int) -> list[int]:
    """The K seeds of the noisy copies (64-bit, from numpy's SeedSequence of ``seed``): all that is kept of them."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(k, dtype=np.uint64)]


class ParameterSmoother:
    """Noisy copies ``theta + eps_k`` of a classifier's top-H decoder layers, regenerated from seeds (Eq. 5).

    One working copy of the top layers is kept (its bytes: :attr:`working_bytes`); :meth:`layers` fills
    it with copy k's weights. The classifier's own layers are never modified.

    Raises:
        UsageError: ``top_layers`` outside 1..n_layers, sigma < 0.
    """

    def __init__(self, classifier, top_layers: int, sigma: float, seed: int = 0):
        if not 1 <= top_layers <= classifier.n_layers:
            raise UsageError(f"top layers H must be in 1..{classifier.n_layers}, got {top_layers}")
        if sigma < 0:
            raise UsageError(f"sigma must be >= 0, got {sigma}")
        self.n_lower = classifier.n_layers - top_layers
        self.sigma, self.seed = sigma, seed
        self.source = classifier.layers[self.n_lower:]
        self.work = copy.deepcopy(self.source) if sigma > 0 else self.source
        self.working_bytes = sum(p.numel() * p.element_size() for p in self.work.parameters()) if sigma > 0 else 0

    @torch.no_grad()
    def layers(self, k_seed: int):
        """The top layers of the copy with noise seed ``k_seed`` (the unperturbed layers when sigma is 0)."""
        if self.sigma == 0:
            return self.source
        gen = torch.Generator().manual_seed(k_seed)
        for src, dst in zip(self.source.parameters(), self.work.parameters()):
            noise = torch.randn(src.shape, generator=gen, dtype=torch.float32)
            dst.copy_(src.float() + self.sigma * noise)
        return self.work


# --- the certifier ---

@dataclass(frozen=True)
class FRSConfig:
    """Settings of one certifier. Defaults: the paper's K, sigma, H and Corollary 1's omega example.

    Attributes:
        k: noisy copies / randomized passes (K). sigma: parameter noise std (0 turns parameter
            smoothing off). top_layers: H. fuzz: run the MCTS (False: the uniform baseline, omega_M
            everywhere). omega_h, omega_l, omega_m: randomization probabilities inside / outside the
            vulnerable area, and of the uniform baseline. alpha: 1 - confidence of the bound. beta:
            the certificate's constant. budget, c, max_edits, keep, max_area: the MCTS
            (:func:`find_vulnerable_spans`). op: ``"delete"`` or ``"mask"``. seed: noise, randomization
            and search seeds derive from it.
    """

    k: int = 20
    sigma: float = 0.01
    top_layers: int = 10
    fuzz: bool = True
    omega_h: float = 0.8
    omega_l: float = 0.1
    omega_m: float = 0.5
    alpha: float = 0.05
    beta: float = 1.0
    budget: int = 48
    c: float = 1.0
    max_edits: int = 3
    keep: float = 0.8
    max_area: float = 0.3
    op: str = "delete"
    seed: int = 0

    def validate(self) -> "FRSConfig":
        """Raises UsageError naming the first setting out of range."""
        checks = [
            (1 <= self.k <= 10_000, f"K must be in 1..10000, got {self.k}"),
            (0 <= self.sigma <= 0.1, f"sigma must be in [0, 0.1] (noise on weights of about that size "
                                     f"destroys the model), got {self.sigma}"),
            (self.top_layers >= 1, f"top layers H must be at least 1, got {self.top_layers}"),
            (all(0 < w < 1 for w in (self.omega_h, self.omega_l, self.omega_m)),
             "omega_h, omega_l and omega_m must be in (0, 1)"),
            (self.omega_l <= self.omega_m <= self.omega_h,
             f"need omega_l <= omega_m <= omega_h, got {self.omega_l}, {self.omega_m}, {self.omega_h}"),
            (0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}"),
            (self.beta > 0, f"beta must be > 0, got {self.beta}"),
            (self.budget >= 1 and self.max_edits >= 1, "MCTS budget and max edits must be at least 1"),
            (0 < self.keep <= 1, f"keep must be in (0, 1], got {self.keep}"),
            (0 < self.max_area <= 1, f"max area must be in (0, 1], got {self.max_area}"),
            (self.c >= 0, f"UCT constant must be >= 0, got {self.c}"),
            (self.op in RANDOMIZE_OPS, f"randomization op must be one of {', '.join(RANDOMIZE_OPS)}, got {self.op}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self


@dataclass
class Certificate:
    """The certified prediction for one input.

    Attributes:
        label: majority class index; label_name: its name. votes: per-class vote counts (sum K).
        p_a_lower: Clopper-Pearson lower bound on the majority class probability.
        certified: ``p_a_lower - beta * (1 - omega^0) > 1/2``, i.e. p_a_lower > 1/2.
        radius: certified radius as a share of the words (-1 when not certified); radius_edits: in
            whole word edits. With FRS these hold if the trigger lies inside the vulnerable area (omega_H);
            radius_unconditional / radius_unconditional_edits use omega_L (the trigger outside it).
            For the uniform baseline the two coincide (omega_M).
        spans: the vulnerable area as ``[start, end)`` word indices with their mean KL and visits, and
            ``area_words`` its words. n_words: L; truncated: the input was cut to fit the classifier.
        base_label: the unsmoothed classifier's prediction on the unperturbed input.
        mcts_ms, passes_ms, total_ms: wall time of the search, of this input's share of the K passes
            (lower layers, noise and top layers), and both; queries: classifier calls of the search.
    """

    text: str
    label: int
    label_name: str
    votes: list[int]
    p_a_lower: float
    certified: bool
    radius: float
    radius_edits: int
    radius_unconditional: float
    radius_unconditional_edits: int
    spans: list[dict] = field(default_factory=list)
    area_words: list[str] = field(default_factory=list)
    n_words: int = 0
    truncated: bool = False
    base_label: int = -1
    mcts_ms: float = 0.0
    passes_ms: float = 0.0
    total_ms: float = 0.0
    queries: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _text_seed(seed: int, words: Sequence[str]) -> int:
    return zlib.crc32(" ".join(words).encode("utf-8")) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def certify(classifier, texts: Sequence[str], config: FRSConfig = FRSConfig(), *,
            spans: Sequence[list[Span]] | None = None, notify: Callable[[str], None] | None = None,
            batch: int = 32) -> list[Certificate]:
    """Certify each text with FRS (or the uniform baseline, ``config.fuzz=False``).

    Args:
        classifier: a :class:`edgerun.robustness.classifier.TextClassifier`.
        texts: inputs (non-empty after stripping); words beyond the classifier's ``max_tokens`` are cut
            (``Certificate.truncated``, and ``notify`` is told).
        config: the certifier's settings (validated).
        spans: precomputed vulnerable areas, one per text (skips the search; a benchmark reuses them
            across certifiers); None: searched here when ``config.fuzz``.
        batch: sequences per forward.

    Returns:
        One :class:`Certificate` per text, in order.

    Raises:
        UsageError: an empty text, settings out of range, ``top_layers`` above the model's layers.
    """
    return certify_sigmas(classifier, texts, config, [config.sigma], spans=spans, notify=notify,
                          batch=batch)[config.sigma]


def certify_sigmas(classifier, texts: Sequence[str], config: FRSConfig, sigmas: Sequence[float], *,
                   spans: Sequence[list[Span]] | None = None, notify: Callable[[str], None] | None = None,
                   batch: int = 32) -> dict[float, list[Certificate]]:
    """:func:`certify` with ``config`` at each parameter-noise level in ``sigmas`` (``config.sigma`` is
    ignored), sharing the search, the randomized inputs and their lower-layer activations: what differs
    is only the K top-layer passes. Each certificate's ``passes_ms`` counts the whole lower pass, as a
    run of that sigma alone would.

    Returns:
        ``{sigma: [Certificate per text, in order]}``.

    Raises:
        UsageError: as :func:`certify`, or a sigma out of range.
    """
    for sigma in sigmas:
        replace(config, sigma=sigma).validate()
    config.validate()
    if config.top_layers > classifier.n_layers:
        raise UsageError(f"top layers H must be at most the model's {classifier.n_layers} layers, got {config.top_layers}")
    word_lists, cut = [], []
    for i, text in enumerate(texts):
        words = str(text).split()
        if not words:
            raise UsageError(f"input {i + 1} is empty")
        words, truncated = classifier.fit_words(words)
        if truncated and notify:
            notify(f"input {i + 1} is longer than the classifier's {classifier.max_tokens}-token prompt limit: "
                   f"certifying its first {len(words)} words")
        if not words:
            raise UsageError(f"input {i + 1}: not even one word fits the classifier's prompt limit")
        word_lists.append(words)
        cut.append(truncated)
    n = len(word_lists)

    base_probs = classifier.probs(word_lists, batch)
    areas: list[list[Span]] = []
    mcts_ms = [0.0] * n
    queries = [0] * n
    for i, words in enumerate(word_lists):
        if not config.fuzz:
            areas.append([])
        elif spans is not None:
            areas.append(list(spans[i]))
        else:
            t0 = time.perf_counter()
            found, queries[i] = find_vulnerable_spans(
                words, lambda ws: classifier.probs(ws, batch), budget=config.budget, c=config.c,
                max_edits=config.max_edits, keep=config.keep, max_area=config.max_area,
                seed=_text_seed(config.seed, words), base=base_probs[i])
            areas.append(found)
            mcts_ms[i] = (time.perf_counter() - t0) * 1e3

    t_lower = time.perf_counter()
    randomized: list[list[list[str]]] = []          # [text][copy] -> words
    for i, words in enumerate(word_lists):
        in_area = [False] * len(words)
        for s in areas[i]:
            for j in range(s.start, s.end):
                in_area[j] = True
        rng = np.random.default_rng([_text_seed(config.seed, words), 1])
        hi, lo = (config.omega_h, config.omega_l) if config.fuzz else (config.omega_m, config.omega_m)
        randomized.append([randomize(words, in_area, hi, lo, rng, config.op) for _ in range(config.k)])
    # shared lower layers: one pass per distinct randomized prompt, reused by every copy (and every sigma)
    prompts: dict[tuple[str, ...], int] = {}
    for per_text in randomized:
        for words in per_text:
            prompts.setdefault(tuple(words), len(prompts))
    n_lower = classifier.n_layers - config.top_layers
    hidden = classifier.lower(classifier.encode([list(w) for w in prompts]), n_lower, batch)
    lower_ms = (time.perf_counter() - t_lower) * 1e3 / n

    results: dict[float, list[Certificate]] = {}
    omega_cond = config.omega_h if config.fuzz else config.omega_m
    omega_uncond = config.omega_l if config.fuzz else config.omega_m
    for sigma in sigmas:
        t_upper = time.perf_counter()
        smoother = ParameterSmoother(classifier, config.top_layers, sigma, config.seed)
        votes = np.zeros((n, len(classifier.task.labels)), dtype=np.int64)
        for k, k_seed in enumerate(noise_seeds(config.seed, config.k)):
            layers = smoother.layers(k_seed)
            h_k = [hidden[prompts[tuple(randomized[i][k])]] for i in range(n)]
            preds = classifier.upper(h_k, layers=layers, batch=batch).argmax(-1).tolist()
            for i, p in enumerate(preds):
                votes[i, p] += 1
        del smoother
        passes_ms = lower_ms + (time.perf_counter() - t_upper) * 1e3 / n
        out = []
        for i, words in enumerate(word_lists):
            label = int(votes[i].argmax())
            p_low = clopper_pearson_lower(int(votes[i, label]), config.k, config.alpha)
            # no vulnerable area found: nothing is randomized with omega_H, so only the omega_L bound holds
            r, r_edits = certified_radius(p_low, len(words), omega_cond if areas[i] or not config.fuzz else omega_uncond,
                                          config.beta)
            ru, ru_edits = certified_radius(p_low, len(words), omega_uncond, config.beta)
            out.append(Certificate(
                text=" ".join(words), label=label, label_name=classifier.task.labels[label], votes=votes[i].tolist(),
                p_a_lower=p_low, certified=p_low > 0.5, radius=r, radius_edits=r_edits,
                radius_unconditional=ru, radius_unconditional_edits=ru_edits,
                spans=[asdict(s) for s in areas[i]],
                area_words=[" ".join(words[s.start:s.end]) for s in areas[i]], n_words=len(words),
                truncated=cut[i], base_label=int(base_probs[i].argmax()), mcts_ms=mcts_ms[i], passes_ms=passes_ms,
                total_ms=mcts_ms[i] + passes_ms, queries=queries[i]))
        results[sigma] = out
    return results


def ablation(config: FRSConfig, name: str) -> FRSConfig:
    """The named variant of ``config``: ``"frs"`` as is, ``"uniform"`` (no search, no parameter noise:
    RanMASK/TextGuard-style), ``"no_bmps"`` (sigma 0), ``"no_ftr"`` (parameter noise with uniform omega_M).

    Raises:
        UsageError: an unknown name.
    """
    variants = {"frs": config, "uniform": replace(config, fuzz=False, sigma=0.0),
                "no_bmps": replace(config, sigma=0.0), "no_ftr": replace(config, fuzz=False)}
    if name not in variants:
        raise UsageError(f"unknown certifier '{name}'; known: {', '.join(variants)}")
    return variants[name]
