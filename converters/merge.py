"""Model merging for Long-to-Short reasoning: task arithmetic, TIES, DARE, AIM-TIES and SVD merges.

Long-to-Short (L2S) merging (Wu et al., "Unlocking Efficient Long-to-Short LLM Reasoning with Model
Merging", arXiv 2503.20641, Sec. 3-4) merges a quick "System-1" model (BASE) with a slow,
long-reasoning "System-2" fine-tune of it, so the merged model keeps the reasoning at a fraction of the
response length. Every method works on **task vectors** ``delta_k = theta_k - theta_base``, tensor by
tensor, and writes ``theta = theta_base + alpha * merged(delta)``:

- ``task-arithmetic`` (Ilharco et al. 2023): ``merged = sum_k w_k delta_k``; default alpha 0.7.
- ``ties`` (Yadav et al. 2023, Alg. 1): trim each delta to its top ``density`` fraction by magnitude
  (per tensor; ties at the threshold are kept), elect a sign per element as the sign of the sum of the
  *unweighted* trimmed deltas (0 -> +; ``sign_rule: paper``, the default), then average the agreeing
  deltas, each scaled by its model's weight (disjoint mean: ``sum_k w_k delta_k / count`` over the
  models whose trimmed delta has the elected sign). ``sign_rule: weighted`` elects on the
  weight-scaled deltas instead (mergekit's rule); defaults density 0.2, alpha 1.0.
- ``dare`` (Yu et al. 2024): drop each delta element with probability ``drop`` and rescale the kept
  ones by ``1 / (1 - drop)`` (so the expectation is unchanged), then task arithmetic; defaults drop
  0.3 (the paper's L2S value; DARE's own 0.9 hurts here), alpha 0.7.
- ``dare-ties``: DARE's drop and rescale, then TIES (trim, elect, disjoint mean; the same
  ``sign_rule``); defaults drop 0.3, density 0.2, alpha 1.0.
- ``aim-ties`` (Nobari et al., "Activation-Informed Merging of LLMs", 2025): the TIES merge, then
  every linear weight ``W (out, in)`` is relaxed towards BASE per input channel:
  ``W = W_base + (W_ties - W_base) * (1 - s_j (1 - omega))`` with ``s_j = a_j / max_j a_j`` and ``a_j``
  the base model's mean absolute input activation of channel ``j`` on calibration text (default: 100
  windows of 256 tokens of the wiki calibration split); embeddings and norms keep the TIES value;
  default omega 0.4. Its forward pass over BASE is the one step that holds a whole model in memory.
- ``svd`` (low-rank task vectors, in the spirit of LoRE-Merging / TSV): each 2-D delta is replaced by
  its best rank-``rank`` approximation (truncated SVD), 1-D deltas stay whole, then task arithmetic;
  defaults rank 64, alpha 0.7. At full rank it is task arithmetic.

Each method is a small class in one registry (:data:`METHODS`, mergekit's ``merge_methods`` style):
its name, mergekit's aliases, its declared hyper-parameters with defaults and checks
(:class:`converters.params.Param`), and how it computes one output tensor.

Tensors stream one at a time from the safetensors files (plain reads of each tensor's extent, no
memory map; a streaming writer): the peak is about one tensor per model plus the output tensor and
a few float64 chunks of rows (:func:`merge_tensor`). The arithmetic runs in float64 (SVD's in
float32 for float32 and narrower checkpoints) and the result is cast to BASE's dtype, so task
arithmetic with alpha 0 returns BASE exactly and with alpha 1 returns the model exactly. DARE's masks
come from a generator seeded by ``(seed, tensor name, model index, chunk)``: a merge is deterministic
for a seed.

The output is a Hugging Face checkpoint directory (``config.json``, ``model.safetensors``, the
tokenizer files, ``edgerun_merge.json`` with the recipe, inputs, wall time and peak memory), written
atomically. Its ``config.json`` and tokenizer come from the parent with the longest context (the
paper's pitfall: a short-context base would cap the long reasoner), unless overridden.

Parents that differ in ``tie_word_embeddings`` merge into an **untied** output: a tied parent's
output head is its input embedding matrix, so ``lm_head.weight`` is merged across the parents like any
other tensor (a tied parent contributing its embedding) and written, with ``tie_word_embeddings:
false`` in the output config (:func:`check_compatible`).

A recipe is mergekit's YAML (:func:`load_recipe`), checked field by field by
:mod:`edgerun.formats.yamlfile`; the same fields make the ``merge`` pass of an export recipe
(:mod:`converters.passes`).
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from tqdm import tqdm

from converters.params import REQUIRED, Param, at_least, in_range, positive, type_problem, validate
from converters.params import schema as params_schema
from converters.source import TOKENIZER_FILES as SOURCE_TOKENIZER_FILES
from converters.source import Source, architecture_of, copy_tokenizer, open_source
from edgerun import catalog
from edgerun.atomic import atomic_dir
from edgerun.calibration import calibration_windows, run_with_input_hooks
from edgerun.errors import UsageError
from edgerun.formats import safetensors as st_format
from edgerun.formats import yamlfile
from edgerun.moe.store import is_carved
from edgerun.procmem import peak_rss_bytes

MERGE_META = "edgerun_merge.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")      # safetensors dtypes a merge reads and writes
TOKENIZER_FILES = SOURCE_TOKENIZER_FILES + ("vocab.json", "merges.txt", "tokenizer.model")
CHUNK_ELEMENTS = 1 << 18      # rows are merged in chunks of about this many elements (2 MiB in float64)


def _positive_int(v) -> str | None:
    return None if v >= 1 else f"must be a positive integer, got {v!r}"


def _alpha(default: float) -> Param:
    return Param("alpha", float, default, "task-vector scale: theta = base + alpha * merged", check=at_least(0))


DENSITY = Param("density", float, 0.2, "TIES: fraction of each task vector kept, by magnitude",
                check=in_range(0, 1, lo_open=True))
DROP = Param("drop", float, 0.3, "DARE: drop probability of each task-vector entry",
             check=in_range(0, 1, hi_open=True, note="the kept deltas are rescaled by 1/(1-drop)"))
OMEGA = Param("omega", float, 0.4, "AIM: relaxation floor of the most active input channels", check=in_range(0, 1))
RANK = Param("rank", int, 64, "SVD: rank of each 2-D task vector", check=_positive_int)
CALIB_SAMPLES = Param("calib_samples", int, 100, "AIM: calibration windows of the wiki calibration split",
                      check=_positive_int)
CALIB_LEN = Param("calib_len", int, 256, "AIM: tokens per calibration window", check=_positive_int)
SIGN_RULES = ("paper", "weighted")


def _sign_rule(v) -> str | None:
    return None if v in SIGN_RULES else f"must be one of {', '.join(SIGN_RULES)}, got {v!r}"


SIGN_RULE = Param("sign_rule", str, "paper", "TIES: elect signs on the unweighted trimmed task vectors (paper, "
                  "Yadav et al. 2023 Alg. 1) or on the weight-scaled ones (weighted, mergekit's)", check=_sign_rule)


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its hyper-parameters (build with :func:`make_spec`, which validates).

    Attributes:
        method: a name in :data:`METHODS`.
        alpha: task-vector scale (``theta = base + alpha * merged``), >= 0.
        density: TIES: fraction of each delta kept by magnitude, in (0, 1].
        drop: DARE: drop probability, in [0, 1).
        omega: AIM: relaxation floor for the most active input channels, in [0, 1].
        rank: SVD: rank of each 2-D task vector, >= 1.
        weights: per-model task-vector weights (None: 1 each).
        sign_rule: TIES's sign election: ``paper`` (on the unweighted trimmed task vectors, Yadav et
            al. 2023 Alg. 1; the weights apply in the disjoint mean) or ``weighted`` (on the
            weight-scaled ones).
        seed: DARE's mask seed.
        calib_samples, calib_len: AIM's calibration windows (count, tokens each) of the wiki calibration split.
    """

    method: str
    alpha: float
    density: float = 1.0
    drop: float = 0.0
    omega: float = 1.0
    rank: int | None = None
    weights: tuple[float, ...] | None = None
    seed: int = 0
    calib_samples: int = 100
    calib_len: int = 256
    sign_rule: str = "paper"

    def as_dict(self) -> dict:
        """The method's record: method, alpha, seed, its own hyper-parameters, weights if any, AIM's calibration."""
        d = {"method": self.method, "alpha": self.alpha, "seed": self.seed, **METHODS[self.method].record(self)}
        if self.weights is not None:
            d["weights"] = list(self.weights)
        return d


