"""MixPE-style mixed-precision GEMM emulation: dequantize after per-group accumulation, shift-and-add products.

MixPE (Zhang et al., "MixPE: Quantization and Hardware Co-design for Efficient LLM Inference",
arXiv 2411.16158, Sec. 3): with group-wise weights W[n, k] = s[n, g] * (q[n, k] - z[n, g]) over groups
g of ``gs`` input channels,

    y[t, n] = sum_g s[n, g] * ( sum_{k in g} x[t, k] q[n, k]  -  z[n, g] * S[t, g] ),   S[t, g] = sum_{k in g} x[t, k]

so each group's low-bit x high-precision products accumulate without dequantization, and only one
scale multiply and one zero-point correction per (group, output) remain (Sec. 3.2, Eq. 2). Each
product is realised in hardware as shift-and-add over the weight's bits (Sec. 3.3): for a
two's-complement INT4 code q = -8 b3 + 4 b2 + 2 b1 + b0, ``x * q = -(x << 3) b3 + (x << 2) b2 + (x << 1) b1 + x b0``.

Two GEMM paths compute the per-group partial sums P[t, n, g] = sum_{k in g} x[t, k] q[n, k]:

* ``codes`` (default): the signed integer codes are packed once per layer at load, (G, gs, N), and
  every forward multiplies them with the activations group by group. Since the sum over bit-planes of
  (bit weight x plane) is the code itself, the integer partial sums are bit-identical to the
  bit-plane path. A8 modes keep the codes as int8 and multiply int8 x int8 with int32 accumulation
  (``torch._int_mm``, exact): at a few tokens per forward (decode) as one matrix product of a
  block-diagonal activation matrix (t*G, K) with the codes (K, N), which reads the int8 weights once
  (G times the MACs, but decode is bound by reading weights); at more tokens one product per group.
  Where ``_int_mm`` is missing, float32 batched matmul (exact: every partial sum is an integer of
  magnitude <= 127 * 2^(bits-1) * gs, checked at load to be < 2^24). A16 modes use one batched
  matmul in the ``accum`` dtype.
* ``bitplane``: the shift-and-add realisation evaluated literally, bit-plane by bit-plane (one
  float64 contraction per 0/1 plane, scaled by its bit's weight and added). Slow; the test oracle.

Then, after the accumulation, one scale multiply and one zero-point correction per (group, output)
with the activation group sum S[t, g], in float64 on both paths.

Modes: ``W4A8`` / ``W8A8`` (activations quantized per token to int8, symmetric; integer arithmetic),
``W4A16`` / ``W8A16`` (fp16 activations; the ``accum`` option sets the precision of the per-group
products and partial sums: ``fp32`` (default), ``fp16``, ``bf16`` (activations rounded to bf16
instead of fp16), or ``fp64``). The weights are an edgerun PTQ checkpoint (GPTQ layout,
:mod:`converters.ptq`), any method (RTN, GPTQ, AWQ; AWQ's scales are already folded into the
preceding operation by the PTQ pass).

Accounting: operations per layer and token (:class:`OpCounts`), and a time/energy model of the MixPE
simulator's accelerators (:func:`model_design`): per layer, cycles = max(compute, DRAM traffic) with
the simulator's per-PE throughput factor, energy = PE leakage over every cycle + PE dynamic energy
over compute cycles + SRAM + DRAM + static. It reproduces the simulator's published time row for
OPT-6.7B (:data:`SIMULATOR_RESULTS`); it is a model, not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.numpy import load_file
from torch import nn

from edgerun.backends.torch import TorchBackend
from edgerun.errors import UsageError
from edgerun.formats import safetensors as st_format
from edgerun.formats.gptq import from_gptq_tensors, is_quantized_checkpoint

MODES = {"W4A8": (4, 8), "W4A16": (4, 16), "W8A8": (8, 8), "W8A16": (8, 16)}
COST_TABLE = Path(__file__).with_name("mixpe_costs.yaml")
GEMM_PATHS = ("codes", "bitplane")
# W4A16/W8A16 group accumulation: name -> (dtype of the products and partial sums, activation rounding)
ACCUMULATIONS = {"fp32": (torch.float32, torch.float16), "fp16": (torch.float16, torch.float16),
                 "bf16": (torch.bfloat16, torch.bfloat16), "fp64": (torch.float64, torch.float16)}
FLOAT32_EXACT = 2 ** 24  # integers of smaller magnitude are exact in float32


def signed_codes(q: torch.Tensor, z: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes and zero points (0..2^bits-1) -> two's-complement codes and shifted zero points.

    Args:
        q: codes, any integer dtype and shape (usually (N, K)). z: zero points (usually (N, G)).
        bits: weight bits.

    Returns:
        (q_s, z_s) int64, same shapes: q_s = q - 2^(bits-1), z_s = z - 2^(bits-1), so (q - z) is unchanged.
    """
    off = 2 ** (bits - 1)
    return q.to(torch.int64) - off, z.to(torch.int64) - off


