"""Group-wise integer weight quantization and the GPTQ checkpoint layout (bit packing).

Quantizer: :mod:`edgerun.minmax` (asymmetric min/max, zero = round(-min / scale)), per output row
and per group of ``group_size`` input columns, over the group's range widened to hold 0::

    scale = (max(w_g, 0) - min(w_g, 0)) / (2^bits - 1)   zero = round(-min(w_g, 0) / scale)
    q = clamp(round(w / scale) + zero, 0, 2^bits - 1)    w_hat = (q - zero) * scale

Storage follows the GPTQ checkpoint layout used by AutoGPTQ / GPTQModel / transformers
(``quant_method: gptq``, ``checkpoint_format: gptq``), per linear layer of shape (out, in):

- ``qweight`` int32 (in * bits / 32, out): the codes of each output column, packed along the input
  dimension as a little-endian bit stream (value j occupies bits ``bits*j .. bits*j+bits-1``; for 3
  bits, 32 values fill 3 words and values straddle word boundaries);
- ``qzeros`` int32 (in / group_size, out * bits / 32): zero points packed the same way along the
  output dimension, stored minus one (the GPTQ v1 convention);
- ``scales`` float16 (in / group_size, out);
- ``g_idx`` int32 (in,): the group of each input column (``i // group_size``; no act-order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from edgerun import minmax
from edgerun.formats import safetensors as st_format

BITS = (2, 3, 4, 8)


@dataclass
class QuantizedLinear:
    """Integer codes of one linear layer's weight (out, in) with per-group scales and zero points.

    Attributes:
        q: uint8 codes, shape (out, in).
        scales: float32 (out, in // group_size).
        zeros: int32 zero points, shape (out, in // group_size).
        bits, group_size: the format.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """float32 weight (out, in): (q - zero) * scale, group by group."""
        g = self.group_size
        scales = self.scales.repeat_interleave(g, dim=1)
        zeros = self.zeros.repeat_interleave(g, dim=1).float()
        return minmax.dequantize(self.q.float(), scales, zeros)


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ weight grid of each row of ``w`` (rows, group): scale and zero point, both (rows,), ``w``'s dtype.

    :mod:`edgerun.minmax` over the row's range widened to hold 0 (min clamped <= 0, max >= 0, as
    GPTQ's reference quantizer does), so zero is an integer in [0, 2^bits - 1]; an all-zero row gets
    scale 1.
    """
    wmin = torch.clamp(w.min(dim=1).values, max=0.0)
    wmax = torch.clamp(w.max(dim=1).values, min=0.0)
    scale = minmax.scale_of(wmin, wmax, bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, minmax.zero_point(wmin, scale)


def check_format(in_features: int, bits: int, group_size: int) -> None:
    """Raise ValueError unless ``bits`` and ``group_size`` fit a layer with ``in_features`` inputs."""
    if bits not in BITS:
        raise ValueError(f"{bits}-bit weights are not supported; use one of {', '.join(map(str, BITS))}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the layer's {in_features} inputs")
    if (in_features * bits) % 32:
        raise ValueError(f"{in_features} inputs at {bits} bits do not fill whole 32-bit words")


def rtn(w: torch.Tensor, bits: int, group_size: int) -> QuantizedLinear:
    """Round-to-nearest group-wise quantization of a weight (out, in), float32, on the :func:`group_params` grid.

    Raises:
        ValueError: ``bits`` or ``group_size`` do not fit the layer (:func:`check_format`).
    """
    out_f, in_f = w.shape
    check_format(in_f, bits, group_size)
    groups = w.reshape(out_f * (in_f // group_size), group_size)
    scale, zero = group_params(groups, bits)
    q = minmax.quantize(groups, scale[:, None], zero[:, None], bits).reshape(out_f, in_f)
    return QuantizedLinear(q.to(torch.uint8), scale.reshape(out_f, -1), zero.reshape(out_f, -1).to(torch.int32),
                           bits, group_size)


# --- GPTQ checkpoint layout ---------------------------------------------------------------------

def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (n, m) along axis 0 into int32 words (n * bits / 32, m), as a little-endian bit stream."""
    n, m = values.shape
    v = values.astype(np.uint64)
    out = np.zeros((n * bits // 32, m), dtype=np.uint64)
    for j in range(n):
        bit = j * bits
        word, shift = divmod(bit, 32)
        out[word] |= (v[j] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # the value straddles two words (3-bit codes)
            out[word + 1] |= v[j] >> np.uint64(32 - shift)
    return out.astype(np.uint32).view(np.int32)


def unpack_bits(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: int32 words (n * bits / 32, m) -> codes (n, m) as uint8."""
    w = words.view(np.uint32).astype(np.uint64)
    mask = np.uint64(2 ** bits - 1)
    out = np.empty((n, w.shape[1]), dtype=np.uint8)
    for j in range(n):
        word, shift = divmod(j * bits, 32)
        val = w[word] >> np.uint64(shift)
        if shift + bits > 32:
            val |= w[word + 1] << np.uint64(32 - shift)
        out[j] = (val & mask).astype(np.uint8)
    return out


def to_gptq_tensors(ql: QuantizedLinear) -> dict[str, np.ndarray]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one layer in the GPTQ checkpoint layout."""
    out_f, in_f = ql.q.shape
    q = ql.q.numpy().T  # (in, out): pack along the input dimension
    zeros = (ql.zeros.numpy().T - 1) & (2 ** ql.bits - 1)  # (groups, out), GPTQ v1 stores zero - 1
    return {
        "qweight": pack_bits(q, ql.bits),
        "qzeros": pack_bits(zeros.T.astype(np.uint32), ql.bits).T.copy(),
        "scales": ql.scales.numpy().T.astype(np.float16).copy(),
        "g_idx": (np.arange(in_f) // ql.group_size).astype(np.int32),
    }


def from_gptq_tensors(t: dict[str, np.ndarray], bits: int, group_size: int, in_f: int, out_f: int) -> QuantizedLinear:
    """Read one layer back from the GPTQ layout (scales come back as their float16 values)."""
    q = unpack_bits(t["qweight"], bits, in_f).T
    # (groups, out); stored zero - 1 modulo 2^bits, so zero 0 round-trips
    zeros = (unpack_bits(t["qzeros"].T.copy(), bits, out_f).T.astype(np.int32) + 1) & (2 ** bits - 1)
    return QuantizedLinear(torch.from_numpy(q.copy()), torch.from_numpy(t["scales"].astype(np.float32).T.copy()),
                           torch.from_numpy(zeros.T.copy()), bits, group_size)


# --- reading a quantized checkpoint (the torch and MixPE backends) ------------------------------------

def is_quantized_checkpoint(config: dict) -> bool:
    """True for a checkpoint written by :func:`quantize_checkpoint` (GPTQ layout with an edgerun method)."""
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "gptq" and "edgerun_method" in qc


def dequantized_state_dict(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """float32 state dict of a quantized checkpoint (every linear dequantized) and its config without quantization.

    Raises:
        ModelFileError: invalid safetensors.
    """
    checkpoint = Path(checkpoint)
    cfg = st_format.read_config(checkpoint)
    qc = cfg.pop("quantization_config")
    raw = {}
    for f in st_format.checkpoint_files(checkpoint):
        raw.update(load_file(str(f)))
    state = {}
    bases = {k.removesuffix(".qweight") for k in raw if k.endswith(".qweight")}
    for base in bases:
        g = {k: raw[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        in_f = g["g_idx"].shape[0]
        out_f = g["scales"].shape[1]
        state[f"{base}.weight"] = from_gptq_tensors(g, qc["bits"], qc["group_size"], in_f, out_f).dequantize()
    for k, v in raw.items():
        if k.rsplit(".", 1)[0] not in bases:
            state[k] = torch.from_numpy(v)
    return state, cfg