# --- the method registry --------------------------------------------------------------------------

class MergeMethod:
    """A merge method: one output tensor from BASE's tensor and the models' (mergekit's ``MergeMethod``).

    Subclasses declare ``name``, mergekit's ``aliases``, their hyper-parameters ``params`` (with
    defaults) and which of the shared steps they use: ``drops`` (DARE's drop and rescale of every
    delta) and ``trims`` (TIES's trim, sign election and disjoint mean); or override
    :meth:`merge_tensor`.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[Param, ...]] = ()
    drops: ClassVar[bool] = False
    trims: ClassVar[bool] = False

    @classmethod
    def record(cls, spec: MergeSpec) -> dict:
        """The hyper-parameters besides alpha, as recorded in ``edgerun_merge.json`` and manifests."""
        return {p.name: getattr(spec, p.name) for p in cls.params if p.name != "alpha"}

    def channel_scales(self, base: Path, spec: MergeSpec, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
        """Per-tensor input-channel scales the merge needs from BASE before streaming (AIM); none by default."""
        return {}

    def relax(self, merged: torch.Tensor, spec: MergeSpec, channel_scale: torch.Tensor | None) -> torch.Tensor:
        """The scaled merged task vector of a chunk (float64), adjusted per input channel (AIM); unchanged here."""
        return merged

    def merge_tensor(self, name: str, base: torch.Tensor, models: list[torch.Tensor], spec: MergeSpec,
                     channel_scale: torch.Tensor | None = None,
                     chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        """``base + relax(alpha * combine(task vectors))`` over chunks of rows, cast to ``base``'s dtype.

        See :func:`merge_tensor` for the arguments.
        """
        w = spec.weights or (1.0,) * len(models)
        b2, ms2, spans = _rows(base, models, chunk_elements)
        # the paper's TIES elects on the unweighted task vectors: the weights wait for the disjoint mean
        late = self.trims and spec.sign_rule == "paper"
        early = (1.0,) * len(models) if late else w

        def deltas(ci: int, lo: int, hi: int) -> list[torch.Tensor]:
            bc = b2[lo:hi].to(torch.float64)
            ds = [wk * (m[lo:hi].to(torch.float64) - bc) for wk, m in zip(early, ms2)]
            if self.drops:
                ds = [dare(d, spec.drop, _generator(spec.seed, name, k, ci)) for k, d in enumerate(ds)]
            return ds

        thresholds = None
        # TIES needs each task vector's magnitude threshold over the whole tensor before any chunk can be
        # trimmed: a first pass computes the deltas (and DARE masks, seeded per chunk, so identical) for the
        # thresholds only; the second recomputes them rather than holding every float64 delta at once.
        if self.trims and spec.density < 1:
            mags = [torch.empty(b2.shape, dtype=torch.float32) for _ in models]
            for ci, (lo, hi) in enumerate(spans):
                for mag, d in zip(mags, deltas(ci, lo, hi)):
                    mag[lo:hi] = d.abs()
            thresholds = [_threshold(mag, spec.density) for mag in mags]
            del mags
        out = torch.empty_like(b2)
        for ci, (lo, hi) in enumerate(spans):
            bc = b2[lo:hi].to(torch.float64)
            ds = deltas(ci, lo, hi)
            if self.trims:
                if thresholds is not None:
                    ds = [torch.where(d.abs().float() >= t, d, torch.zeros((), dtype=d.dtype))
                          for d, t in zip(ds, thresholds)]
                merged = elect_and_mean(ds, spec.weights if late else None)
            else:
                merged = torch.stack(ds).sum(0)
            merged = self.relax(spec.alpha * merged, spec, channel_scale)
            out[lo:hi] = (bc + merged).to(base.dtype)
        return out.reshape(base.shape)


METHODS: dict[str, type[MergeMethod]] = {}
ALIASES: dict[str, str] = {}       # mergekit's method names, accepted in recipes and on the command line


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: add a merge method (and its aliases) to :data:`METHODS`."""
    METHODS[cls.name] = cls
    ALIASES.update({a: cls.name for a in cls.aliases})
    return cls


