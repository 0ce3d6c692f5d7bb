"""MixPE-style mixed-precision GEMM emulation: dequantize after per-group accumulation, shift-and-add products.

MixPE (Zhang et al., "MixPE: Quantization and Hardware Co-design for Efficient LLM Inference",
arXiv 2411.16158, Sec. 3): with group-wise weights W[n, k] = s[n, g] * (q[n, k] - z[n, g]) over groups
g of ``gs`` input channels,

    y[t, n] = sum_g s[n, g] * ( sum_{k in g} x[t, k] q[n, k]  -  z[n, g] * S[t, g] ),   S[t, g] = sum_{k in g} x[t, k]

so each group's low-bit x high-precision products accumulate without dequantization, and only one
scale multiply and one zero-point correction per (group, output) remain (Sec. 3.2, Eq. 2). Each
product is realised as shift-and-add over the weight's bits (Sec. 3.3): for a two's-complement INT4
code q = -8 b3 + 4 b2 + 2 b1 + b0, ``x * q = -(x << 3) b3 + (x << 2) b2 + (x << 1) b1 + x b0``. The
emulator evaluates exactly that, bit-plane by bit-plane (one matmul with each 0/1 bit-plane, shifted
and added), and counts what a MixPE processing element does.

Modes: ``W4A8`` / ``W8A8`` (activations quantized per token to int8, symmetric; integer arithmetic),
``W4A16`` / ``W8A16`` (activations in fp16; products accumulated in fp32). The weights are an edgerun
PTQ checkpoint (GPTQ layout, :mod:`converters.ptq`), any method (RTN, GPTQ, AWQ; AWQ's scales are
already folded into the preceding operation by the PTQ pass).

Accounting per layer and per token (batch-1 decode shapes), with modelled energy from a cost table
(``mixpe_costs.yaml``, the MixPE simulator's per-operation constants) and two baselines computed by
the same emulator: an FP16 GEMM and the conventional dequantize-in-the-loop W4A16 mpGEMM. Modelled
*time* uses the simulator's processing-element arrays (64x64 for W4A8, 32x32 for W4A16, 32x28 for
FP16, at 500 MHz): time = PE-cycles / PEs / clock; it is a model, not a measurement.
"""

from __future__ import annotations

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


