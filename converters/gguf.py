"""HF checkpoint -> GGUF: an exact F32 writer (gguf-py's GGUFWriter) and llama.cpp's quantizer for every other type.

The writer streams tensors one at a time from safetensors, names them with gguf-py's tensor-name map
(the single source of truth for GGUF names), and applies the two layout changes llama.cpp expects:

- Llama: Q and K projection rows are permuted from the Hugging Face rotary layout (two halves) to
  llama.cpp's interleaved layout: ``w.reshape(n_head, 2, d_head // 2, d_in).swapaxes(1, 2)``
  (``n_head`` = KV heads for K). Forgetting it is silent at position 0 and wrong after.
- Gemma 3: RMSNorm weights are stored as ``1 + w`` (Gemma's norm multiplies by ``1 + w``; llama.cpp's
  by ``w``).

Tied embeddings stay tied (no ``output.weight``). The tokenizer is carried over exactly from a
materialized GGUF source (``tokenizer.gguf.json``); a plain HF checkpoint needs a GPT-2-style BPE
``tokenizer.json``, read with gguf-py's vocabulary classes.

Padded vocabularies (more embedding rows than tokenizer tokens, e.g. after
``resize_token_embeddings(pad_to_multiple_of=64)``): llama.cpp requires one token per embedding row,
so the token list is padded with placeholder tokens ``[PAD<id>]`` of type UNUSED (what llama.cpp's own
converter does); the rows are kept, and the export manifest's ``vocab_padding`` says so
(:func:`vocab_padding`). Fewer rows than tokens is refused.

Every other type (F16, BF16 and the llama.cpp quantization types) is produced from the F32 file by
``llama_cpp.llama_model_quantize``, with optional token-embedding and output tensor types.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import gguf
import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.vocab import BpeVocab, SpecialVocab
from safetensors import safe_open

from converters.source import architecture_of, read_tokenizer_sidecar
from edgerun.atomic import atomic_file
from edgerun.backends.base import physical_cores
from edgerun.errors import BackendError, EdgerunError, ModelFileError, UsageError
from edgerun.formats import gguf as gguf_format
from edgerun.formats import safetensors as st_format

# user-facing type name -> llama_ftype (llama.h). F32 is written directly.
QUANT_TYPES: dict[str, int] = {
    "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q5_1": 9, "Q5_0": 8,
    "Q4_K_M": 15, "Q4_K_S": 14, "Q4_1": 3, "Q4_0": 2, "IQ4_NL": 25, "IQ4_XS": 30,
    "Q3_K_L": 13, "Q3_K_M": 12, "Q3_K_S": 11, "Q2_K": 10,
}
OUTPUT_TYPES = ("F32", *QUANT_TYPES)
# per-tensor types accepted for --token-embedding-type / --output-tensor-type (ggml type names)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0",
                "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K")
SUPPORTED_ARCHITECTURES = ("llama", "gemma3", "granitemoe")


def check_type(out_type: str) -> str:
    """Normalize and validate an output type name.

    Raises:
        UsageError: an unknown type (the message lists the valid ones).
    """
    t = out_type.upper()
    if t not in OUTPUT_TYPES:
        raise UsageError(f"unknown quantization type '{out_type}'; valid: {', '.join(OUTPUT_TYPES)}")
    return t


def check_tensor_type(name: str | None, flag: str) -> str | None:
    """Validate a per-tensor ggml type name (e.g. for ``--token-embedding-type``)."""
    if name is None:
        return None
    t = name.upper()
    if t not in TENSOR_TYPES:
        raise UsageError(f"unknown {flag} '{name}'; valid: {', '.join(TENSOR_TYPES)}")
    return t


# --- HF -> GGUF F32 ---------------------------------------------------------------------------

def permute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's: within each head, rows (0..d/2, d/2..d) become interleaved pairs.

    Args:
        w: (n_head * d_head, d_in) float array.
        n_head: heads the rows belong to (KV heads for the K projection).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: dict, key: str = "full_attention") -> float:
    rp = config.get("rope_parameters") or {}
    if "rope_theta" in rp:
        return float(rp["rope_theta"])
    if key in rp and isinstance(rp[key], dict) and "rope_theta" in rp[key]:
        return float(rp[key]["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def _rope_type(config: dict) -> str:
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "rope_type" in rp:
        return rp["rope_type"]
    types = {v.get("rope_type", "default") for v in rp.values() if isinstance(v, dict)}
    return types.pop() if len(types) == 1 else ("default" if not types else "mixed")


def _write_arch_metadata(w, arch: str, cfg: dict) -> None:
    hidden, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_head))
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    if _rope_type(cfg) != "default":
        raise UsageError(f"rope type '{_rope_type(cfg)}' is not supported by the GGUF writer yet; supported: default")
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_vocab_size(int(cfg["vocab_size"]))
    if arch in ("llama", "granitemoe"):
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    if arch == "granitemoe":
        w.add_expert_count(int(cfg["num_local_experts"]))
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
        w.add_expert_shared_feed_forward_length(int(cfg["shared_intermediate_size"]))
        w.add_attention_scale(float(cfg["attention_multiplier"]))
        w.add_embedding_scale(float(cfg["embedding_multiplier"]))
        w.add_residual_scale(float(cfg["residual_multiplier"]))
        w.add_logit_scale(float(cfg["logits_scaling"]))
    elif arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if cfg.get("sliding_window"):
            w.add_sliding_window(int(cfg["sliding_window"]))


PAD_TOKEN = "[PAD{}]"          # placeholder token text for padded embedding rows (llama.cpp's converter's)
PAD_SCORE = -1000.0            # their score, where the tokenizer has scores


def tokenizer_size(checkpoint: str | Path) -> int:
    """Number of tokens the checkpoint's tokenizer defines (sidecar token list, or BPE vocab incl. added tokens).

    Raises:
        UsageError: a plain HF checkpoint without a GPT-2-style BPE ``tokenizer.json``.
        ModelFileError: an unreadable tokenizer sidecar.
    """
    checkpoint = Path(checkpoint)
    sidecar = read_tokenizer_sidecar(checkpoint)
    if sidecar is not None:
        return len(sidecar.get("tokenizer.ggml.tokens", {}).get("value") or [])
    return _bpe_vocab(checkpoint).vocab_size


def vocab_padding(checkpoint: str | Path) -> dict | None:
    """How the writer reconciles tokenizer and embedding sizes, for the manifest; None when they agree.

    Returns:
        ``{"tokenizer_tokens": n, "embedding_rows": rows, "placeholder_tokens": rows - n,
        "placeholder": "[PAD<id>]", "token_type": "UNUSED"}`` (counts in tokens / rows).

    Raises:
        ModelFileError: fewer embedding rows (``vocab_size`` in config.json) than tokenizer tokens.
        UsageError: as for :func:`tokenizer_size`.
    """
    rows = int(st_format.read_config(Path(checkpoint))["vocab_size"])
    n = tokenizer_size(checkpoint)
    if n > rows:
        raise ModelFileError(f"{checkpoint}: the tokenizer has {n} tokens but the embedding only {rows} rows "
                             f"(vocab_size in config.json); llama.cpp needs one row per token")
    if n == rows or n == 0:
        return None
    return {"tokenizer_tokens": n, "embedding_rows": rows, "placeholder_tokens": rows - n,
            "placeholder": PAD_TOKEN.format("<id>"), "token_type": "UNUSED"}


def _pad_sidecar(sidecar: dict, rows: int) -> dict:
    """The sidecar's token arrays padded to ``rows`` entries with placeholder tokens (see :data:`PAD_TOKEN`)."""
    tokens = sidecar.get("tokenizer.ggml.tokens", {}).get("value") or []
    n = len(tokens)
    if not n or n >= rows:
        return sidecar
    out = dict(sidecar)
    pads = {"tokenizer.ggml.tokens": [PAD_TOKEN.format(i) for i in range(n, rows)],
            "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * (rows - n),
            "tokenizer.ggml.scores": [PAD_SCORE] * (rows - n)}
    for key, extra in pads.items():
        if key in out and len(out[key]["value"]) == n:
            out[key] = {**out[key], "value": list(out[key]["value"]) + extra}
    return out