@register
class TaskArithmetic(MergeMethod):
    """Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023): ``sum_k w_k delta_k``.

    Computed in the interpolation form ``(1 - alpha sum w) base + alpha sum_k w_k theta_k``, so alpha 0
    gives BASE exactly and alpha 1 (one model, weight 1) the model exactly.
    """

    name = "task-arithmetic"
    aliases = ("task_arithmetic", "ta")
    params = (_alpha(0.7),)

    def merge_tensor(self, name, base, models, spec, channel_scale=None, chunk_elements=CHUNK_ELEMENTS):
        w = spec.weights or (1.0,) * len(models)
        b2, ms2, spans = _rows(base, models, chunk_elements)
        out = torch.empty_like(b2)
        for lo, hi in spans:
            merged = (1.0 - spec.alpha * sum(w)) * b2[lo:hi].to(torch.float64)
            for wk, m in zip(w, ms2):
                merged = merged + (spec.alpha * wk) * m[lo:hi].to(torch.float64)
            out[lo:hi] = merged.to(base.dtype)
        return out.reshape(base.shape)


@register
class Ties(MergeMethod):
    """TIES-Merging (Yadav et al., NeurIPS 2023, Alg. 1): trim to ``density``, elect signs, disjoint mean.

    The sign is elected on the unweighted trimmed task vectors (``sign_rule`` paper, Alg. 1 step 2) and
    the per-model weights scale the agreeing values in the disjoint mean; ``sign_rule`` weighted
    elects on the weight-scaled vectors (:func:`elect_and_mean`).
    """

    name = "ties"
    aliases = ("ties_merging",)
    params = (_alpha(1.0), DENSITY, SIGN_RULE)
    trims = True


@register
class Dare(MergeMethod):
    """DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop and rescale, then task arithmetic."""

    name = "dare"
    aliases = ("dare_linear", "dare-linear")
    params = (_alpha(0.7), DROP)
    drops = True


@register
class DareTies(MergeMethod):
    """DARE's drop and rescale, then TIES's trim, sign election (``sign_rule``) and disjoint mean (mergekit's ``dare_ties``)."""

    name = "dare-ties"
    aliases = ("dare_ties",)
    params = (_alpha(1.0), DENSITY, DROP, SIGN_RULE)
    drops = True
    trims = True


@register
class AimTies(MergeMethod):
    """AIM on TIES (Nobari et al., "Activation-Informed Merging of LLMs", 2025, Sec. 3).

    Each linear weight's merged task vector is scaled per input channel ``j`` by
    ``1 - s_j (1 - omega)``, ``s_j`` BASE's normalised mean |activation| (:func:`aim_channel_scales`).
    """

    name = "aim-ties"
    aliases = ("aim_ties",)
    params = (_alpha(1.0), DENSITY, OMEGA, CALIB_SAMPLES, CALIB_LEN, SIGN_RULE)
    trims = True

    @classmethod
    def record(cls, spec: MergeSpec) -> dict:
        return {"density": spec.density, "omega": spec.omega, "sign_rule": spec.sign_rule,
                "calibration": {"dataset": "wiki", "split": "calibration", "windows": spec.calib_samples,
                                "tokens_per_window": spec.calib_len}}

    def channel_scales(self, base, spec, log):
        log(f"AIM: base activations on {spec.calib_samples} x {spec.calib_len} tokens of the wiki calibration split")
        return aim_channel_scales(base, spec.calib_samples, spec.calib_len)

    def relax(self, merged, spec, channel_scale):
        return merged if channel_scale is None else merged * (1.0 - channel_scale * (1.0 - spec.omega))


