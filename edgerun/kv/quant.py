"""Asymmetric min/max quantization of K/V tensors and exact bit packing (KVTuner, KIVI).

Quantizer (KVTuner, Li et al. 2025, Sec. 3; KIVI, Liu et al. 2024): :mod:`edgerun.minmax` over each group's own range [min, max]:
``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``, ``q = clip(round(x / s) + z, 0, 2^b - 1)``,
``x^ = (q - z) * s``; with z rounded, the error of each value is at most s (s / 2 where no clipping
happens). The scale is stored as float16 (and used rounded), the integer zero point as int16; so
that z always fits int16, s is at least max|x| / 32000 (this only changes near-constant groups far
from zero, whose range would otherwise give a zero point out of range).

Grouping:
- **per-token**: each token's head vector (head_dim values, or groups of ``group_size`` of them) is one
  group — quantization along the last dimension;
- **KIVI** (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024):
  keys per-channel over groups of ``group_size`` tokens (along the sequence), values per-token.

Packing: codes of b bits (2, 4 or 8) are packed 8/b to a byte along the last dimension, so a
quantized tensor really occupies b/8 bytes per value plus its float16 scale and int16 zero point per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgerun import minmax

BITS = (2, 4, 8, 16)


@dataclass
class Packed:
    """A quantized tensor: packed codes (uint8, last dim = n * bits / 8), float16 scale and int16 zero per group.

    Attributes:
        codes: uint8 packed codes. scale (float16), zero (int16): one per group along ``axis`` in
            groups of ``group``. bits: 2, 4 or 8. shape: unpacked shape.
        axis: -1 (groups along the last dim) or -2 (groups along the sequence). group: group length.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    axis: int
    group: int

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + zero points."""
        return self.codes.numel() + 2 * (self.scale.numel() + self.zero.numel())


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dimension, 8/bits per byte (little-endian within a byte)."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 (..., n * bits / 8) -> codes int64 (..., n)."""
    return unpack_float(packed, bits, n).to(torch.int64) if bits != 8 else packed.to(torch.int64)


def unpack_float(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """:func:`unpack` straight to float32 codes (..., n): shifts and masks on uint8, one conversion.

    Skipping the int64 intermediate makes this about 1.5-2x faster than ``unpack(...).float()``; a
    256-entry lookup table per bit width (``table[packed]``) was measured slower on CPU (advanced
    indexing needs int64 indices): see ``benchmarks/kv_decode.py``.
    """
    if bits == 8:
        return packed.float()
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [((packed >> (bits * i)) & mask) for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], n).float()


def quantize(x: torch.Tensor, bits: int, axis: int = -1, group: int | None = None) -> Packed:
    """Quantize x (..., T, D) with per-group min/max along ``axis`` (-1: head dim, -2: tokens), groups of ``group``.

    ``group`` defaults to the whole dimension. Returns packed uint8 codes with a float16 scale and an
    int16 zero point per group (the grid of the module doc).

    Raises:
        ValueError: bits not in (2, 4, 8), a dimension not divisible by the group, or D not fillable in bytes.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"{bits}-bit KV quantization is not supported; use 2, 4 or 8")
    x = x.float()
    shape = tuple(x.shape)
    n = shape[axis]
    group = group or n
    if n % group:
        raise ValueError(f"dimension {n} is not a multiple of the group {group}")
    if axis == -2:  # groups along the sequence: move tokens last to reuse the same code
        xt = x.transpose(-1, -2)                                                  # (..., D, T)
    else:
        xt = x
    g = xt.reshape(*xt.shape[:-1], xt.shape[-1] // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    # the int16 zero point round(-min / s) must fit: near-constant groups far from 0 get a step of at
    # least max|x| / 32000 (the margin covers float16 rounding of s), still tiny against the values
    bound = torch.maximum(lo.abs(), hi.abs()) / 32000
    scale = torch.maximum(minmax.scale_of(lo, hi, bits), bound).clamp_min(1e-6).half().float()   # stored as float16
    zero = minmax.zero_point(lo, scale).clamp(-32767, 32767)
    codes = minmax.quantize(g, scale, zero, bits).reshape(xt.shape)
    if axis == -2:
        codes = codes.transpose(-1, -2)
    if codes.shape[-1] * bits % 8:
        raise ValueError(f"last dimension {codes.shape[-1]} at {bits} bits does not fill whole bytes")
    return Packed(pack(codes, bits), scale.half(), zero.to(torch.int16), bits, shape, axis, group)


def dequantize(p: Packed) -> torch.Tensor:
    """float32 tensor of ``p``'s shape: (codes - zero) * scale (:func:`edgerun.minmax.dequantize`)."""
    n = p.shape[-1]
    codes = unpack_float(p.codes, p.bits, n)
    if p.axis == -2:
        codes = codes.transpose(-1, -2)
    g = codes.reshape(*codes.shape[:-1], codes.shape[-1] // p.group, p.group)
    x = minmax.dequantize(g, p.scale.float(), p.zero.float()).reshape(codes.shape)
    return x.transpose(-1, -2) if p.axis == -2 else x


def concat(a: Packed, b: Packed) -> Packed:
    """Two quantized tensors joined along the token dimension (-2) without dequantizing.

    Both must have the same bits, axis and group; for ``axis=-2`` the token count of each must be a
    multiple of the group (whole blocks), so the result is the quantization of the joined tensor.

    Raises:
        ValueError: mismatched bits/axis/group or leading shapes.
    """
    if (a.bits, a.axis, a.group) != (b.bits, b.axis, b.group) or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise ValueError("cannot join quantized tensors of different layouts")
    scale_dim = -3 if a.axis == -1 else -2
    shape = (*a.shape[:-2], a.shape[-2] + b.shape[-2], a.shape[-1])
    return Packed(torch.cat([a.codes, b.codes], dim=-2), torch.cat([a.scale, b.scale], dim=scale_dim),
                  torch.cat([a.zero, b.zero], dim=scale_dim), a.bits, shape, a.axis, a.group)


def take_tokens(p: Packed, stop: int, start: int = 0) -> Packed:
    """Tokens ``start:stop`` (dimension -2) of ``p``, still packed: the codes, scales and zeros of those tokens.

    Exact: per-token groups (``axis=-1``) belong to one token each; per-channel groups (``axis=-2``)
    span ``group`` tokens, so there ``start`` and ``stop`` must be multiples of the group (whole blocks).

    Raises:
        ValueError: not 0 <= start <= stop <= tokens, or not whole blocks for ``axis=-2``.
    """
    t = p.shape[-2]
    if not 0 <= start <= stop <= t:
        raise ValueError(f"cannot take tokens {start}:{stop} of {t}")
    if p.axis == -2 and (start % p.group or stop % p.group):
        raise ValueError(f"tokens {start}:{stop} are not whole blocks of {p.group}")
    if p.axis == -1:
        scale, zero = p.scale[..., start:stop, :, :], p.zero[..., start:stop, :, :]
    else:
        a, b = start // p.group, stop // p.group
        scale, zero = p.scale[..., a:b, :], p.zero[..., a:b, :]
    return Packed(p.codes[..., start:stop, :].clone(), scale.clone(), zero.clone(), p.bits,
                  (*p.shape[:-2], stop - start, p.shape[-1]), p.axis, p.group)