def _write_tokenizer(w, checkpoint: Path, cfg: dict) -> None:
    rows = int(cfg["vocab_size"])
    vocab_padding(checkpoint)      # refuses fewer rows than tokens
    sidecar = read_tokenizer_sidecar(checkpoint)
    if sidecar is not None:
        template = checkpoint / "chat_template.jinja"
        if template.is_file():
            # the checkpoint's own template wins over the one its GGUF source had (a fine-tune may change
            # it, e.g. a reasoning model's template that knows <think> ... </think>)
            sidecar = {k: v for k, v in sidecar.items() if k != "tokenizer.chat_template"}
            w.add_chat_template(template.read_text(encoding="utf-8"))
        for key, entry in _pad_sidecar(sidecar, rows).items():
            types = [GGUFValueType[t] for t in entry["types"]]
            value = entry["value"]
            if types[0] == GGUFValueType.ARRAY:
                if not value:
                    continue
                w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=types[-1])
            else:
                w.add_key_value(key, value, types[0])
        return
    _write_bpe_tokenizer(w, checkpoint, rows)


def _bpe_vocab(checkpoint: Path) -> BpeVocab:
    try:
        return BpeVocab(checkpoint)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(f"{checkpoint}: only GPT-2-style BPE tokenizers (tokenizer.json) can be written to GGUF "
                         f"from a plain HF checkpoint ({e}); export from the model's GGUF instead") from None