@register
class Svd(MergeMethod):
    """Low-rank task vectors (in the spirit of LoRE-Merging / TSV): rank-``rank`` SVD of each 2-D delta, summed.

    The 2-D case works on the whole matrix in float32 (float64 for float64 checkpoints); 1-D tensors
    take the shared chunked path with whole deltas.
    """

    name = "svd"
    params = (_alpha(0.7), RANK)

    def merge_tensor(self, name, base, models, spec, channel_scale=None, chunk_elements=CHUNK_ELEMENTS):
        if base.dim() != 2:
            return super().merge_tensor(name, base, models, spec, channel_scale, chunk_elements)
        w = spec.weights or (1.0,) * len(models)
        ct = torch.promote_types(base.dtype, torch.float32)
        b = base.to(ct)
        merged = sum(low_rank(wk * (m.to(ct) - b), spec.rank) for wk, m in zip(w, models))
        return (b + spec.alpha * merged).to(base.dtype)


def canonical_method(method: str) -> str:
    """The method's name in :data:`METHODS` (mergekit's underscore names accepted).

    Raises:
        UsageError: an unknown method.
    """
    m = ALIASES.get(str(method).lower(), str(method).lower())
    if m not in METHODS:
        raise UsageError(f"unknown merge method '{method}'; use one of {', '.join(METHODS)}")
    return m


def make_spec(method: str, alpha: float | None = None, density: float | None = None, drop: float | None = None,
              omega: float | None = None, rank: int | None = None, weights=None, seed: int = 0,
              calib_samples: int | None = None, calib_len: int | None = None,
              sign_rule: str | None = None) -> MergeSpec:
    """A validated :class:`MergeSpec`; hyper-parameters left None take the method's declared defaults.

    Raises:
        UsageError: unknown method, a hyper-parameter the method does not declare, or a value its
            declaration refuses (alpha < 0, density outside (0, 1], drop outside [0, 1), omega
            outside [0, 1], rank < 1, calibration sizes < 1, sign_rule not paper or weighted),
            a non-finite weight.
    """
    cls = METHODS[canonical_method(method)]
    given = {k: v for k, v in {"alpha": alpha, "density": density, "drop": drop, "omega": omega, "rank": rank,
                               "calib_samples": calib_samples, "calib_len": calib_len,
                               "sign_rule": sign_rule}.items() if v is not None}
    declared = [p.name for p in cls.params]
    unused = sorted(set(given) - set(declared))
    if unused:
        raise UsageError(f"{cls.name} does not use {', '.join(unused)}; it takes {', '.join(sorted(declared))}")
    values = {}
    for p in cls.params:
        v = given.get(p.name, p.default)
        bad = p.problem(v)
        if bad:
            raise UsageError(f"{p.name} {bad}")
        values[p.name] = v
    if weights is not None:
        for w in weights:
            if type_problem(float, w):
                raise UsageError(f"weight must be a finite number, got {w!r}")
        weights = tuple(float(w) for w in weights)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    floats = {k: float(values[k]) for k in ("alpha", "density", "drop", "omega") if k in values}
    return MergeSpec(method=cls.name, **floats, rank=values.get("rank"), weights=weights, seed=seed,
                     calib_samples=values.get("calib_samples", CALIB_SAMPLES.default),
                     calib_len=values.get("calib_len", CALIB_LEN.default),
                     sign_rule=values.get("sign_rule", SIGN_RULE.default))


# --- per-tensor arithmetic (float64 in, float64 out) ------------------------------------------------

def _threshold(magnitude: torch.Tensor, density: float) -> float:
    """The smallest magnitude kept when the top ``density`` fraction of ``magnitude`` (float32) is kept.

    Selects in place (numpy's introselect partition): ``magnitude`` is reordered, and no index or
    sorted copy of it is made.
    """
    flat = magnitude.reshape(-1).numpy()
    kth = flat.size - max(1, math.ceil(density * flat.size - 1e-9))     # 0.3 * 10 is 3.0000000000000004
    flat.partition(kth)
    return float(flat[kth])


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ``density`` fraction of ``delta``'s entries with the largest magnitude.

    Args:
        delta: a task-vector tensor, any shape, float.
        density: fraction kept, (0, 1]; ``ceil(density * numel)`` entries (magnitudes compared in
            float32; ties at the threshold kept).

    Returns:
        ``delta`` with the other entries zeroed (same shape and dtype).
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    threshold = _threshold(delta.abs().float(), density)
    return torch.where(delta.abs().float() >= threshold, delta, torch.zeros((), dtype=delta.dtype))


