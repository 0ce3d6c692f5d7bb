"""A real quantized KV cache for transformers models: per layer (K bits, V bits), packed codes.

KVTuner (Li et al., "KVTuner: Sensitivity-Aware Layer-wise Mixed Precision KV Cache Quantization",
ICML 2025): each decoder layer gets its own (K, V) precision pair from KV8, K8V4, K4V8, KV4, K4V2,
K2V4, KV2 and KV16 (unquantized, which goes through the same code path). Modes:

- ``per-token``: every new token's key and value head vectors are quantized as they arrive (groups of
  ``group_size`` along head_dim), nothing kept in full precision;
- ``kivi`` (KIVI, Liu et al. 2024): the newest ``window`` tokens stay in full precision; older keys
  are quantized per channel over blocks of ``group_size`` tokens, older values per token.

Codes are bit-packed with their float16 scales and int16 zero points (:mod:`edgerun.kv.quant`), so
:meth:`QuantizedKVCache.nbytes` is what the cache really holds. Attention reads dequantized K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from edgerun.kv.quant import Packed, concat, dequantize, quantize

PAIRS = {"KV16": (16, 16), "KV8": (8, 8), "K8V4": (8, 4), "K4V8": (4, 8), "KV4": (4, 4), "K4V2": (4, 2),
         "K2V4": (2, 4), "KV2": (2, 2)}
MODES = ("per-token", "kivi")


def pair_name(k_bits: int, v_bits: int) -> str:
    """KVTuner's name of a (K bits, V bits) pair, e.g. (8, 4) -> ``K8V4``.

    Raises:
        ValueError: a pair outside KVTuner's set.
    """
    for name, pair in PAIRS.items():
        if pair == (k_bits, v_bits):
            return name
    raise ValueError(f"K{k_bits}V{v_bits} is not one of {', '.join(PAIRS)}")


@dataclass
class KVSpec:
    """How one layer's cache is stored: key and value bits, mode, group size, full-precision window."""

    k_bits: int
    v_bits: int
    mode: str = "per-token"
    group_size: int = 32
    window: int = 32


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's KV cache: a packed quantized part plus a full-precision part.

    ``keys``/``values`` (transformers' fields) hold only the full-precision tokens: the KIVI window,
    or everything for a 16-bit side; ``k_old``/``v_old`` hold the older tokens as one
    :class:`~edgerun.kv.quant.Packed` each (16-bit sides in KIVI mode: a plain tensor). Each update
    returns the dequantized K/V (float, (batch, kv_heads, tokens, head_dim)) for attention.
    """

    is_croppable = False

    def __init__(self, spec: KVSpec):
        super().__init__()
        self.spec = spec
        self.k_old: Packed | torch.Tensor | None = None
        self.v_old: Packed | torch.Tensor | None = None
        self.cumulative_length = 0

    def _quantize(self, x: torch.Tensor, bits: int, key: bool) -> Packed | torch.Tensor:
        s = self.spec
        if bits >= 16:
            return x
        if s.mode == "kivi" and key:
            return quantize(x, bits, axis=-2, group=s.group_size)         # per channel over a token block
        d = x.shape[-1]
        g = s.group_size if d % s.group_size == 0 else d
        return quantize(x, bits, axis=-1, group=g)

    @staticmethod
    def _join(old, new):
        if old is None:
            return new
        if isinstance(new, Packed):
            return concat(old, new)
        return torch.cat([old, new], dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new K/V (batch, kv_heads, new_tokens, head_dim); return all K/V so far, dequantized
        (float, (batch, kv_heads, tokens, head_dim)), for attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        s = self.spec
        if s.mode == "per-token":
            if s.k_bits >= 16:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
            else:
                self.k_old = self._join(self.k_old, self._quantize(key_states, s.k_bits, True))
            if s.v_bits >= 16:
                self.values = torch.cat([self.values, value_states], dim=-2)
            else:
                self.v_old = self._join(self.v_old, self._quantize(value_states, s.v_bits, False))
        else:  # KIVI: append to the window, move whole blocks of the oldest tokens out of it
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            n = self.keys.shape[-2]
            if n >= s.window + s.group_size:
                m = (n - s.window) // s.group_size * s.group_size                # whole blocks leave the window
                self.k_old = self._join(self.k_old, self._quantize(self.keys[..., :m, :], s.k_bits, True))
                self.v_old = self._join(self.v_old, self._quantize(self.values[..., :m, :], s.v_bits, False))
                self.keys, self.values = self.keys[..., m:, :].clone(), self.values[..., m:, :].clone()
        return self._full(self.k_old, self.keys), self._full(self.v_old, self.values)

    @staticmethod
    def _full(old, tail: torch.Tensor) -> torch.Tensor:
        if old is None:
            return tail
        old = dequantize(old).to(tail.dtype) if isinstance(old, Packed) else old
        return torch.cat([old, tail], dim=-2) if tail.numel() else old

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        """Bytes held by this layer: packed codes with scales and zero points, plus full-precision tensors."""
        total = 0
        for t in (self.k_old, self.v_old, self.keys, self.values):
            if isinstance(t, Packed):
                total += t.nbytes
            elif t is not None:
                total += t.numel() * t.element_size()
        return total

    def reset(self) -> None:
        super().reset()
        self.k_old = self.v_old = None
        self.cumulative_length = 0


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose layer i is a :class:`QuantizedKVLayer` with ``specs[i]``."""

    def __init__(self, specs: list[KVSpec]):
        super().__init__(layers=[QuantizedKVLayer(s) for s in specs])
        self.specs = specs

    def nbytes(self) -> int:
        """Bytes the cache holds now."""
        return sum(layer.nbytes() for layer in self.layers)