def _write_bpe_tokenizer(w, checkpoint: Path, rows: int) -> None:
    """Tokenizer of a plain HF checkpoint (GPT-2-style byte-level BPE only), via gguf-py's vocab classes,
    padded with placeholder tokens to ``rows`` entries."""
    vocab = _bpe_vocab(checkpoint)
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text if isinstance(text, str) else text.decode("utf-8"))
        types.append(int(ttype))
    for i in range(len(tokens), rows):
        tokens.append(PAD_TOKEN.format(i))
        types.append(int(gguf.TokenType.UNUSED))
    w.add_tokenizer_model("gpt2")
    # The pre-tokenizer cannot be identified from tokenizer.json alone; llama.cpp's converter hashes
    # a test string. "default" is the GPT-2 regex.
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = SpecialVocab(checkpoint, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    template = checkpoint / "chat_template.jinja"
    if special.chat_template is None and template.is_file():
        w.add_chat_template(template.read_text(encoding="utf-8"))


def write_f32(checkpoint: str | Path, out: str | Path, name: str | None = None, force: bool = False,
              progress: Callable[[int, int], None] | None = None) -> Path:
    """Write an HF checkpoint (Llama or Gemma 3) as an F32 GGUF file, atomically.

    Args:
        checkpoint: HF checkpoint directory (config.json + safetensors).
        out: output ``.gguf`` path.
        name: ``general.name`` to record (default: the directory name).
        force: overwrite an existing output.
        progress: called as ``progress(done, total)`` after each tensor.

    Raises:
        UsageError: unsupported architecture or rope type, output exists without ``force``.
        ModelFileError: missing tensors, unexpected tensors or mismatched shapes; fewer embedding rows
            than tokenizer tokens (more rows are padded with placeholder tokens, :func:`vocab_padding`).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    files = st_format.checkpoint_files(checkpoint)
    cfg = st_format.read_config(checkpoint)
    arch = architecture_of(cfg)
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_head))
    tied = bool(cfg.get("tie_word_embeddings", False))
    expected = _expected_shapes(arch, cfg)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    tmap = gguf.get_tensor_name_map(model_arch, n_layer)

    handles = [safe_open(str(f), framework="numpy") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    if tied:
        where.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(where))
    if missing:
        raise ModelFileError(f"{checkpoint} is missing {len(missing)} tensors, e.g. {missing[0]}")
    unexpected = sorted(set(where) - set(expected))
    if unexpected:
        raise ModelFileError(f"{checkpoint} has tensors the {arch} writer does not know, e.g. {unexpected[0]}")

    with atomic_file(out, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=arch)
        w.add_name(name or checkpoint.name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        _write_arch_metadata(w, arch, cfg)
        _write_tokenizer(w, checkpoint, cfg)
        names = sorted(expected, key=_tensor_order)
        for i, hf_name in enumerate(names):
            data = where[hf_name].get_tensor(hf_name)
            if tuple(data.shape) != expected[hf_name]:
                raise ModelFileError(f"{checkpoint}: tensor {hf_name} has shape {tuple(data.shape)}, "
                                     f"expected {expected[hf_name]} from config.json")
            data = np.ascontiguousarray(data, dtype=np.float32)
            if arch in ("llama", "granitemoe") and hf_name.endswith("self_attn.q_proj.weight"):
                data = permute_rotary_rows(data, n_head)
            elif arch in ("llama", "granitemoe") and hf_name.endswith("self_attn.k_proj.weight"):
                data = permute_rotary_rows(data, n_kv)
            elif arch == "gemma3" and hf_name.endswith("norm.weight"):
                data = data + np.float32(1.0)
            for gguf_name, part in _gguf_tensors(arch, hf_name, data, tmap):
                w.add_tensor(gguf_name, part)
            if progress:
                progress(i + 1, len(names))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _gguf_tensors(arch: str, hf_name: str, data: np.ndarray, tmap):
    """(GGUF name, array) pairs for one HF tensor; Granite's fused gate/up tensors split in two."""
    if arch == "granitemoe" and (".block_sparse_moe." in hf_name or ".shared_mlp." in hf_name):
        bid = int(hf_name.split(".")[2])
        T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES

        def name(t):
            return names[t].format(bid=bid) + ".weight"

        if hf_name.endswith("router.weight"):
            return [(name(T.FFN_GATE_INP), data)]                              # (E, d), kept F32 by llama.cpp
        if hf_name.endswith("experts.gate_up_proj"):
            half = data.shape[1] // 2                                           # (E, 2m, d)
            return [(name(T.FFN_GATE_EXP), np.ascontiguousarray(data[:, :half])),
                    (name(T.FFN_UP_EXP), np.ascontiguousarray(data[:, half:]))]
        if hf_name.endswith("experts.down_proj"):
            return [(name(T.FFN_DOWN_EXP), data)]                               # (E, d, m)
        if hf_name.endswith("input_linear.weight"):
            half = data.shape[0] // 2                                           # (2S, d)
            return [(name(T.FFN_GATE_SHEXP), np.ascontiguousarray(data[:half])),
                    (name(T.FFN_UP_SHEXP), np.ascontiguousarray(data[half:]))]
        if hf_name.endswith("output_linear.weight"):
            return [(name(T.FFN_DOWN_SHEXP), data)]
    gguf_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ModelFileError(f"no GGUF name for tensor {hf_name} of architecture {arch}")
    return [(gguf_name, data)]


def _tensor_order(name: str) -> tuple:
    parts = name.split(".")
    layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else -1
    return (0 if "embed" in name else 2 if layer < 0 else 1, layer, name)


def _expected_shapes(arch: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, from config.json (the writer refuses anything else)."""
    d, ff, v = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_head))
    hd = int(cfg.get("head_dim") or d // n_head)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (n_head * hd, d), p + "self_attn.k_proj.weight": (n_kv * hd, d),
            p + "self_attn.v_proj.weight": (n_kv * hd, d), p + "self_attn.o_proj.weight": (d, n_head * hd),
        })
        if arch == "granitemoe":
            e, shared = int(cfg["num_local_experts"]), int(cfg["shared_intermediate_size"])
            shapes.update({p + "block_sparse_moe.router.weight": (e, d),
                           p + "block_sparse_moe.experts.gate_up_proj": (e, 2 * ff, d),
                           p + "block_sparse_moe.experts.down_proj": (e, d, ff)})
            if shared:
                shapes.update({p + "shared_mlp.input_linear.weight": (2 * shared, d),
                               p + "shared_mlp.output_linear.weight": (d, shared)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                           p + "mlp.down_proj.weight": (d, ff)})
        if arch == "gemma3":
            shapes.update({p + "pre_feedforward_layernorm.weight": (d,), p + "post_feedforward_layernorm.weight": (d,),
                           p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


# --- quantization -----------------------------------------------------------------------------

class _Captured:
    def __init__(self, path: Path):
        self.path = path

    def read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def native_output_captured():
    """Send what native code prints to stdout/stderr (llama.cpp's quantizer prints per tensor) to a temp file."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.NamedTemporaryFile(prefix="edgerun-native-", suffix=".log", delete=False) as f:
        log_path = Path(f.name)
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log_path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield _Captured(log_path)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for x in (*saved, fd):
            os.close(x)
        log_path.unlink(missing_ok=True)

def quantize(f32_gguf: str | Path, out: str | Path, out_type: str, token_embedding_type: str | None = None,
             output_tensor_type: str | None = None, threads: int | None = None, force: bool = False) -> Path:
    """Quantize an F32/F16 GGUF to ``out_type`` with ``llama_cpp.llama_model_quantize``, atomically.

    Args:
        f32_gguf: input GGUF (validated first).
        out: output path.
        out_type: one of :data:`QUANT_TYPES` (e.g. ``"Q4_K_M"``).
        token_embedding_type, output_tensor_type: ggml type for ``token_embd`` / ``output``
            (default: llama.cpp's choice for ``out_type``).
        threads: quantization threads (default: physical cores).
        force: overwrite an existing output.

    Raises:
        UsageError: unknown type names.
        ModelFileError: invalid input file.
        BackendError: llama.cpp reports a failure.
    """
    out_type = check_type(out_type)
    if out_type == "F32":
        raise UsageError("F32 is written by the writer, not by the quantizer")
    gguf_format.validate(f32_gguf)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[out_type]
    params.nthread = threads or physical_cores()
    for field, tname, flag in (("token_embedding_type", token_embedding_type, "--token-embedding-type"),
                               ("output_tensor_type", output_tensor_type, "--output-tensor-type")):
        t = check_tensor_type(tname, flag)
        if t is not None:
            setattr(params, field, int(GGMLQuantizationType[t]))
    with atomic_file(out, force=force) as tmp, native_output_captured() as captured:
        rc = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            last = [ln for ln in captured.read().splitlines() if ln.strip()][-1:] or ["no message"]
            free = shutil.disk_usage(tmp.parent).free
            if free < 1 << 20:   # llama.cpp says only "iostream error" when the disk fills
                raise EdgerunError(f"no space left on the device while writing {out} ({free // 1024} KiB free); "
                                   "nothing was written there")
            raise BackendError(f"llama.cpp failed to quantize {f32_gguf} to {out_type} (code {rc}): {last[0]}")
        if not tmp.exists() or os.path.getsize(tmp) == 0:
            raise BackendError(f"llama.cpp wrote nothing when quantizing to {out_type}")
    return Path(out)


# --- what the written file holds (manifest fields) ---------------------------------------------

K_QUANT_FAMILY = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPERBLOCK = 256   # elements per row block of the k-quants and IQ4_XS


def requested_family(out_type: str) -> tuple[str, ...]:
    """The ggml types a requested file type gives the blocks' linear weights when llama.cpp does not fall back.

    A k-quant file type (``Q2_K``, ``Q3_K_*``, ``Q4_K_*``, ``Q5_K_*``, ``Q6_K``) mixes k-quants by design
    (e.g. Q4_K_M puts some tensors in Q6_K), so its family is every k-quant; any other type's family is
    itself (``Q8_0`` -> ``("Q8_0",)``, ``IQ4_XS`` -> ``("IQ4_XS",)``).

    Raises:
        UsageError: an unknown type.
    """
    t = check_type(out_type)
    return K_QUANT_FAMILY if "_K" in t else (t,)


def _is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    # a block's 2-D projection weight (as converters.bpw counts them), minus the MoE router, which
    # llama.cpp keeps in F32 whatever the type
    return (name.startswith("blk.") and name.endswith(".weight") and len(shape) >= 2 and "norm" not in name
            and "ffn_gate_inp" not in name)


def type_record(path: str | Path, out_type: str) -> dict:
    """What a GGUF file really holds, against the type it was asked for: the export manifest's fields.

    A **fallback** is a linear weight of a block (a 2-D ``blk.*.weight`` that is not a norm or an MoE
    router) whose ggml type is not in :func:`requested_family` of ``out_type``: llama.cpp quantizes
    rows that are not a multiple of the 256-element superblock of the k-quants / IQ4_XS to another
    type (Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL). The token embedding and the output head are not counted
    (their types follow ``--token-embedding-type`` / ``--output-tensor-type`` and llama.cpp's choices).

    Args:
        path: the written GGUF file (validated).
        out_type: the requested file type, e.g. ``"Q2_K"``.

    Returns:
        ``{"tied_embeddings": bool, "tensor_types": {tensor name: ggml type},
        "fallbacks": {"count": n, "share": fraction of the linear-weight parameters (0..1),
        "requested_family": [...], "types": {ggml type: tensors}, "tensors": [names]},
        "warning": str | None}``. ``warning`` is set when more than half of the linear-weight
        parameters fell back, e.g. ``"Q2_K requested: 75% of linear weights are Q4_0/Q5_0 (rows of 576
        are not a multiple of 256)"``.

    Raises:
        ModelFileError: the file is not a valid GGUF.
        UsageError: an unknown type.
    """
    family = requested_family(out_type)
    info = gguf_format.validate(path)
    linear = [t for t in info.tensors if _is_linear_weight(t.name, t.shape)]
    fell = [t for t in linear if t.type_name not in family]
    lin_params = sum(t.n_elements for t in linear)
    share = sum(t.n_elements for t in fell) / lin_params if lin_params else 0.0
    types: dict[str, int] = {}
    for t in fell:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    warning = None
    if share > 0.5:
        warning = (f"{check_type(out_type)} requested: {share * 100:.0f}% of linear weights are "
                   f"{'/'.join(sorted(types))}")
        widths = sorted({t.shape[0] for t in fell if t.shape[0] % SUPERBLOCK})
        if widths and any(f in K_QUANT_FAMILY + ("IQ4_XS",) for f in family):
            warning += f" (rows of {', '.join(map(str, widths))} are not a multiple of {SUPERBLOCK})"
    return {
        "tied_embeddings": not any(t.name == "output.weight" for t in info.tensors),
        "tensor_types": {t.name: t.type_name for t in info.tensors},
        "fallbacks": {"count": len(fell), "share": round(share, 6), "requested_family": list(family),
                      "types": types, "tensors": [t.name for t in fell]},
        "warning": warning,
    }
