"""Asymmetric min/max integer quantization: the one grid and zero-point convention of edgerun.

Over a group of values with range [lo, hi] at b bits (round to nearest, as in GPTQ's and AWQ's
group quantizers, Frantar et al. ICLR 2023; the KV caches of KIVI, Liu et al. ICML 2024, and
KVTuner, Li et al. ICML 2025)::

    scale = (hi - lo) / (2^b - 1)        zero = round(-lo / scale)        (an integer >= 0 when lo <= 0)
    q = clamp(round(x / scale) + zero, 0, 2^b - 1)                        x_hat = (q - zero) * scale

The formats differ only in the range and in how the scale is stored, and say so where they call
these functions: GPTQ weights (:func:`edgerun.formats.gptq.group_params`) widen the range to hold
0 and keep a float32 scale; the KV cache (:func:`edgerun.kv.quant.quantize`) uses the group's own
range and a float16 scale with a floor that keeps its int16 zero point in range.
"""

from __future__ import annotations

import torch


def scale_of(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Step of the ``bits``-bit grid over [lo, hi]: (hi - lo) / (2^bits - 1), same shape and dtype as ``lo``.

    A zero range gives a zero step: the caller decides what replaces it (its format's rule).
    """
    return (hi - lo) / (2 ** bits - 1)


def zero_point(lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integer code of 0 (as a float tensor): round(-lo / scale), broadcast over ``lo`` and ``scale``."""
    return torch.round(-lo / scale)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round(x / scale) + zero, 0, 2^bits - 1) as float, with ``scale`` and ``zero`` broadcast to ``x``."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Values (q - zero) * scale of codes ``q``, with ``scale`` and ``zero`` broadcast to ``q``."""
    return (q - zero) * scale