def elect_and_mean(deltas: list[torch.Tensor], weights: tuple[float, ...] | list[float] | None = None
                   ) -> torch.Tensor:
    """TIES sign election and disjoint mean (Yadav et al. 2023, Alg. 1 steps 2-3).

    The elected sign is the sign of the sum of the trimmed ``deltas`` as given (unweighted), +1 where
    the sum is 0; each element is ``sum_k w_k delta_k / count`` over the deltas that are non-zero
    with the elected sign (0 if none). With ``weights`` None (all 1) this is the paper's rule on
    ``deltas``; the ``weighted`` rule passes the weight-scaled deltas and no weights.

    Args:
        deltas: trimmed task vectors of one tensor, all the same shape and float dtype.
        weights: per-model weights applied to the agreeing values only (not in the election).

    Returns:
        The merged task vector, same shape and dtype.
    """
    stacked = torch.stack(deltas)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    if weights is not None:
        w = torch.tensor(list(weights), dtype=stacked.dtype)
        stacked = stacked * w.reshape((-1,) + (1,) * (stacked.dim() - 1))
    total = (stacked * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def _generator(seed: int, name: str, k: int, chunk: int = 0) -> torch.Generator:
    key = zlib.crc32(f"{name}\0{k}\0{chunk}".encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % 2**63)


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024, Sec. 3): drop each entry with probability ``drop``, rescale the rest by ``1/(1-drop)``.

    Args:
        delta: a task-vector tensor (float64).
        drop: drop probability in [0, 1).
        generator: the mask's random generator.

    Returns:
        A tensor of ``delta``'s shape whose expectation is ``delta``.
    """
    if drop <= 0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) >= drop
    return torch.where(keep, delta / (1.0 - drop), torch.zeros((), dtype=delta.dtype))


def low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of a 2-D ``delta`` (truncated SVD, Eckart-Young); other shapes unchanged."""
    if delta.dim() != 2 or rank > min(delta.shape):
        return delta
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _rows(base: torch.Tensor, models: list[torch.Tensor], chunk_elements: int):
    """``base`` and ``models`` as 2-D (rows, -1) views, and the row spans of the chunks."""
    b2 = base.reshape(1, -1) if base.dim() < 2 else base.reshape(base.shape[0], -1)
    ms2 = [m.reshape(b2.shape) for m in models]
    step = max(1, chunk_elements // max(1, b2.shape[1]))
    return b2, ms2, [(i, min(i + step, b2.shape[0])) for i in range(0, b2.shape[0], step)]


def merge_tensor(name: str, base: torch.Tensor, models: list[torch.Tensor], spec: MergeSpec,
                 channel_scale: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Merge one tensor: ``base + alpha * merged(task vectors)`` per ``spec``, cast to ``base``'s dtype.

    The element-wise work runs in float64 over chunks of rows, so the working memory beyond the
    input tensors and the output is a few chunks (plus one float32 magnitude copy per model for
    TIES's threshold). SVD works on the whole 2-D task vector in float32 (float64 for float64
    checkpoints): it needs the whole matrix, and float32 keeps that copy at the tensor's own size.
    DARE's masks are drawn per (seed, tensor, model, chunk): deterministic for a seed.

    Args:
        name: the tensor's name (seeds DARE's masks).
        base: BASE's tensor, any shape, float. models: the same tensor of each model to merge (same shape).
        spec: the method and hyper-parameters.
        channel_scale: AIM's ``s_j`` (in_features,) float64 for a linear weight ``(out, in)``, else None.
        chunk_elements: elements per chunk of rows.

    Returns:
        The merged tensor, same shape and dtype as ``base``.
    """
    return METHODS[spec.method]().merge_tensor(name, base, models, spec, channel_scale, chunk_elements)


# --- checkpoints ------------------------------------------------------------------------------------

def _index(path: Path) -> dict[str, tuple[Path, st_format.SafetensorsTensor]]:
    out = {}
    for f in st_format.checkpoint_files(path):
        for name, t in st_format.validate_file(f).items():
            out[name] = (f, t)
    return out


Index = dict[str, tuple[Path, st_format.SafetensorsTensor]]
LM_HEAD = "lm_head.weight"
# input embeddings a tied output head reads (Llama/Qwen/Gemma/SmolLM, Gemma 3 multimodal, GPT-2, OPT)
EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "transformer.wte.weight",
              "model.decoder.embed_tokens.weight")


def is_tied(config: dict, index: Index) -> bool:
    """Whether a checkpoint's output head is its input embedding: ``tie_word_embeddings`` in its config,
    else (no such key) whether it has no ``lm_head.weight``."""
    return bool(config.get("tie_word_embeddings", LM_HEAD not in index))


def _untie(source: Source, index: Index) -> None:
    """Give a tied checkpoint's index an ``lm_head.weight`` entry: its input embedding's (in place).

    Raises:
        UsageError: none of :data:`EMBEDDINGS` is in the checkpoint.
    """
    emb = next((n for n in EMBEDDINGS if n in index), None)
    if emb is None:
        raise UsageError(f"cannot untie {source.origin}: it ties its output head to its input embedding, but none "
                         f"of {', '.join(EMBEDDINGS)} is in its checkpoint")
    index[LM_HEAD] = index[emb]


def check_compatible(base: Source, models: list[Source]) -> tuple[Index, list[Index], bool]:
    """Check that every model has BASE's architecture, vocabulary and tensors (names, shapes, float dtypes).

    A tied parent (``tie_word_embeddings``) has no output head of its own: a stored ``lm_head.weight``
    is dropped from its index (transformers ignores it too). When the parents differ in tying, the
    output is untied: each tied parent's index gets ``lm_head.weight`` = its input embedding, so the
    head merges like any other tensor.

    Returns:
        BASE's tensor index ``{name: (file, entry)}`` in file order (``lm_head.weight`` last when
        added), each model's, and whether the output must be untied (the parents differ in tying).

    Raises:
        UsageError: a different architecture or vocabulary size, or the first mismatching tensor named
            (missing, extra, other shape, non-float dtype), or a carved MoE, or a tied parent to untie
            with no known input embedding (:data:`EMBEDDINGS`).
        ModelFileError: a missing or corrupted checkpoint file.
    """
    base_cfg = st_format.read_config(base.path)
    for s in [base] + models:
        if is_carved(st_format.read_config(s.path)):
            raise UsageError(f"{s.origin} is a carved MoE (its experts live outside model.safetensors); merge the "
                             "dense models, then carve the merge")
    base_idx, indices = _index(base.path), []
    for name, (_, t) in base_idx.items():
        if t.dtype not in FLOAT_DTYPES:
            raise UsageError(f"{base.origin}: tensor {name} is {t.dtype}; only F16/BF16/F32/F64 checkpoints merge "
                             "(dequantize a quantized checkpoint first)")
    configs = []
    for m in models:
        cfg = st_format.read_config(m.path)
        if architecture_of(cfg) != architecture_of(base_cfg) or cfg.get("model_type") != base_cfg.get("model_type"):
            raise UsageError(f"cannot merge {m.origin} ({cfg.get('model_type')}) into base {base.origin} "
                             f"({base_cfg.get('model_type')}): different architectures")
        if cfg.get("vocab_size") != base_cfg.get("vocab_size"):
            raise UsageError(f"cannot merge {m.origin} into base {base.origin}: vocabulary sizes differ "
                             f"({cfg.get('vocab_size')} vs {base_cfg.get('vocab_size')})")
        configs.append(cfg)
    indices = [_index(m.path) for m in models]
    parents = list(zip([base] + models, [base_cfg] + configs, [base_idx] + indices))
    tied = [is_tied(cfg, idx) for _, cfg, idx in parents]
    for (_, _, idx), t in zip(parents, tied):
        if t:
            idx.pop(LM_HEAD, None)
    untie = len(set(tied)) > 1
    if untie:
        for (s, _, idx), t in zip(parents, tied):
            if t:
                _untie(s, idx)
    for m, idx in zip(models, indices):
        for name, (_, t) in base_idx.items():
            if name not in idx:
                raise UsageError(f"cannot merge {m.origin}: it has no tensor {name} (base {base.origin} has)")
            other = idx[name][1]
            if other.shape != t.shape:
                raise UsageError(f"cannot merge {m.origin}: tensor {name} has shape {list(other.shape)}, "
                                 f"base {base.origin} has {list(t.shape)}")
            if other.dtype not in FLOAT_DTYPES:
                raise UsageError(f"cannot merge {m.origin}: tensor {name} is {other.dtype}, not F16/BF16/F32/F64")
        extra = sorted(set(idx) - set(base_idx))
        if extra:
            raise UsageError(f"cannot merge {m.origin}: tensor {extra[0]} is not in base {base.origin}")
    return base_idx, indices, untie


def aim_channel_scales(base: Path, n_samples: int = 100, seq_len: int = 256,
                       dataset: str = "wiki") -> dict[str, torch.Tensor]:
    """AIM's per-input-channel activation scale ``s_j = a_j / max a_j`` of every linear layer of BASE.

    ``a_j`` is the mean absolute input activation of channel ``j`` over ``n_samples`` windows of
    ``seq_len`` tokens of ``dataset``'s calibration split (Nobari et al. 2025, Sec. 3).

    Returns:
        ``{weight name: s (in_features,) float64 in [0, 1]}``, e.g. ``model.layers.0.mlp.down_proj.weight``.

    Raises:
        UsageError: too little calibration text.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer   # heavy: only AIM needs a whole model

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    windows = calibration_windows(tokenizer, n_samples, seq_len, dataset)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def visit(name, x):
        sums[name] = sums.get(name, 0) + x.to(torch.float64).abs().sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    linears = {f"{n}.weight": mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    run_with_input_hooks(model, linears, windows, visit)
    out = {}
    for name, s in sums.items():
        a = s / counts[name]
        out[name] = a / a.max().clamp(min=1e-30)
    return out


@dataclass
class MergeResult:
    """What a merge wrote and what it cost.

    Attributes:
        output: the merged checkpoint directory. record: the ``edgerun_merge.json`` content.
        seconds: wall time (s). peak_rss_bytes: the process's peak resident memory (bytes;
            :func:`edgerun.procmem.peak_rss_bytes`, a high-water mark, so it includes whatever the
            process held before the merge). tensors: tensors merged.
    """

    output: Path
    record: dict
    seconds: float
    peak_rss_bytes: int
    tensors: int = 0


def _pick_parent(parents: list[Source], choice: str | None, what: str) -> Source:
    """``choice``: None/"auto" = longest context (ties: the first model to merge), "base", or an index/origin."""
    if choice in (None, "auto"):
        ctx = [int(st_format.read_config(s.path).get("max_position_embeddings") or 0) for s in parents]
        longest = [s for s, c in zip(parents, ctx) if c == max(ctx)]
        return longest[1] if len(longest) > 1 and longest[0] is parents[0] else longest[0]
    if choice == "base":
        return parents[0]
    for s in parents:
        if str(choice) in (s.origin, str(s.path)):
            return s
    try:
        chosen = catalog.resolve(str(choice), progress=False).resolve()
    except Exception:  # noqa: BLE001 - an unresolvable name is reported below
        chosen = None
    for s in parents:
        if chosen is not None and chosen in (Path(s.origin).resolve(), s.path.resolve()):
            return s
    raise UsageError(f"{what} '{choice}' is not one of the merged models; use auto, base or a model as given")


def merge(base: str | Path, models: list[str | Path], out: str | Path, spec: MergeSpec, force: bool = False,
          tokenizer_from: str | None = None, context_length: int | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> MergeResult:
    """Merge ``models`` into ``base`` per ``spec`` and write an HF checkpoint at ``out``, streaming tensors.

    Args:
        base: BASE (the quick model; catalog name, ``.gguf`` or HF checkpoint directory; GGUF sources
            are dequantized to float32 once, as for export).
        models: the models to merge (fine-tunes of BASE with its architecture and vocabulary).
        out: output directory (written atomically).
        spec: method and hyper-parameters (:func:`make_spec`).
        force: overwrite ``out``.
        tokenizer_from: where config.json and the tokenizer come from: ``auto`` (the longest-context
            parent), ``base``, or a model as given.
        context_length: override ``max_position_embeddings`` of the output (tokens).
        progress: a tqdm bar over tensors. log: one-line messages.

    Returns:
        :class:`MergeResult`.

    Raises:
        UsageError: no models, a weight count that does not match, incompatible models (the first
            mismatching tensor named; parents that differ in ``tie_word_embeddings`` are not
            incompatible: the output is untied, see :func:`check_compatible`), output exists without
            ``force``, a bad context length.
        ModelFileError, UnknownModelError: a missing or corrupted input.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if not models:
        raise UsageError("give at least one model to merge into the base")
    if spec.weights is not None and len(spec.weights) != len(models):
        raise UsageError(f"{len(spec.weights)} weights for {len(models)} models")
    if context_length is not None and context_length < 1:
        raise UsageError(f"context length must be positive, got {context_length}")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    base_src = open_source(base, progress=progress)
    model_srcs = [open_source(m, progress=progress) for m in models]
    base_idx, model_idx, untie = check_compatible(base_src, model_srcs)
    parent = _pick_parent([base_src] + model_srcs, tokenizer_from, "--tokenizer-from")
    config = st_format.read_config(parent.path)
    config.pop("quantization_config", None)
    if untie:
        config["tie_word_embeddings"] = False
        log("the parents differ in tie_word_embeddings: the output is untied (a tied parent's lm_head is its "
            "input embedding)")
    if context_length is not None:
        config["max_position_embeddings"] = int(context_length)
    method = METHODS[spec.method]()
    scales = method.channel_scales(base_src.path, spec, log)

    names = list(base_idx)
    specs = [(n, base_idx[n][1].dtype, base_idx[n][1].shape) for n in names]

    def tensor(idx, name):
        return st_format.read_tensor(*idx[name])

    config["torch_dtype"] = config["dtype"] = st_format.TORCH_DTYPES[specs[0][1]] if specs else "float32"
    with atomic_dir(out, force=force) as tmp:
        writer = st_format.StreamWriter(tmp / "model.safetensors", specs, {"format": "pt"})
        try:
            for name in tqdm(names, desc=f"merging ({spec.method})", unit="tensor", disable=not progress):
                scale = scales.get(name)
                if scale is not None and scale.numel() != base_idx[name][1].shape[-1]:
                    scale = None
                writer.write(name, method.merge_tensor(name, tensor(base_idx, name),
                                                       [tensor(i, name) for i in model_idx], spec, channel_scale=scale))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        copy_tokenizer(parent.path, tmp, TOKENIZER_FILES)
        seconds = time.perf_counter() - t0
        record = {"merge": spec.as_dict(), "base": base_src.as_dict(), "models": [m.as_dict() for m in model_srcs],
                  "config_and_tokenizer_from": parent.origin, "max_position_embeddings":
                  config.get("max_position_embeddings"), "tensors": len(names), "seconds": round(seconds, 2),
                  "peak_rss_bytes": peak_rss_bytes(), "aim_layers": len(scales) if scales else None,
                  "tie_word_embeddings": is_tied(config, base_idx), "untied": untie}
        (tmp / MERGE_META).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    log(f"merged {len(names)} tensors with {spec.method} in {seconds:.1f} s (peak RSS "
        f"{record['peak_rss_bytes'] / 2**20:.0f} MiB)")
    return MergeResult(output=out, record=record, seconds=seconds, peak_rss_bytes=record["peak_rss_bytes"],
                       tensors=len(names))


# --- recipes (mergekit-style YAML) ------------------------------------------------------------------

def _known_method(v) -> str | None:
    name = ALIASES.get(v.lower(), v.lower())
    return None if name in METHODS else f"must be one of {', '.join(METHODS)} (or mergekit's names), got {v!r}"


def _non_empty(v) -> str | None:
    return None if v else "must be a non-empty list of models to merge"


def _auto_only(v) -> str | None:
    return None if v == "auto" else f"may only be auto (merges are written in BASE's dtype), got {v!r}"


# the fields of a recipe (and of the ``merge`` pass of an export recipe)
RECIPE_PARAMS = (
    Param("merge_method", str, REQUIRED, "task-arithmetic, ties, dare, dare-ties, aim-ties or svd "
          "(mergekit's underscore names too)", check=_known_method),
    Param("base_model", str, None, "BASE, the quick model (default: the export source)"),
    Param("models", list, REQUIRED, "the models to merge: names/paths, or {model: ..., parameters: {weight: ...}}",
          check=_non_empty),
    Param("parameters", dict, None, "the method's hyper-parameters (lambda is accepted for alpha)"),
    Param("tokenizer_source", str, None, "config and tokenizer from: auto (the longest-context parent), base, "
          "or a model as listed"),
    Param("context_length", int, None, "override of the output's max_position_embeddings (tokens)", check=positive),
    Param("seed", int, 0, "DARE's mask seed"),
    Param("dtype", str, "auto", "output dtype: auto (BASE's) only", check=_auto_only),
)
MODEL_PARAMS = (Param("model", str, REQUIRED, "a model to merge: catalog name, .gguf or HF checkpoint"),
                Param("parameters", dict, None, "the model's parameters: weight"))
WEIGHT = Param("weight", float, 1.0, "the model's task-vector weight")
LAMBDA = Param("lambda", float, None, "alpha under mergekit's name", check=at_least(0))


@dataclass(frozen=True)
class Recipe:
    """A parsed merge recipe: base, models, :class:`MergeSpec`, tokenizer parent and context override."""

    base: str
    models: tuple[str, ...]
    spec: MergeSpec
    tokenizer_from: str | None = None
    context_length: int | None = None

    def as_dict(self) -> dict:
        """The recipe as plain data (the merge cache key hashes it)."""
        return {**asdict(self), "spec": self.spec.as_dict()}


def method_hyper(method: str, given: dict, where: str) -> dict:
    """The hyper-parameters ``given`` for ``method``, checked against its declared ones (mergekit's ``lambda``
    accepted for ``alpha``), as :func:`make_spec` keywords; unset ones are None (the method's default).

    Raises:
        UsageError: an unknown method or parameter, a value of the wrong type or range, alpha with lambda.
    """
    m = METHODS[canonical_method(method)]
    hyper = validate(m.params + (LAMBDA,), {k: v for k, v in given.items() if v is not None}, where)
    hyper = {k: (v if k in given and given[k] is not None else None) for k, v in hyper.items()}
    if hyper["lambda"] is not None:
        if hyper["alpha"] is not None:
            raise UsageError(f"{where}: give alpha or lambda (the same thing), not both")
        hyper["alpha"] = hyper["lambda"]
    del hyper["lambda"]
    return hyper


def recipe_from_yaml(path: Path, data: dict, lines: dict[str, int], prefix: str = "",
                     base: str | None = None) -> Recipe:
    """Check a recipe's fields (``data``, read by :func:`edgerun.formats.yamlfile.read`) and build it.

    Every field, every model entry and the method's ``parameters`` go through
    :func:`edgerun.formats.yamlfile.check` against the declared parameters (:data:`RECIPE_PARAMS`,
    :data:`MODEL_PARAMS`, the method's own ``params``); ``prefix`` is the recipe's place in a
    larger file (``passes[0].merge.``) for the line numbers.

    Args:
        path: the file (for messages). data: the recipe's mapping. lines: field path -> line.
        base: BASE when the recipe has no ``base_model`` (the export source).

    Raises:
        YamlError: unknown or missing fields, wrong types, bad values, the field and line named.
    """
    def where(key: str) -> str:
        return f"{path}, line {lines.get(prefix + key, '?')}"

    data = yamlfile.check(path, data, lines, params_schema(RECIPE_PARAMS), prefix)
    method = METHODS[canonical_method(data["merge_method"])]
    recipe_base = data["base_model"]
    if recipe_base is not None and base is not None and str(recipe_base) != str(base):
        raise yamlfile.YamlError(f"{where('base_model')}: base_model {recipe_base} differs from the export "
                                 f"source {base}")
    base = recipe_base if recipe_base is not None else base
    if base is None:
        raise yamlfile.YamlError(f"{path}: missing field '{prefix}base_model'")
    models, weights = [], []
    for i, entry in enumerate(data["models"]):
        key = f"models[{i}]"
        if isinstance(entry, str):
            models.append(entry)
            weights.append(1.0)
            continue
        if not isinstance(entry, dict):
            raise yamlfile.YamlError(f"{where(key)}: field '{prefix}{key}' must be a model name/path or a mapping "
                                     f"with 'model', got {entry!r}")
        entry = yamlfile.check(path, entry, lines, params_schema(MODEL_PARAMS), f"{prefix}{key}.")
        weight = yamlfile.check(path, entry["parameters"] or {}, lines, params_schema((WEIGHT,)),
                                f"{prefix}{key}.parameters.")["weight"]
        models.append(entry["model"])
        weights.append(weight)
    given = data["parameters"] or {}
    hyper = yamlfile.check(path, given, lines, params_schema(method.params + (LAMBDA,)), prefix + "parameters.")
    if given.get("lambda") is not None:
        if given.get("alpha") is not None:
            raise yamlfile.YamlError(f"{where('parameters.lambda')}: give alpha or lambda (the same thing), not both")
        hyper["alpha"] = hyper["lambda"]
    del hyper["lambda"]
    try:
        spec = make_spec(method.name, **hyper, weights=weights if any(w != 1.0 for w in weights) else None,
                         seed=data["seed"])
    except UsageError as e:
        raise yamlfile.YamlError(f"{path}: {e}") from None
    return Recipe(base=str(base), models=tuple(str(m) for m in models), spec=spec,
                  tokenizer_from=data["tokenizer_source"], context_length=data["context_length"])


def load_recipe(path: str | Path, base: str | None = None) -> Recipe:
    """Read a mergekit-style YAML recipe::

        merge_method: ties            # task-arithmetic | ties | dare | dare-ties | aim-ties | svd
        base_model: smollm2-135m-instruct
        models:
          - model: ./system2          # or a plain string
            parameters: {weight: 1.0}
        parameters: {alpha: 1.0, density: 0.2}   # lambda is accepted for alpha
        tokenizer_source: auto        # auto | base | a model as listed
        context_length: 8192          # optional override
        seed: 0

    Args:
        path: the recipe file. base: BASE when the recipe has no ``base_model`` (the export source).

    Raises:
        YamlError (a UsageError): malformed YAML, unknown or missing fields, wrong types or bad
            values (the field and its line named).
    """
    path = Path(path)
    data, lines = yamlfile.read(path)
    return recipe_from_yaml(path, data, lines, base=base)
