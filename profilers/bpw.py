"""Effective bits per weight, measured from the model file itself (never inferred from a type's name).

Two forms, always both (LLMOnDevice, Sec. 3; DESIGN.md "Measurements"):

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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgerun.formats import gguf as gguf_format

_EMBEDDING = ("token_embd.weight",)
_OUTPUT = ("output.weight",)


@dataclass
class BPWReport:
    """Effective bits per weight of one model file.

    Attributes:
        file_bytes: size of the file.
        n_params: parameters in the file (tied embeddings counted once).
        file_bpw: file_bytes * 8 / n_params.
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
        bytes_per_token=per_token, tensor_types=_shares(by_type, n), linear_tensor_types=_shares(lin_type, lin_params))
