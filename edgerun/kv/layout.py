"""KV-cache precision layouts: per layer a (K bits, V bits) pair, plus mode, group size and window (YAML).

Layout file::

    layers: 30                  # decoder layers of the model it was made for
    mode: per-token             # or kivi
    group_size: 32
    window: 32                  # KIVI: newest tokens kept in full precision
    pairs:                      # layer -> pair, one entry per layer
      0: {nbits_key: 8, nbits_value: 4}
      1: {nbits_key: 4, nbits_value: 4}
      ...

Average bits = sum over layers of (K bits + V bits) / (2 L) (KVTuner's measure, scales not counted);
"true bits" adds the float16 scale and int16 zero point per group, and for KIVI the full-precision
window at a given context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgerun.atomic import atomic_file
from edgerun.errors import ModelFileError, UsageError
from edgerun.formats import gguf as gguf_format
from edgerun.formats import safetensors as st_format
from edgerun.formats import yamlfile as yf
from edgerun.kv.cache import MODES, PAIRS, KVSpec, pair_name
from edgerun.kv.types import KV_TYPES

VALID_BITS = (2, 4, 8, 16)


@dataclass
class Layout:
    """A layer-wise KV precision layout.

    Attributes:
        pairs: (K bits, V bits) per decoder layer.
        mode: ``per-token`` or ``kivi``. group_size: quantization group. window: KIVI full-precision tokens.
        name: label (e.g. ``KV4`` or a Pareto point). meta: free-form record (search objectives).
    """

    pairs: list[tuple[int, int]]
    mode: str = "per-token"
    group_size: int = 32
    window: int = 32
    name: str = ""
    meta: dict = field(default_factory=dict)

    @classmethod
    def uniform(cls, pair: str, layers: int, mode: str = "per-token", group_size: int = 32, window: int = 32) -> "Layout":
        """Every layer at the same pair (e.g. ``KV4``)."""
        if pair not in PAIRS:
            raise UsageError(f"unknown KV pair '{pair}'; valid: {', '.join(PAIRS)}")
        return cls([PAIRS[pair]] * layers, mode, group_size, window, name=pair)

    @property
    def average_bits(self) -> float:
        """Sum of K and V bits over 2L (scales not counted)."""
        return sum(k + v for k, v in self.pairs) / (2 * len(self.pairs))

    def true_bits(self, head_dim: int, context: int = 2048, fp_bits: int = 16) -> float:
        """Average stored bits per cached value including float16 scales and int16 zero points per group,
        and (KIVI) the full-precision window, at ``context`` tokens; unquantized values count ``fp_bits``
        (16, or 32 for a float32 model in the torch backend)."""
        total = 0.0
        g = self.group_size if head_dim % self.group_size == 0 else head_dim
        for k, v in self.pairs:
            for key, bits in ((True, k), (False, v)):
                if bits >= 16:
                    total += fp_bits
                    continue
                # per-token groups run along head_dim; KIVI keys along blocks of group_size tokens
                per_value = bits + 32 / (self.group_size if self.mode == "kivi" and key else g)
                if self.mode == "kivi":
                    fp = min(context, self.window + (context - self.window) % self.group_size
                             if context > self.window else context) / context
                    per_value = fp * fp_bits + (1 - fp) * per_value
                total += per_value
        return total / (2 * len(self.pairs))

    def bytes_per_token(self, n_kv_heads: int, head_dim: int, context: int = 2048, fp_bits: int = 16) -> float:
        """KV-cache bytes per token of context (all layers, K and V), averaged over ``context`` tokens."""
        return self.true_bits(head_dim, context, fp_bits) / 8 * 2 * len(self.pairs) * n_kv_heads * head_dim

    def cache_bytes(self, tokens: int, n_kv_heads: int, head_dim: int, fp_bits: int = 16) -> int:
        """KV-cache bytes the packed cache holds for ``tokens`` tokens of context."""
        return int(round(self.bytes_per_token(n_kv_heads, head_dim, max(tokens, 1), fp_bits) * tokens))

    @property
    def quality(self) -> tuple:
        """Sort key, best first: measured KL to KV16 when the search recorded it, else more bits first."""
        if self.average_bits >= 16:
            return (0, 0.0)
        kl = self.meta.get("kl")
        return (1, float(kl)) if kl is not None else (2, -self.average_bits)

    def specs(self) -> list[KVSpec]:
        return [KVSpec(k, v, self.mode, self.group_size, self.window) for k, v in self.pairs]

    def to_yaml(self) -> str:
        data = {"name": self.name or None, "layers": len(self.pairs), "mode": self.mode, "group_size": self.group_size,
                "window": self.window, "average_bits": round(self.average_bits, 4),
                "pairs": {i: {"nbits_key": k, "nbits_value": v} for i, (k, v) in enumerate(self.pairs)}}
        if self.meta:
            data["meta"] = self.meta
        return yaml.safe_dump(data, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the layout YAML to ``path`` atomically (parent directories made); returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, force=True) as tmp:
            tmp.write_text(self.to_yaml(), encoding="utf-8")
        return path

    def describe(self) -> str:
        """Layers grouped by pair, average bits."""
        runs, start = [], 0
        for i in range(1, len(self.pairs) + 1):
            if i == len(self.pairs) or self.pairs[i] != self.pairs[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                runs.append(f"layers {span}: {pair_name(*self.pairs[start])}")
                start = i
        return "; ".join(runs)


def _bits(v) -> str | None:
    return None if v in VALID_BITS else f"must be one of {', '.join(map(str, VALID_BITS))}, got {v!r}"


SCHEMA = {
    "name": yf.Field(lambda v: None if v is None or isinstance(v, str) else "must be a string", required=False),
    "layers": yf.Field(yf.positive_int),
    "mode": yf.Field(yf.one_of(MODES), required=False, default="per-token"),
    "group_size": yf.Field(yf.positive_int, required=False, default=32),
    "window": yf.Field(lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       else "must be an integer >= 0",
                       required=False, default=32),
    "average_bits": yf.Field(yf.positive_number, required=False),
    "pairs": yf.Field(lambda v: None if isinstance(v, dict) and v else "must map layers to {nbits_key, nbits_value}"),
    "meta": yf.Field(lambda v: None if isinstance(v, dict) else "must be a mapping", required=False, default={}),
}
PAIR_SCHEMA = {"nbits_key": yf.Field(_bits), "nbits_value": yf.Field(_bits)}


def load(path: str | Path, n_layers: int | None = None) -> Layout:
    """Read and check a layout file (optionally against a model's layer count).

    Raises:
        YamlError: malformed YAML, a bad field (named with its line), bit widths outside the set, a
            (K, V) pair not in KVTuner's set, missing layers, or a layer count that differs from the model's.
    """
    path = Path(path)
    data, lines = yf.read(path)
    data = yf.check(path, data, lines, SCHEMA)
    layers = data["layers"]
    extra = [k for k in data["pairs"] if str(k) not in {str(i) for i in range(layers)}]
    if extra:
        raise yf.YamlError(f"{path}: pairs for layer(s) {', '.join(map(str, extra))} outside the declared "
                           f"{layers} layers (0..{layers - 1})")
    pairs = []
    for i in range(layers):
        entry = data["pairs"].get(i, data["pairs"].get(str(i)))
        if entry is None:
            raise yf.YamlError(f"{path}: layer {i} has no pair (the layout declares {layers} layers)")
        if not isinstance(entry, dict):
            raise yf.YamlError(f"{path}, line {lines.get(f'pairs.{i}', '?')}: layer {i} must map to "
                               f"{{nbits_key, nbits_value}}, got {entry!r}")
        e = yf.check(path, entry, lines, PAIR_SCHEMA, prefix=f"pairs.{i}.")
        pair = (e["nbits_key"], e["nbits_value"])
        if pair not in PAIRS.values():
            raise yf.YamlError(f"{path}, line {lines.get(f'pairs.{i}.nbits_key', '?')}: layer {i} pair K{pair[0]}V{pair[1]} "
                               f"is not one of {', '.join(PAIRS)}")
        pairs.append(pair)
    if n_layers is not None and layers != n_layers:
        raise yf.YamlError(f"{path}: the layout is for {layers} layers, the model has {n_layers}")
    return Layout(pairs, data["mode"], data["group_size"], data["window"], name=data["name"] or path.stem,
                  meta=data["meta"] or {})


@dataclass(frozen=True)
class KVShape:
    """What a model's KV cache holds per token: ``layers`` x ``kv_heads`` x ``head_dim`` values for K and for V."""

    layers: int
    kv_heads: int
    head_dim: int


def model_kv_shape(path: str | Path) -> KVShape:
    """The KV shape of an HF checkpoint directory (``config.json``) or a GGUF file (its metadata).

    HF: ``num_hidden_layers``, ``num_key_value_heads`` (default: the attention heads), ``head_dim``
    (default: hidden size / attention heads), from ``text_config`` when there is one. GGUF:
    ``<arch>.block_count``, ``<arch>.attention.head_count_kv`` (default: ``head_count``) and
    ``<arch>.attention.key_length`` (default: embedding length / head count).

    Raises:
        ModelFileError: an unreadable config or GGUF, or one without these fields.
    """
    path = Path(path)
    try:
        if path.is_dir():
            cfg = st_format.read_config(path)
            cfg = cfg.get("text_config") or cfg
            heads = int(cfg["num_attention_heads"])
            shape = KVShape(int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads") or heads),
                            int(cfg.get("head_dim") or cfg["hidden_size"] // heads))
        else:
            info = gguf_format.validate(path)
            md, arch = info.metadata, info.architecture
            heads = int(md[f"{arch}.attention.head_count"])
            shape = KVShape(int(md[f"{arch}.block_count"]), int(md.get(f"{arch}.attention.head_count_kv") or heads),
                            int(md.get(f"{arch}.attention.key_length") or int(md[f"{arch}.embedding_length"]) // heads))
    except KeyError as e:
        raise ModelFileError(f"{path} does not say its KV shape (layers, KV heads, head dimension): missing {e}") from None
    except (TypeError, ValueError, ArithmeticError) as e:   # a string, a list, a zero head count, inf
        raise ModelFileError(f"{path} has an unusable KV shape (layers, KV heads, head dimension): "
                             f"{type(e).__name__}: {e}") from None
    if min(shape.layers, shape.kv_heads, shape.head_dim) <= 0:
        raise ModelFileError(f"{path} has an unusable KV shape {shape.layers} layers x {shape.kv_heads} KV heads x "
                             f"{shape.head_dim} head dimension (each must be positive)")
    return shape


# our bits -> the llama.cpp type (edgerun.kv.types) not less precise: q4_1 for 4 bits is asymmetric
# like ours; llama.cpp has no 2-bit KV type, so 2 bits take q4_0
LLAMA_CPP_TYPE_OF_BITS = {bits: KV_TYPES[name] for bits, name in ((16, "f16"), (8, "q8_0"), (4, "q4_1"), (2, "q4_0"))}


def llama_cpp_types(layout: Layout) -> tuple[str, str, str]:
    """The nearest uniform llama.cpp (type_k, type_v) not less precise than any layer of ``layout``.

    llama.cpp has one K type and one V type for all layers: K takes the most precise layer's K bits
    (:data:`LLAMA_CPP_TYPE_OF_BITS`: 16 -> f16, 8 -> q8_0, 4 -> q4_1, 2 -> q4_0), V likewise. A
    quantized V cache needs flash attention. Returns (type_k, type_v, a sentence saying so).
    """
    k = max(p[0] for p in layout.pairs)
    v = max(p[1] for p in layout.pairs)
    tk, tv = LLAMA_CPP_TYPE_OF_BITS[k], LLAMA_CPP_TYPE_OF_BITS[v]
    note = (f"llama.cpp has one KV type for all layers: layout {layout.name or ''} ({layout.average_bits:.2f} average "
            f"bits, up to K{k}/V{v}) runs as type_k={tk.name}, type_v={tv.name}")
    if tv.quantized:
        note += " (quantized V: flash attention on)"
    return tk.name, tv.name, note