def signed_codes(q: torch.Tensor, z: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes and zero points (0..2^bits-1) -> two's-complement codes and shifted zero points.

    (q - z) is unchanged: q_s = q - 2^(bits-1), z_s = z - 2^(bits-1).
    """
    off = 2 ** (bits - 1)
    return q.to(torch.int64) - off, z.to(torch.int64) - off


def bit_planes(q_signed: torch.Tensor, bits: int) -> list[tuple[int, torch.Tensor]]:
    """(weight, 0/1 plane) pairs of a two's-complement code tensor: the top bit weighs -2^(bits-1)."""
    u = q_signed & (2 ** bits - 1)
    planes = []
    for i in range(bits):
        weight = -(2 ** i) if i == bits - 1 else 2 ** i
        planes.append((weight, ((u >> i) & 1).to(torch.int64)))
    return planes


def shift_add_product(x: int, q_signed: int, bits: int = 4) -> int:
    """x * q for an integer activation x and a two's-complement weight code q, by shift-and-add over q's bits."""
    u = q_signed & (2 ** bits - 1)
    acc = 0
    for i in range(bits):
        if (u >> i) & 1:
            acc += -(x << i) if i == bits - 1 else (x << i)
    return acc


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: (codes int64 (tokens, K), scales float64 (tokens,)); x = codes * scale."""
    x = x.double()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    return torch.clamp(torch.round(x / scale[:, None]), -127, 127).to(torch.int64), scale


def group_accumulate_gemm(x: torch.Tensor, q_signed: torch.Tensor, z_signed: torch.Tensor, scales: torch.Tensor,
                          group_size: int, bits: int, integer: bool) -> torch.Tensor:
    """MixPE GEMM: y (tokens, N) from activations x (tokens, K), codes (N, K), zeros and scales (N, G).

    Inside each group the products are shift-and-add over the codes' bit-planes: per plane one
    (tokens, G, gs) x (N, G, gs) contraction of 0/1 weights, shifted (scaled by its bit's weight) and
    added; then per (group, output) one scale multiply and one zero-point correction with the group's
    activation sum S[t, g]. Arithmetic is float64, which is exact for the integer path (|x| <= 127,
    group sums < 2^53). A last group shorter than ``group_size`` (K not a multiple) is zero-padded,
    which adds nothing to its products or its sum.
    """
    tokens, k = x.shape
    n, n_groups = q_signed.shape[0], scales.shape[1]
    if integer and not torch.equal(x, x.round()):
        raise ValueError("the integer path needs integer activation codes")
    pad = n_groups * group_size - k
    xs = F.pad(x.double(), (0, pad)).reshape(tokens, n_groups, group_size)            # (t, G, gs)
    partial = torch.zeros(tokens, n, n_groups, dtype=torch.float64)                  # per (t, n, g)
    for weight, plane in bit_planes(F.pad(q_signed, (0, pad)), bits):                # shift-and-add over bits
        partial += weight * torch.einsum("tgk,ngk->tng", xs, plane.double().reshape(n, n_groups, group_size))
    row_sum = xs.sum(dim=2)                                                           # S[t, g]: (t, G)
    corrected = partial - z_signed.double()[None, :, :] * row_sum[:, None, :]        # (t, n, g)
    return (corrected * scales.double()[None, :, :]).sum(dim=2)                       # one dequant per (g, n)


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
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    def as_dict(self) -> dict:
        return asdict(self)


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
    """The energy cost table (YAML).

    Raises:
        UsageError: unreadable or missing fields (named).
    """
    path = Path(path) if path else COST_TABLE
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read cost table {path}: {e}") from None
    need = {"clock_mhz": (int, float), "pe_cycle_pj": dict, "dram_pj_per_bit": (int, float),
            "sram_pj_per_bit": (int, float), "arrays": dict}
    if not isinstance(table, dict):
        raise UsageError(f"cost table {path} is not a mapping")
    for key, kind in need.items():
        if not isinstance(table.get(key), kind):
            raise UsageError(f"cost table {path}: field '{key}' is missing or not a {getattr(kind, '__name__', 'number')}")
    for key in ("int8_4", "fp16_8", "fp16_16"):
        if not isinstance(table["pe_cycle_pj"].get(key), (int, float)):
            raise UsageError(f"cost table {path}: field 'pe_cycle_pj.{key}' is missing")
    for key in ("W4A8", "W4A16", "FP16"):
        arr = table["arrays"].get(key)
        if not (isinstance(arr, list) and len(arr) == 2 and all(isinstance(v, int) and v > 0 for v in arr)):
            raise UsageError(f"cost table {path}: field 'arrays.{key}' must be [rows, cols]")
    return table


def energy_and_time(ops: OpCounts, scheme: str, mode: str, table: dict) -> dict:
    """Modelled energy (pJ) and time (s) of ``ops`` on the PE type and array of ``scheme``/``mode``.

    The model: every MAC, dequantization op, row-sum add and activation-quantization op takes one
    PE-cycle of the array's PE type (the shift-adds of a MAC happen within its cycle); weights are
    read from DRAM, activations from on-chip SRAM; time = PE-cycles / PEs / clock.
    """
    if scheme == "fp16" or scheme == "dequant-loop":
        pe, array = "fp16_16", table["arrays"]["FP16"]
    elif mode.endswith("A8"):
        pe, array = "int8_4", table["arrays"]["W4A8"]
    else:
        pe, array = "fp16_8", table["arrays"]["W4A16"]
    cycles = ops.macs + ops.dequant_ops + ops.row_sum_adds + ops.act_quant_ops
    if mode.startswith("W8") and scheme == "mixpe":
        cycles += ops.macs  # 8-bit weights take two passes through a PE's 4-bit weight slot
    core = cycles * table["pe_cycle_pj"][pe]
    memory = ops.weight_bytes * 8 * table["dram_pj_per_bit"] + ops.activation_bytes * 8 * table["sram_pj_per_bit"]
    pes = array[0] * array[1]
    return {"pe_type": pe, "pe_cycles": cycles, "core_pj": core, "memory_pj": memory, "energy_pj": core + memory,
            "array": f"{array[0]}x{array[1]}", "time_s": cycles / pes / (table["clock_mhz"] * 1e6)}


class MixPELinear(nn.Module):
    """A linear layer computed the MixPE way from group-wise integer weights.

    Args:
        q: unsigned codes (N, K). zeros: zero points (N, G). scales: (N, G) float. group_size, bits: format.
        mode: ``W4A8``, ``W4A16``, ``W8A8`` or ``W8A16``.
        counter: a dict the layer adds its per-token :class:`OpCounts` to (keys ``mixpe``, ``fp16``,
            ``dequant-loop``) each time it runs on t tokens (counts are multiplied by t).
    """

    def __init__(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int,
                 mode: str, counter: dict | None = None, name: str = ""):
        super().__init__()
        self.q_signed, self.z_signed = signed_codes(q, zeros, bits)
        self.scales = scales.float()
        self.group_size, self.bits, self.mode, self.name = group_size, bits, mode, name
        self.counter = counter if counter is not None else {}
        n, k = q.shape
        popcount = int(sum(((self.q_signed & (2 ** bits - 1)) >> i & 1).sum() for i in range(bits)))
        act_bits = MODES[mode][1]
        self.per_token = {s: count_ops(k, n, group_size, bits, act_bits, popcount, s)
                          for s in ("mixpe", "dequant-loop", "fp16")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        t = flat.shape[0]
        for scheme, ops in self.per_token.items():
            acc = self.counter.setdefault(scheme, OpCounts())
            acc += OpCounts(**{k: v * t for k, v in ops.as_dict().items()})
        if self.mode.endswith("A8"):
            codes, act_scale = quantize_activations_int8(flat)
            y = group_accumulate_gemm(codes, self.q_signed, self.z_signed, self.scales, self.group_size, self.bits,
                                      integer=True) * act_scale[:, None]
        else:
            y = group_accumulate_gemm(flat.half().double(), self.q_signed, self.z_signed, self.scales,
                                      self.group_size, self.bits, integer=False)
        return y.to(x.dtype).reshape(*shape[:-1], -1)


def install(model, checkpoint: str | Path, mode: str) -> dict:
    """Replace every quantized linear layer of ``model`` by a :class:`MixPELinear`; returns the shared op counter.

    Raises:
        UsageError: a checkpoint without quantized weights (with how to make them), or a mode whose
            weight bits differ from the checkpoint's.
    """
    if mode not in MODES:
        raise UsageError(f"unknown MixPE mode '{mode}'; use one of {', '.join(MODES)}")
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
    counter: dict = {}
    for base in sorted(k.removesuffix(".qweight") for k in raw if k.endswith(".qweight")):
        t = {k: raw[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        ql = from_gptq_tensors(t, qc["bits"], qc["group_size"], t["g_idx"].shape[0], t["scales"].shape[1])
        parent_name, _, child = base.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, MixPELinear(ql.q, ql.zeros, ql.scales, qc["group_size"], qc["bits"], mode, counter,
                                           name=base))
    return counter


def summarize(counter: dict, tokens: int, mode: str, table: dict) -> dict:
    """Per-token op counts, modelled energy and time for MixPE and the baselines, normalized to FP16 = 1."""
    out = {}
    for scheme, ops in counter.items():
        per_token = OpCounts(**{k: v / max(tokens, 1) for k, v in ops.as_dict().items()})
        out[scheme] = {"ops_per_token": per_token.as_dict(), **energy_and_time(per_token, scheme, mode, table)}
    fp16 = out.get("fp16")
    if fp16:
        for v in out.values():
            v["energy_vs_fp16"] = v["energy_pj"] / fp16["energy_pj"]
            v["time_vs_fp16"] = v["time_s"] / fp16["time_s"]
    return out


class MixPEBackend(TorchBackend):
    """The torch engine on a PTQ checkpoint with every quantized linear layer a :class:`MixPELinear`.

    Args:
        path: a PTQ checkpoint in the GPTQ layout (``edgerun export SRC --to hf --ptq rtn --bits 4``).
        mode: ``W4A8``, ``W4A16``, ``W8A8`` or ``W8A16`` (weight bits must match the checkpoint's).
        cost_table: energy cost table YAML (default: the MixPE simulator's constants).
        options: as :class:`~edgerun.backends.torch.TorchBackend` (n_ctx, threads, seed, ...).

    Raises:
        UsageError: as :func:`install` and :func:`load_cost_table`.
    """

    def __init__(self, path: str | Path, mode: str = "W4A16", cost_table: str | Path | None = None, **options):
        self._table = load_cost_table(cost_table)
        super().__init__(path, **options)
        self.mixpe_mode = mode.upper()
        self.name = "mixpe"
        self._counter = install(self.model, path, self.mixpe_mode)
        self._tokens = 0

    def _forward(self, ids: list[int], cache, past: int):
        self._tokens += len(ids)
        return super()._forward(ids, cache, past)

    def accounting(self) -> dict:
        """Per-token op counts and modelled energy/time of everything run so far (MixPE, dequant-loop, FP16)."""
        return summarize(self._counter, self._tokens, self.mixpe_mode, self._table)

    def engine_settings(self) -> dict:
        """threads, context and the MixPE mode."""
        return {**super().engine_settings(), "mixpe_mode": self.mixpe_mode}