def bit_planes(q_signed: torch.Tensor, bits: int) -> list[tuple[int, torch.Tensor]]:
    """(weight, 0/1 plane) pairs of a two's-complement code tensor (MixPE Sec. 3.3).

    Args:
        q_signed: integer codes in [-2^(bits-1), 2^(bits-1)), any shape. bits: code width.

    Returns:
        ``bits`` pairs (bit weight, int64 0/1 tensor of q_signed's shape); the top bit weighs -2^(bits-1),
        so sum(weight * plane) == q_signed.
    """
    u = q_signed & (2 ** bits - 1)
    planes = []
    for i in range(bits):
        weight = -(2 ** i) if i == bits - 1 else 2 ** i
        planes.append((weight, ((u >> i) & 1).to(torch.int64)))
    return planes


def shift_add_product(x: int, q_signed: int, bits: int = 4) -> int:
    """x * q for an integer activation x and a two's-complement weight code q, by shift-and-add over q's bits.

    MixPE Sec. 3.3: one shifted add of x per set bit of q, the top bit subtracting. Python ints.
    """
    u = q_signed & (2 ** bits - 1)
    acc = 0
    for i in range(bits):
        if (u >> i) & 1:
            acc += -(x << i) if i == bits - 1 else (x << i)
    return acc


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization of activations (the A8 of W4A8, MixPE Sec. 4).

    Args:
        x: (tokens, K), any float dtype.

    Returns:
        (codes int64 (tokens, K) in [-127, 127], scales float64 (tokens,)); x ~= codes * scale.
    """
    x = x.double()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    return torch.clamp(torch.round(x / scale[:, None]), -127, 127).to(torch.int64), scale


def _grouped(x: torch.Tensor, n_groups: int, group_size: int) -> torch.Tensor:
    """(tokens, K) -> (tokens, G, gs), the last group zero-padded (adds nothing to products or sums)."""
    return F.pad(x, (0, n_groups * group_size - x.shape[1])).reshape(x.shape[0], n_groups, group_size)


def bitplane_partial_sums(x: torch.Tensor, q_signed: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Per-group partial sums by shift-and-add over the codes' bit-planes (MixPE Sec. 3.3): the oracle.

    Args:
        x: activations (tokens, K); integer-valued for A8. q_signed: two's-complement codes (N, K).
        group_size: input channels per group; K need not be a multiple (zero-padded last group).
        bits: code width.

    Returns:
        P (tokens, N, G) float64: P[t, n, g] = sum_{k in g} x[t, k] q[n, k], computed as one contraction
        per 0/1 bit-plane, scaled by the bit's weight and added. Exact for integer x (|sums| < 2^53).
    """
    n, k = q_signed.shape
    n_groups = -(-k // group_size)
    xs = _grouped(x.double(), n_groups, group_size)                                   # (t, G, gs)
    planes = bit_planes(F.pad(q_signed.to(torch.int64), (0, n_groups * group_size - k)), bits)
    partial = torch.zeros(x.shape[0], n, n_groups, dtype=torch.float64)
    for weight, plane in planes:                                                      # shift-and-add over bits
        partial += weight * torch.einsum("tgk,ngk->tng", xs, plane.double().reshape(n, n_groups, group_size))
    return partial


def pack_codes(q_signed: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Signed codes (N, K) -> (G, gs, N) in ``dtype``, the layout of :func:`codes_partial_sums` (done once at load).

    The codes are small integers (|q| <= 2^(bits-1) <= 128), exact in every float dtype offered.
    """
    n, k = q_signed.shape
    n_groups = -(-k // group_size)
    padded = F.pad(q_signed.to(torch.int64), (0, n_groups * group_size - k))
    return padded.reshape(n, n_groups, group_size).permute(1, 2, 0).to(dtype).contiguous()


def int8_mm_available() -> bool:
    """Whether this torch has an int8 x int8 -> int32 matrix product on CPU (``torch._int_mm``)."""
    global _INT_MM
    if _INT_MM is None:
        try:
            a = torch.ones(2, 8, dtype=torch.int8)
            _INT_MM = bool(torch.equal(torch._int_mm(a, a.t().contiguous()), torch.full((2, 2), 8, dtype=torch.int32)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT_MM = False
    return _INT_MM


_INT_MM: bool | None = None
BLOCK_DIAGONAL_MAX_ROWS = 48  # t * G up to this: one block-diagonal product; above: one product per group


def int8_partial_sums(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-group integer partial sums of int8 activation codes with int8 weight codes, exact (int32).

    Args:
        x: integer activation codes (tokens, K) in [-127, 127], any integer dtype. codes: (G, gs, N) int8
            from :func:`pack_codes` (``dtype=torch.int8``).

    Returns:
        P (tokens, N, G) int32 (a permuted view): P[t, n, g] = sum_{k in g} x[t, k] q[n, k]; every product
        and sum is an integer below 2^31, so equal to :func:`bitplane_partial_sums` exactly.

    With t * G <= :data:`BLOCK_DIAGONAL_MAX_ROWS` (decode), one ``_int_mm`` of the block-diagonal
    activations (t*G, G*gs), row (t, g) holding x's group g and zeros elsewhere, with the codes
    (G*gs, N); otherwise one ``_int_mm`` of (t, gs) x (gs, N) per group.
    """
    n_groups, group_size, n = codes.shape
    t = x.shape[0]
    xg = _grouped(x.to(torch.int8), n_groups, group_size)                               # (t, G, gs)
    if t * n_groups <= BLOCK_DIAGONAL_MAX_ROWS:
        block = torch.zeros(t, n_groups, n_groups, group_size, dtype=torch.int8)
        block.diagonal(dim1=1, dim2=2).copy_(xg.transpose(1, 2))                         # block[t, g, g, :] = xg[t, g]
        p = torch._int_mm(block.view(t * n_groups, n_groups * group_size), codes.view(n_groups * group_size, n))
        return p.view(t, n_groups, n).permute(0, 2, 1)
    xs = xg.transpose(0, 1).contiguous()                                                # (G, t, gs)
    p = torch.stack([torch._int_mm(xs[g], codes[g]) for g in range(n_groups)])            # (G, t, N)
    return p.permute(1, 2, 0)


def codes_partial_sums(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-group partial sums as one batched matmul of packed codes with the activations.

    Args:
        x: activations (tokens, K); converted to ``codes.dtype`` (callers round first: int8 codes for
            A8, fp16/bf16 for A16). codes: (G, gs, N) from :func:`pack_codes`.

    Returns:
        P (tokens, N, G) in ``codes.dtype`` (a transposed view): P[t, n, g] = sum_{k in g} x[t, k] q[n, k].
        Equal to :func:`bitplane_partial_sums` bit for bit when x is integer and every partial sum is
        below 2^24 in float32 (see :func:`check_float32_exact`); else rounded as the dtype's matmul rounds.
    """
    n_groups, group_size, _ = codes.shape
    xs = _grouped(x.to(codes.dtype), n_groups, group_size).transpose(0, 1)          # (G, t, gs)
    return torch.bmm(xs, codes).permute(1, 2, 0)                                      # (G, t, N) -> (t, N, G)


def check_float32_exact(group_size: int, bits: int, act_max: int = 127) -> int:
    """The largest |partial sum| an integer group can reach, checked to be exact in float32.

    Every product |x q| <= act_max * 2^(bits-1) and a group has ``group_size`` of them, so every
    intermediate sum of a group's accumulation is an integer below ``act_max * 2^(bits-1) * group_size``.

    Returns:
        that bound (an int).

    Raises:
        ValueError: the bound is not below 2^24 (float32 would round; e.g. W8A8 with groups over 1032).
    """
    bound = act_max * 2 ** (bits - 1) * group_size
    if bound >= FLOAT32_EXACT:
        raise ValueError(f"integer partial sums reach {bound} >= 2^24 with groups of {group_size} and {bits}-bit "
                         f"codes: float32 accumulation would not be exact; use gemm='bitplane'")
    return bound


def dequantize_partial_sums(partial: torch.Tensor, row_sum: torch.Tensor, z_signed: torch.Tensor,
                            scales: torch.Tensor) -> torch.Tensor:
    """MixPE's dequantization after accumulation (Sec. 3.2, Eq. 2), in float64.

    Args:
        partial: P (tokens, N, G). row_sum: S (tokens, G), the activation sum of each group.
        z_signed: shifted zero points (N, G). scales: (N, G).

    Returns:
        y (tokens, N) float64 = sum_g s[n, g] * (P[t, n, g] - z[n, g] * S[t, g]): one scale multiply and
        one zero-point correction per (group, output).
    """
    z, s = z_signed.to(torch.float64), scales.to(torch.float64)       # no-ops when stored as float64
    corrected = partial.to(torch.float64) - z[None, :, :] * row_sum.to(torch.float64)[:, None, :]
    return (corrected * s[None, :, :]).sum(dim=2)


def group_accumulate_gemm(x: torch.Tensor, q_signed: torch.Tensor, z_signed: torch.Tensor, scales: torch.Tensor,
                          group_size: int, bits: int, integer: bool) -> torch.Tensor:
    """MixPE GEMM by the bit-plane path (the oracle): y (tokens, N) float64.

    Args:
        x: activations (tokens, K) (int8 codes for the integer path). q_signed: codes (N, K).
        z_signed, scales: (N, G). group_size, bits: format. integer: x must be integer-valued.

    Arithmetic is float64, exact for the integer path (|x| <= 127, group sums < 2^53). A last group
    shorter than ``group_size`` is zero-padded, which adds nothing to its products or its sum.

    Raises:
        ValueError: ``integer`` with non-integer activations.
    """
    if integer and not torch.equal(x, x.round()):
        raise ValueError("the integer path needs integer activation codes")
    n_groups = scales.shape[1]
    partial = bitplane_partial_sums(x, q_signed, group_size, bits)
    row_sum = _grouped(x.double(), n_groups, group_size).sum(dim=2)                  # S[t, g]: (t, G)
    return dequantize_partial_sums(partial, row_sum, z_signed, scales)


@dataclass
class OpCounts:
    """Operations a GEMM of one token needs (counts, not time).

    Attributes:
        macs: multiply-accumulates (K x N).
        shift_adds: additions realising the products by shift-and-add (sum of popcounts of the codes).
        dequant_ops: dequantization arithmetic (per group and output for MixPE; per weight in the loop).
        row_sum_adds: additions for the activation group sums S[t, g].
        act_quant_ops: per-token activation quantization (scale, divide/round per element) for A8.
        weight_bytes, activation_bytes: bytes moved for weights (with scales/zeros) and activations.
    """

    macs: int = 0
    shift_adds: int = 0
    dequant_ops: int = 0
    row_sum_adds: int = 0
    act_quant_ops: int = 0
    weight_bytes: float = 0.0
    activation_bytes: float = 0.0

    def __iadd__(self, other: "OpCounts") -> "OpCounts":
        return self.add_scaled(other, 1)

    def add_scaled(self, other: "OpCounts", times: int) -> "OpCounts":
        """Add ``times`` x ``other`` field by field, in place (cheap: no dict copies; it runs every forward)."""
        for k in _OPCOUNT_FIELDS:
            setattr(self, k, getattr(self, k) + getattr(other, k) * times)
        return self

    def as_dict(self) -> dict:
        return asdict(self)


_OPCOUNT_FIELDS = tuple(OpCounts.__dataclass_fields__)


def count_ops(k: int, n: int, group_size: int, bits: int, act_bits: int, popcount_total: int,
              scheme: str = "mixpe") -> OpCounts:
    """Per-token operations of a K -> N linear layer under ``scheme`` (``mixpe``, ``dequant-loop``, ``fp16``)."""
    groups = -(-k // group_size)
    meta_bytes = groups * n * 2 * 2                                  # fp16 scale + zero per (group, output)
    if scheme == "fp16":
        return OpCounts(macs=k * n, weight_bytes=k * n * 2, activation_bytes=k * 2)
    if scheme == "dequant-loop":                                      # every weight: 1 sub + 1 mul, then FP16 MAC
        return OpCounts(macs=k * n, dequant_ops=2 * k * n, weight_bytes=k * n * bits / 8 + meta_bytes,
                        activation_bytes=k * 2)
    last = k - (groups - 1) * group_size
    row_sums = (groups - 1) * (group_size - 1) + (last - 1)
    return OpCounts(macs=k * n, shift_adds=popcount_total, dequant_ops=4 * groups * n, row_sum_adds=row_sums,
                    act_quant_ops=2 * k if act_bits == 8 else 0,
                    weight_bytes=k * n * bits / 8 + meta_bytes, activation_bytes=k * act_bits / 8)


def load_cost_table(path: str | Path | None = None) -> dict:
    """The MixPE simulator's designs and energy constants (YAML; default ``mixpe_costs.yaml``).

    Fields: ``clock_mhz``; ``if_width_bits`` (DRAM bits per cycle); ``designs.{W4A8,W4A16,FP16}`` with
    ``array`` [rows, cols], ``precision`` [max, min] bits, ``pe_dynamic_pj``, ``pe_leakage_pj`` (per PE
    per cycle); ``dram_pj_per_bit.{read,write}``; ``static_pj_per_cycle``; ``sram_pj_per_bit.{wgt,act,out}_{read,write}``.

    Raises:
        UsageError: unreadable, or a field missing or malformed (named).
    """
    path = Path(path) if path else COST_TABLE
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read cost table {path}: {e}") from None
    if not isinstance(table, dict):
        raise UsageError(f"cost table {path} is not a mapping")
    number = (int, float)

    def need(obj, key, kind, where):
        if not isinstance(obj, dict) or not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
            raise UsageError(f"cost table {path}: field '{where}{key}' is missing or malformed")
        return obj[key]

    for key, kind in (("clock_mhz", number), ("if_width_bits", int), ("designs", dict), ("dram_pj_per_bit", dict),
                      ("static_pj_per_cycle", number), ("sram_pj_per_bit", dict)):
        need(table, key, kind, "")
    for key in ("read", "write"):
        need(table["dram_pj_per_bit"], key, number, "dram_pj_per_bit.")
    for key in ("wgt_read", "wgt_write", "act_read", "act_write", "out_read", "out_write"):
        need(table["sram_pj_per_bit"], key, number, "sram_pj_per_bit.")
    for name in ("W4A8", "W4A16", "FP16"):
        d = need(table["designs"], name, dict, "designs.")
        for key in ("array", "precision"):
            v = need(d, key, list, f"designs.{name}.")
            if not (len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v)):
                raise UsageError(f"cost table {path}: field 'designs.{name}.{key}' must be two positive integers")
        for key in ("pe_dynamic_pj", "pe_leakage_pj"):
            need(d, key, number, f"designs.{name}.")
    return table


# --- time and energy model of the MixPE simulator --------------------------------------------------------
#
# The simulator (github.com/yuzhang712/mixpe_simulator @ 7e0d42c, a BitFusion/DNNWeaver2 derivative) maps a
# linear layer K -> N at batch B output-stationary onto a rows x cols array whose PEs take (max, min)
# precision bits; an operand of p bits gets the throughput factor floor(max / max(p, min)) on its side
# (accelerator.py, get_perf_factor), so compute cycles = ceil(B / (rows f)) * ceil(N / (cols f)) * K
# (get_compute_cycles_output_stationary), and the layer waits for DRAM when its traffic at if_width bits
# per cycle takes longer (optimizer.py: compute + max(0, memory - compute) + fill latency). Its LLM
# workloads (benchmarks/int48_bench.py, mixfloat_bench.py, float_bench.py) give both operands of a layer
# the same precision and add one small GEMM per layer:
#   MixPE W4A8  : K -> N at 4 bits,  plus dequantization K/8 -> N/128 at 8 bits   (8/4 PEs)
#   MixPE W4A16 : K -> N at 8 bits,  plus dequantization K/8 -> N/128 at 16 bits  (16/8 PEs)
#   FP16        : K -> N at 16 bits, plus K -> N/8 at 16 bits                     (16/16 PEs)
# We follow those conventions (so W4A8's int8 activations count at 4 bits, as the simulator counts them).

SIMULATOR_MODELS = {  # hidden, FFN, blocks of the simulator's LLM workloads (int48_bench.py etc.; 4 GEMMs a block)
    "OPT-6.7B": (4096, 16384, 32),
    "Llama2-13B": (5120, 20480, 40),   # the simulator's shapes: no gate projection, FFN 4 x hidden
}
# The simulator's released results (results/mixpe_res.csv @ 7e0d42c): execution time normalized to FP16 = 1,
# batch 64, two decimals; energy = static + DRAM + buffer + core of the same file.
SIMULATOR_RESULTS = {
    "OPT-6.7B": {"time": {"W4A8": 0.10, "W4A16": 0.19}, "energy": {"W4A8": 0.14, "W4A16": 0.22}},
    "Llama2-13B": {"time": {"W4A8": 0.10, "W4A16": 0.19}, "energy": {"W4A8": 0.14, "W4A16": 0.22}},
}
CALIBRATION_ROW = "OPT-6.7B"


def simulator_llm_shapes(hidden: int, ffn: int, blocks: int) -> list[tuple[int, int]]:
    """(K, N) of the four weight GEMMs per block of the simulator's LLM workloads: QKV, O, FC1, FC2."""
    return [(hidden, 3 * hidden), (hidden, hidden), (hidden, ffn), (ffn, hidden)] * blocks


def design_for(mode: str) -> str:
    """The simulator design that runs ``mode``: ``W4A8`` for the A8 modes, ``W4A16`` for A16, or ``FP16``."""
    if mode == "FP16":
        return "FP16"
    return "W4A8" if mode.endswith("A8") else "W4A16"


def workload(shapes: list[tuple[int, int]], mode: str, table: dict) -> list[tuple[int, int, int]]:
    """The simulator's GEMM list for linear layers ``shapes`` [(K, N)] under ``mode`` (or ``FP16``).

    Returns:
        [(K, N, precision bits)]: each layer's main GEMM and its extra GEMM as the simulator's benchmark
        files build them (module comment above); 8-bit weights (W8A8/W8A16) run at 8 bits on the same PEs.
    """
    out = []
    design = table["designs"][design_for(mode)]
    high, low = design["precision"]
    for k, n in shapes:
        if mode == "FP16":
            out += [(k, -(-n // 8), 16), (k, n, 16)]
        else:
            wbits = max(MODES[mode][0], low)
            out += [(k, n, wbits), (-(-k // 8), -(-n // 128), min(2 * low, high))]
    return out


def model_design(shapes: list[tuple[int, int]], mode: str, batch: int, table: dict) -> dict:
    """Time and energy of one step at ``batch`` tokens through layers ``shapes`` on the simulator's design.

    Per GEMM K -> N at p bits on a rows x cols array of (max, min)-bit PEs, f = floor(max / max(p, min)):
    compute = ceil(batch / (rows f)) * ceil(N / (cols f)) * K cycles; DRAM traffic = weights K N p +
    activations batch K p read, outputs batch N 16 written, at ``if_width_bits`` per cycle; cycles =
    max(compute, traffic). Energy (pJ): leakage of every PE over all cycles + dynamic energy of every PE
    over compute cycles; DRAM read/write per bit; SRAM: per MAC one activation and one weight read of p
    bits, outputs read and written once at 16 bits, DRAM traffic written into the buffers; static energy
    per cycle. Not modelled: the simulator's tiling search (tile padding, re-reads) and fill latency.

    Args:
        shapes: [(K, N)] linear layers. mode: a MixPE mode or ``FP16``. batch: tokens per step (>= 1).
        table: :func:`load_cost_table`.

    Returns:
        dict: ``cycles``, ``compute_cycles``, ``memory_cycles`` (sums), ``memory_bound_gemms`` (count),
        ``gemms``, ``time_s``, ``energy_pj`` and its parts ``static_pj``, ``dram_pj``, ``sram_pj``,
        ``core_pj``, ``design``, ``array`` ("rows x cols"), ``batch``.

    Raises:
        ValueError: batch < 1.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    name = design_for(mode)
    d = table["designs"][name]
    rows, cols = d["array"]
    high, low = d["precision"]
    sram, dram = table["sram_pj_per_bit"], table["dram_pj_per_bit"]
    tot = dict(cycles=0, compute_cycles=0, memory_cycles=0, memory_bound_gemms=0, static_pj=0.0, dram_pj=0.0,
               sram_pj=0.0, core_pj=0.0)
    gemms = workload(shapes, mode, table)
    for k, n, p in gemms:
        f = high // max(p, low)
        compute = -(-batch // (rows * f)) * -(-n // (cols * f)) * k
        read_bits, write_bits = k * n * p + batch * k * p, batch * n * 16
        memory = math.ceil((read_bits + write_bits) / table["if_width_bits"])
        cycles = max(compute, memory)
        macs = batch * k * n
        tot["cycles"] += cycles
        tot["compute_cycles"] += compute
        tot["memory_cycles"] += memory
        tot["memory_bound_gemms"] += memory > compute
        tot["static_pj"] += cycles * table["static_pj_per_cycle"]
        tot["dram_pj"] += read_bits * dram["read"] + write_bits * dram["write"]
        tot["sram_pj"] += (macs * p * (sram["act_read"] + sram["wgt_read"]) + write_bits * (sram["out_read"] + sram["out_write"])
                           + k * n * p * sram["wgt_write"] + batch * k * p * sram["act_write"])
        tot["core_pj"] += rows * cols * (cycles * d["pe_leakage_pj"] + compute * d["pe_dynamic_pj"])
    tot["energy_pj"] = tot["static_pj"] + tot["dram_pj"] + tot["sram_pj"] + tot["core_pj"]
    tot.update(gemms=len(gemms), time_s=tot["cycles"] / (table["clock_mhz"] * 1e6), design=name,
               array=f"{rows}x{cols}", batch=batch)
    return tot


def model_vs_fp16(shapes: list[tuple[int, int]], mode: str, batch: int, table: dict) -> dict:
    """:func:`model_design` of ``mode`` and of FP16 on the same layers, with ``time_vs_fp16`` and ``energy_vs_fp16``."""
    m, f = model_design(shapes, mode, batch, table), model_design(shapes, "FP16", batch, table)
    return {"mixpe": m, "fp16": f, "time_vs_fp16": m["cycles"] / f["cycles"],
            "energy_vs_fp16": m["energy_pj"] / f["energy_pj"]}


def reproduce_simulator_row(model: str = CALIBRATION_ROW, table: dict | None = None, batch: int = 64) -> dict:
    """The model on one of the simulator's LLM workloads next to its released row (batch 64 there).

    Returns:
        {mode: {"time": (ours, published), "energy": (ours, published)}} for W4A8 and W4A16, FP16 = 1.

    Raises:
        KeyError: a model not in :data:`SIMULATOR_MODELS`.
    """
    table = table or load_cost_table()
    shapes = simulator_llm_shapes(*SIMULATOR_MODELS[model])
    out = {}
    for mode in ("W4A8", "W4A16"):
        r = model_vs_fp16(shapes, mode, batch, table)
        pub = SIMULATOR_RESULTS[model]
        out[mode] = {"time": (r["time_vs_fp16"], pub["time"][mode]), "energy": (r["energy_vs_fp16"], pub["energy"][mode])}
    return out


class MixPELinear(nn.Module):
    """A linear layer computed the MixPE way from group-wise integer weights (MixPE Sec. 3).

    Args:
        q: unsigned codes (N, K), integer. zeros: zero points (N, G). scales: (N, G) float.
        group_size, bits: format. mode: ``W4A8``, ``W4A16``, ``W8A8`` or ``W8A16``.
        counter: an :class:`OpCounter` the layer registers with; it counts the tokens the layer runs
            and the counter multiplies them by the layer's per-token :class:`OpCounts` when read.
        gemm: ``codes`` (default: codes packed at construction; int8 x int8 products for A8, one
            batched matmul for A16) or ``bitplane`` (shift-and-add over bit-planes in float64; the oracle).
        accum: A16 modes only: precision of the group products and partial sums, one of
            :data:`ACCUMULATIONS` (``fp32`` default; ``bf16`` also rounds the activations to bf16).
            A8 modes accumulate integers exactly (int32, or float32 where ``_int_mm`` is missing,
            checked at construction).

    Input (..., K) float; output (..., N) in the input's dtype.

    Raises:
        ValueError: unknown ``gemm``/``accum``, or A8 groups too large for exact float32 partial sums.
    """

    def __init__(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int,
                 mode: str, counter: "OpCounter | None" = None, name: str = "", gemm: str = "codes",
                 accum: str = "fp32"):
        super().__init__()
        if gemm not in GEMM_PATHS:
            raise ValueError(f"unknown MixPE GEMM path '{gemm}'; use one of {', '.join(GEMM_PATHS)}")
        if accum not in ACCUMULATIONS:
            raise ValueError(f"unknown accumulation '{accum}'; use one of {', '.join(ACCUMULATIONS)}")
        q_signed, z_signed = signed_codes(q, zeros, bits)
        self.z_signed = z_signed.to(torch.float64)      # small integers: exact; float64 as dequantization uses it
        # the oracle's codes: int64 as it computes with them; compact int8 when it is not the path in use
        self.q_signed = q_signed if gemm == "bitplane" else q_signed.to(torch.int8)
        self.scales = scales.float().to(torch.float64)   # fp16/fp32 values: exact in float64
        self.group_size, self.bits, self.mode, self.name, self.gemm = group_size, bits, mode, name, gemm
        self.integer = mode.endswith("A8")
        self.accum = "int" if self.integer else accum
        self.counter = counter if counter is not None else OpCounter()
        self.counter.register(self)
        self.tokens_run = 0
        n, k = q.shape
        self.shape = (k, n)
        self.n_groups = scales.shape[1]
        self.codes = None
        if gemm == "codes":
            if self.integer and int8_mm_available():
                dtype = torch.int8
            elif self.integer:
                check_float32_exact(group_size, bits)
                dtype = torch.float32
            else:
                dtype = ACCUMULATIONS[accum][0]
            self.codes = pack_codes(q_signed, group_size, dtype)
        u = q_signed & (2 ** bits - 1)
        popcount = int(sum(((u >> i) & 1).sum() for i in range(bits)))
        act_bits = MODES[mode][1]
        self.per_token = {s: count_ops(k, n, group_size, bits, act_bits, popcount, s)
                          for s in ("mixpe", "dequant-loop", "fp16")}

    def partial_sums(self, x: torch.Tensor) -> torch.Tensor:
        """P (tokens, N, G) of already-rounded activations x (tokens, K) on this layer's GEMM path."""
        if self.gemm == "bitplane":
            return bitplane_partial_sums(x, self.q_signed, self.group_size, self.bits)
        if self.codes.dtype == torch.int8:
            return int8_partial_sums(x, self.codes)
        return codes_partial_sums(x, self.codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        self.tokens_run += flat.shape[0]
        if self.integer:
            xq, act_scale = quantize_activations_int8(flat)
        else:
            xq, act_scale = flat.to(ACCUMULATIONS[self.accum][1]), None
        row_sum = _grouped(xq.to(torch.float64), self.n_groups, self.group_size).sum(dim=2)
        y = dequantize_partial_sums(self.partial_sums(xq), row_sum, self.z_signed, self.scales)
        if act_scale is not None:
            y = y * act_scale[:, None]
        return y.to(x.dtype).reshape(*shape[:-1], -1)


class OpCounter:
    """The operations run so far by the :class:`MixPELinear` layers registered with it.

    Each layer counts the tokens it runs (one integer add per forward); reading multiplies them by the
    layer's per-token :class:`OpCounts`, so counting costs nothing measurable in the forward pass.
    Reads like a dict {scheme: :class:`OpCounts`} for ``mixpe``, ``dequant-loop`` and ``fp16``.
    """

    def __init__(self):
        self.layers: list["MixPELinear"] = []

    def register(self, layer: "MixPELinear") -> None:
        self.layers.append(layer)

    def totals(self) -> dict[str, OpCounts]:
        out: dict[str, OpCounts] = {}
        for layer in self.layers:
            if layer.tokens_run:
                for scheme, ops in layer.per_token.items():
                    out.setdefault(scheme, OpCounts()).add_scaled(ops, layer.tokens_run)
        return out

    def items(self):
        return self.totals().items()

    def __getitem__(self, scheme: str) -> OpCounts:
        return self.totals()[scheme]

    def __contains__(self, scheme: str) -> bool:
        return scheme in self.totals()


def install(model, checkpoint: str | Path, mode: str, gemm: str = "codes", accum: str = "fp32") -> "OpCounter":
    """Replace every quantized linear layer of ``model`` by a :class:`MixPELinear`; returns the shared op counter.

    Args:
        model: a transformers causal LM loaded from ``checkpoint``. checkpoint: PTQ checkpoint directory.
        mode, gemm, accum: as :class:`MixPELinear`.

    Raises:
        UsageError: a checkpoint without quantized weights (with how to make them), a mode whose
            weight bits differ from the checkpoint's, or an unknown mode, GEMM path or accumulation.
    """
    if mode not in MODES:
        raise UsageError(f"unknown MixPE mode '{mode}'; use one of {', '.join(MODES)}")
    if gemm not in GEMM_PATHS:
        raise UsageError(f"unknown MixPE GEMM path '{gemm}'; use one of {', '.join(GEMM_PATHS)}")
    if accum not in ACCUMULATIONS:
        raise UsageError(f"unknown MixPE accumulation '{accum}'; use one of {', '.join(ACCUMULATIONS)}")
    cfg = st_format.read_config(checkpoint)
    if not is_quantized_checkpoint(cfg):
        raise UsageError(f"{checkpoint} has no quantized weights; make them with 'edgerun export SRC --to hf "
                         f"--ptq rtn --bits {MODES[mode][0]} --group-size 64'")
    qc = cfg["quantization_config"]
    if qc["bits"] != MODES[mode][0]:
        raise UsageError(f"{mode} needs {MODES[mode][0]}-bit weights; {checkpoint} has {qc['bits']}-bit weights")
    raw = {}
    for f in st_format.checkpoint_files(checkpoint):
        raw.update(load_file(str(f)))
    counter = OpCounter()
    for base in sorted(k.removesuffix(".qweight") for k in raw if k.endswith(".qweight")):
        t = {k: raw.pop(f"{base}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        ql = from_gptq_tensors(t, qc["bits"], qc["group_size"], t["g_idx"].shape[0], t["scales"].shape[1])
        parent_name, _, child = base.rpartition(".")
        parent = model.get_submodule(parent_name)
        try:
            layer = MixPELinear(ql.q, ql.zeros, ql.scales, qc["group_size"], qc["bits"], mode, counter, name=base,
                                gemm=gemm, accum=accum)
        except ValueError as e:
            raise UsageError(f"{base}: {e}") from None
        setattr(parent, child, layer)
    return counter


def layer_shapes(model) -> list[tuple[int, int]]:
    """(K, N) of every :class:`MixPELinear` in ``model``, in module order."""
    return [m.shape for m in model.modules() if isinstance(m, MixPELinear)]


def summarize(counter: "OpCounter | dict", tokens: int, mode: str, table: dict, shapes: list[tuple[int, int]] | None = None,
              batches: tuple[int, ...] = (1, 64)) -> dict:
    """Per-token op counts of everything run, and the simulator model of one decode step per batch size.

    Args:
        counter: the op counter of :func:`install`. tokens: tokens run. mode: the MixPE mode.
        table: :func:`load_cost_table`. shapes: the layers' (K, N) (:func:`layer_shapes`); without them no model.
        batches: batch sizes to model (tokens per step).

    Returns:
        {scheme: {"ops_per_token": ...}} for ``mixpe``, ``dequant-loop`` and ``fp16``; with shapes, ``mixpe``
        also has ``model`` {"batch_B": :func:`model_vs_fp16`} and, from the first batch size,
        ``time_vs_fp16``, ``energy_vs_fp16``, ``array``; ``fp16`` has its ``array``. The dequantize-in-the-loop
        design has no model (the simulator has none).
    """
    out = {}
    for scheme, ops in counter.items():
        per_token = OpCounts(**{k: v / max(tokens, 1) for k, v in ops.as_dict().items()})
        out[scheme] = {"ops_per_token": per_token.as_dict()}
    if shapes and "mixpe" in out:
        models = {f"batch_{b}": model_vs_fp16(shapes, mode, b, table) for b in batches}
        first = models[f"batch_{batches[0]}"]
        out["mixpe"].update(model=models, time_vs_fp16=first["time_vs_fp16"], energy_vs_fp16=first["energy_vs_fp16"],
                            array=first["mixpe"]["array"], model_batch=batches[0])
        if "fp16" in out:
            out["fp16"]["array"] = first["fp16"]["array"]
    return out


class MixPEBackend(TorchBackend):
    """The torch engine on a PTQ checkpoint with every quantized linear layer a :class:`MixPELinear`.

    Args:
        path: a PTQ checkpoint in the GPTQ layout (``edgerun export SRC --to hf --ptq rtn --bits 4``).
        mode: ``W4A8``, ``W4A16``, ``W8A8`` or ``W8A16`` (weight bits must match the checkpoint's).
        cost_table: simulator cost table YAML (default: the MixPE simulator's constants).
        gemm: ``codes`` (default, batched matmul of codes packed at load) or ``bitplane`` (the oracle).
        accum: A16 accumulation precision, ``fp32`` (default), ``fp16``, ``bf16`` or ``fp64``.
        options: as :class:`~edgerun.backends.torch.TorchBackend` (n_ctx, threads, seed, ...).

    Raises:
        UsageError: as :func:`install` and :func:`load_cost_table`.
    """

    def __init__(self, path: str | Path, mode: str = "W4A16", cost_table: str | Path | None = None,
                 gemm: str = "codes", accum: str = "fp32", **options):
        self._table = load_cost_table(cost_table)
        super().__init__(path, **options)
        self.mixpe_mode = mode.upper()
        self.name = "mixpe"
        self.gemm, self.accum = gemm, accum
        self._counter = install(self.model, path, self.mixpe_mode, gemm=gemm, accum=accum)
        self._shapes = layer_shapes(self.model)
        self._tokens = 0

    def _forward(self, ids: list[int], cache, past: int):
        self._tokens += len(ids)
        return super()._forward(ids, cache, past)

    def accounting(self) -> dict:
        """Per-token op counts of everything run so far, and the simulator model at batch 1 and 64 (:func:`summarize`)."""
        return summarize(self._counter, self._tokens, self.mixpe_mode, self._table, self._shapes)

    def engine_settings(self) -> dict:
        """threads, context, the MixPE mode, GEMM path and A16 accumulation."""
        return {**super().engine_settings(), "mixpe_mode": self.mixpe_mode, "mixpe_gemm": self.gemm,
                "mixpe_accum": self.accum if self.mixpe_mode.endswith("A16") else "int"}
