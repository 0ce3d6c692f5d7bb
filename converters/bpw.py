"""Effective bits per weight, measured from the model file itself (never inferred from a type's name).

Two forms, always both (LLMOnDevice, Sec. 3; docs/export.md "Effective BPW"):

- **file BPW** = file bytes x 8 / parameter count: what llama.cpp prints and LLMOnDevice plots.
- **linear BPW** = bytes of the linear-layer weights (with their block scales and mins) x 8 / their
  parameter count. Linear layers are the 2-D projection weights inside the transformer blocks
  (attention Q/K/V/O and FFN gate/up/down, routed and shared experts); the token embedding and the
  output head are reported separately, since on small models they dominate the file.

Also **bytes read per decoded token**: every weight byte a decode step touches, i.e. all tensors,
except that an untied token embedding contributes one row (tied embeddings are the output matrix
and are read whole). KV-cache reads come on top and depend on the context length.

On small models llama.cpp falls back to other types for rows that are not a multiple of 256, so a
"Q4_K_M" file holds a mix of types: ``tensor_types`` gives each type's share of the parameters.
Which tensors fell back, and whether that is most of them, is :func:`converters.gguf.type_record`'s
(the GGUF manifest's ``fallbacks`` and ``warning``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from edgerun.backends.onnx import validate_model_dir
from edgerun.formats import gguf as gguf_format
from edgerun.formats import safetensors as st_format

_EMBEDDING = ("token_embd.weight",)
_OUTPUT = ("output.weight",)


@dataclass
class BPWReport:
    """Effective bits per weight of one model file.

    Attributes:
        file_bytes: size of the file.
        n_params: parameters in the file (tied embeddings counted once).
        file_bpw: file_bytes * 8 / n_params (the file includes metadata: the tokenizer adds about 0.11
            BPW to SmolLM2-135M and 0.20 to Gemma 3 270M).
        tensor_bytes, tensor_bpw: bytes of the tensor data alone (weights with their scales) and
            tensor_bytes * 8 / n_params: the file BPW without metadata.
        linear_params, linear_bytes, linear_bpw: the same over the linear layers in the blocks.
        embedding_bpw, output_bpw: bits per weight of the token embedding and of the output head
            (None when absent, e.g. tied).
        bytes_per_token: weight bytes read per decoded token.
        tensor_types: ggml type -> share of all parameters (0..1).
        linear_tensor_types: ggml type -> share of the linear-layer parameters.
    """

    file_bytes: int
    n_params: int
    file_bpw: float
    linear_params: int
    linear_bytes: int
    linear_bpw: float
    embedding_bpw: float | None
    output_bpw: float | None
    bytes_per_token: int
    tensor_types: dict[str, float] = field(default_factory=dict)
    linear_tensor_types: dict[str, float] = field(default_factory=dict)
    tensor_bytes: int = 0
    tensor_bpw: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _is_linear(name: str, shape: tuple[int, ...]) -> bool:
    return name.startswith("blk.") and name.endswith(".weight") and len(shape) >= 2 and "norm" not in name


def _shares(counter: Counter, total: int) -> dict[str, float]:
    return {k: round(v / total, 6) for k, v in counter.most_common()} if total else {}


def gguf_bpw(path: str | Path) -> BPWReport:
    """Measure a GGUF file (validated first).

    Raises:
        ModelFileError: the file is not a valid GGUF.
    """
    info = gguf_format.validate(path)
    by_type, lin_type = Counter(), Counter()
    lin_params = lin_bytes = 0
    emb = out = None
    per_token = 0
    tied = not any(t.name in _OUTPUT for t in info.tensors)
    for t in info.tensors:
        by_type[t.type_name] += t.n_elements
        if _is_linear(t.name, t.shape):
            lin_params += t.n_elements
            lin_bytes += t.n_bytes
            lin_type[t.type_name] += t.n_elements
        if t.name in _EMBEDDING:
            emb = t
            rows = t.shape[-1] if len(t.shape) > 1 else 1
            per_token += t.n_bytes if tied else t.n_bytes // rows
        else:
            per_token += t.n_bytes
        if t.name in _OUTPUT:
            out = t
    n = info.n_params
    return BPWReport(
        file_bytes=info.file_size, n_params=n, file_bpw=info.file_size * 8 / n,
        linear_params=lin_params, linear_bytes=lin_bytes, linear_bpw=lin_bytes * 8 / lin_params if lin_params else 0.0,
        embedding_bpw=emb.n_bytes * 8 / emb.n_elements if emb else None,
        output_bpw=out.n_bytes * 8 / out.n_elements if out else None,
        bytes_per_token=per_token, tensor_types=_shares(by_type, n), linear_tensor_types=_shares(lin_type, lin_params),
        tensor_bytes=sum(t.n_bytes for t in info.tensors),
        tensor_bpw=sum(t.n_bytes for t in info.tensors) * 8 / n)


_NOT_PARAMS = ("cos_cache", "sin_cache")
_SCALE_SUFFIXES = ("_scales", "_scale", "_zero_point", "_zp", "_zero_points")
_LINEAR_OPS = ("MatMulNBits", "MatMulInteger", "MatMul", "DynamicQuantizeMatMul")


def _initializer_bytes(init, onnx) -> int:
    if init.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in init.external_data}.get("length", 0))
    if init.raw_data:
        return len(init.raw_data)
    numel = 1
    for d in init.dims:
        numel *= d
    return numel * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def _weight_base(name: str) -> str:
    for suffix in ("_Q4", "_Q8", "_quantized", *_SCALE_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def onnx_bpw(model_dir: str | Path) -> BPWReport:
    """Measure an ONNX model directory from its graph's initializers.

    Parameters are the file's own: a MatMulNBits weight counts K x N (its packed bytes, scales and
    zero points count as its bytes), quantization scales/zero points and the rotary cos/sin tables
    count no parameters, and an embedding the exporter stored untied counts twice, because the file
    really holds it twice.

    Raises:
        ModelFileError: not a valid model directory.
    """
    model_dir = Path(model_dir)
    cfg = validate_model_dir(model_dir)
    model_file = model_dir / cfg["model"]["decoder"]["filename"]
    model = onnx.load(str(model_file), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    nbytes = {name: _initializer_bytes(i, onnx) for name, i in inits.items()}
    params = {}
    linear_weights = set()
    kinds = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and len(node.input) > 1 and node.input[1] in inits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            params[node.input[1]] = int(attrs["K"]) * int(attrs["N"])
            kinds[node.input[1]] = f"int{attrs.get('bits', 4)}-b{attrs.get('block_size', '?')}"
        if node.op_type in _LINEAR_OPS and "/layers." in node.name:
            linear_weights.update(i for i in node.input[1:2] if i in inits)
    for name, init in inits.items():
        if name in params:
            continue
        if name in _NOT_PARAMS or name.endswith(_SCALE_SUFFIXES):
            params[name] = 0
            continue
        numel = 1
        for d in init.dims:
            numel *= d
        params[name] = numel
        kinds[name] = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
    # scales and zero points belong to the quantized weight they scale; every other initializer owns itself
    quantized = {_weight_base(w): w for w in params if params[w] and w != _weight_base(w)}
    owned = {}
    for name, b in nbytes.items():
        owner = quantized.get(_weight_base(name), name) if params.get(name, 0) == 0 else name
        owned[owner] = owned.get(owner, 0) + b
    files = [model_file, *(model_dir / f for f in {e.value for i in inits.values() for e in i.external_data
                                                     if e.key == "location"})]
    file_bytes = sum(f.stat().st_size for f in files if f.is_file())
    n = sum(params.values())
    lin_params = sum(params[w] for w in linear_weights)
    lin_bytes = sum(owned.get(w, 0) for w in linear_weights)
    by_kind, lin_kind = Counter(), Counter()
    for w, p in params.items():
        if p:
            by_kind[kinds.get(w, "?")] += p
            if w in linear_weights:
                lin_kind[kinds.get(w, "?")] += p
    emb = _embedding_initializer(model, inits)
    out = next((n_.input[1] for n_ in model.graph.node if n_.name.startswith("/lm_head/")
                and n_.op_type in _LINEAR_OPS and len(n_.input) > 1 and n_.input[1] in inits), None)
    vocab = max(1, int(cfg["model"].get("vocab_size", 1)))
    per_token = sum(b for w, b in owned.items() if w != emb or emb == out)
    if emb and emb != out:
        per_token += owned.get(emb, 0) // vocab
    return BPWReport(
        file_bytes=file_bytes, n_params=n, file_bpw=file_bytes * 8 / n if n else 0.0,
        linear_params=lin_params, linear_bytes=lin_bytes, linear_bpw=lin_bytes * 8 / lin_params if lin_params else 0.0,
        embedding_bpw=owned[emb] * 8 / params[emb] if emb and params.get(emb) else None,
        output_bpw=owned[out] * 8 / params[out] if out and params.get(out) else None,
        bytes_per_token=per_token, tensor_types=_shares(by_kind, n), linear_tensor_types=_shares(lin_kind, lin_params),
        tensor_bytes=sum(owned.values()), tensor_bpw=sum(owned.values()) * 8 / n if n else 0.0)


def _embedding_initializer(model, inits) -> str | None:
    """The initializer the token-embedding lookup reads, followed back through Reshape/Transpose nodes."""
    producers = {o: node for node in model.graph.node for o in node.output}
    node = next((n for n in model.graph.node if "embed_tokens" in n.name and n.op_type.startswith("Gather")), None)
    name = node.input[0] if node is not None else None
    for _ in range(8):
        if name is None or name in inits:
            return name
        prev = producers.get(name)
        name = prev.input[0] if prev is not None and prev.input else None
    return None


def checkpoint_bpw(directory: str | Path) -> BPWReport:
    """Measure an HF safetensors checkpoint, including edgerun's GPTQ-layout PTQ checkpoints.

    A GPTQ-layout linear counts in x out parameters; its ``qweight``, ``qzeros``, ``scales`` and
    ``g_idx`` bytes are its bytes.

    Raises:
        ModelFileError: invalid checkpoint.
    """
    directory = Path(directory)
    files = st_format.checkpoint_files(directory)
    cfg = st_format.read_config(directory)
    bits = (cfg.get("quantization_config") or {}).get("bits")
    tensors = {}
    for f in files:
        tensors.update(st_format.validate_file(f))
    params, owned, kinds = {}, {}, {}
    for name, t in tensors.items():
        size = t.end - t.begin
        base, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
            key = base + ".weight"
            owned[key] = owned.get(key, 0) + size
            if leaf == "qweight":
                params[key] = t.shape[0] * 32 // bits * t.shape[1]
                kinds[key] = f"int{bits}"
            continue
        numel = 1
        for d in t.shape:
            numel *= d
        params[name], owned[name], kinds[name] = numel, owned.get(name, 0) + size, t.dtype
    file_bytes = sum(f.stat().st_size for f in files)
    n = sum(params.values())
    linear = [k for k in params if ".layers." in k and k.endswith("proj.weight")]
    lin_params = sum(params[k] for k in linear)
    lin_bytes = sum(owned[k] for k in linear)
    by_kind, lin_kind = Counter(), Counter()
    for k, p in params.items():
        by_kind[kinds[k]] += p
        if k in linear:
            lin_kind[kinds[k]] += p
    emb = "model.embed_tokens.weight" if "model.embed_tokens.weight" in params else None
    out = "lm_head.weight" if "lm_head.weight" in params else None
    vocab = int(cfg.get("vocab_size", 1))
    per_token = sum(b for k, b in owned.items() if k != emb) + ((owned[emb] if out is None else owned[emb] // vocab)
                                                                if emb else 0)
    return BPWReport(
        file_bytes=file_bytes, n_params=n, file_bpw=file_bytes * 8 / n,
        linear_params=lin_params, linear_bytes=lin_bytes, linear_bpw=lin_bytes * 8 / lin_params if lin_params else 0.0,
        embedding_bpw=owned[emb] * 8 / params[emb] if emb else None,
        output_bpw=owned[out] * 8 / params[out] if out else None,
        bytes_per_token=per_token, tensor_types=_shares(by_kind, n), linear_tensor_types=_shares(lin_kind, lin_params),
        tensor_bytes=sum(owned.values()), tensor_bpw=sum(owned.values()) * 8 / n if n else 0.0)
