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

from edgerun.kv.quant import Packed, concat, dequantize, quantize, take_tokens

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


WORKING_COPIES = ("model", "float16", "bfloat16", "none")
DEFAULT_WORKING_COPY = "model"


class _Grow:
    """A (batch, kv_heads, capacity, head_dim) buffer filled along the tokens up to ``n``; grows in chunks of 64 tokens."""

    CHUNK = 64

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype, self.data, self.n = dtype, None, 0

    def append(self, x: torch.Tensor) -> None:
        need = self.n + x.shape[-2]
        if self.data is None or need > self.data.shape[-2]:
            cap = -(-need // self.CHUNK) * self.CHUNK
            data = torch.empty(*x.shape[:-2], cap, x.shape[-1], dtype=self.dtype or x.dtype, device=x.device)
            if self.n:
                data[..., :self.n, :] = self.data[..., :self.n, :]
            self.data = data
        self.data[..., self.n:need, :] = x
        self.n = need

    def view(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.data[..., start:self.n if stop is None else stop, :]

    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's KV cache: a packed quantized part plus a full-precision part.

    ``keys``/``values`` (transformers' fields) hold only the full-precision tokens: the KIVI window,
    or everything for a 16-bit side; ``k_old``/``v_old`` hold the older tokens as one
    :class:`~edgerun.kv.quant.Packed` each (None while nothing is quantized). Each update returns all
    K/V so far, dequantized (float, (batch, kv_heads, tokens, head_dim), the dtype of the states), for
    attention.

    Dequantization is incremental: each token is dequantized once, when it is quantized, into a
    *working copy* that attention reads, so a decode step costs what the new token costs, not the
    whole history. ``working_copy`` says what that copy is:

    - ``"model"`` (default): the states' dtype; one buffer holds the dequantized packed tokens followed
      by the full-precision tokens (``keys``/``values`` are views of it), and update returns a view of
      it, no copy. Attention reads exactly what dequantizing the whole packed history would give
      (bit-identical), but the process then holds the packed bytes *plus* a full-width copy: the
      memory saving is gone (speed only).
    - ``"float16"`` / ``"bfloat16"``: the dequantized tokens kept at 2 bytes per value (the
      full-precision tokens stay as they are); each step converts the copy to the states' dtype and
      joins the full-precision tokens (one pass over the history). Half the bytes of a float32 copy;
      the dequantized values are rounded once more (relative 2^-11 / 2^-8: far below the quantization
      step of 8 bits and fewer).
    - ``"none"``: no copy: every step dequantizes the whole packed history (the memory saving is
      kept, the speed is not; a transient dequantized copy of one layer lives during its attention).

    :meth:`nbytes` is what the cache must hold (packed codes, scales, zeros, full-precision tokens),
    whatever the working copy; :meth:`working_nbytes` is what the working copy adds on top.

    Raises:
        ValueError: an unknown ``working_copy``.
    """

    is_croppable = True

    def __init__(self, spec: KVSpec, working_copy: str = DEFAULT_WORKING_COPY):
        super().__init__()
        if working_copy not in WORKING_COPIES:
            raise ValueError(f"working copy {working_copy!r} is not one of {', '.join(WORKING_COPIES)}")
        self.spec = spec
        self.working_copy = working_copy
        self.k_old: Packed | None = None
        self.v_old: Packed | None = None
        self.cumulative_length = 0
        self._work: dict[str, _Grow | None] = {"k": None, "v": None}

    # --- helpers over one side ("k" or "v") ---------------------------------------------------------

    def _bits(self, side: str) -> int:
        return self.spec.k_bits if side == "k" else self.spec.v_bits

    def _fp(self, side: str) -> torch.Tensor:
        return self.keys if side == "k" else self.values

    def _set_fp(self, side: str, x: torch.Tensor) -> None:
        if side == "k":
            self.keys = x
        else:
            self.values = x

    def _old(self, side: str) -> Packed | None:
        return self.k_old if side == "k" else self.v_old

    def _set_old(self, side: str, p: Packed | None) -> None:
        if side == "k":
            self.k_old = p
        else:
            self.v_old = p

    def _n_old(self, side: str) -> int:
        old = self._old(side)
        return 0 if old is None else old.shape[-2]

    def _quantize(self, x: torch.Tensor, bits: int, key: bool) -> Packed:
        s = self.spec
        if s.mode == "kivi" and key:
            return quantize(x, bits, axis=-2, group=s.group_size)         # per channel over a token block
        d = x.shape[-1]
        g = s.group_size if d % s.group_size == 0 else d
        return quantize(x, bits, axis=-1, group=g)

    def _work_of(self, side: str, dtype: torch.dtype) -> _Grow | None:
        if self._work[side] is None and self.working_copy != "none":
            low = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.working_copy)
            self._work[side] = _Grow(low or dtype)
        return self._work[side]

    def _append_fp(self, side: str, x: torch.Tensor) -> None:
        """New full-precision tokens after the ones held."""
        if self.working_copy == "model":
            work = self._work_of(side, x.dtype)
            work.append(x)
            self._set_fp(side, work.view(self._n_old(side)))
        else:
            self._set_fp(side, torch.cat([self._fp(side), x], dim=-2))

    def _add_packed(self, side: str, q: Packed, dtype: torch.dtype, replaces_fp: int) -> None:
        """Append ``q`` to the packed tokens; its tokens are new (per-token) or the oldest ``replaces_fp``
        full-precision tokens (KIVI). The working copy gets their dequantized values, computed once."""
        old = self._old(side)
        start = self._n_old(side)
        self._set_old(side, q if old is None else concat(old, q))
        work = self._work_of(side, dtype)
        if work is None:
            if replaces_fp:
                self._set_fp(side, self._fp(side)[..., replaces_fp:, :].clone())
            return
        deq = dequantize(q).to(work.data.dtype if work.data is not None else work.dtype or dtype)
        if self.working_copy == "model":
            if replaces_fp:                        # overwrite the tokens in place: same positions
                work.data[..., start:start + replaces_fp, :] = deq
            else:
                work.append(deq)
            self._set_fp(side, work.view(start + q.shape[-2]))
        else:
            work.append(deq)
            if replaces_fp:
                self._set_fp(side, self._fp(side)[..., replaces_fp:, :].clone())

    def _all(self, side: str, dtype: torch.dtype) -> torch.Tensor:
        """Every token of this side for attention: dequantized packed tokens, then the full-precision ones."""
        fp, old = self._fp(side), self._old(side)
        if self.working_copy == "model":
            return self._work[side].view()
        if old is None:
            return fp
        work = self._work[side]
        deq = work.view().to(dtype) if work is not None else dequantize(old).to(dtype)
        return torch.cat([deq, fp], dim=-2) if fp.numel() else deq

    # --- transformers' Cache layer interface --------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new K/V (batch, kv_heads, new_tokens, head_dim); return all K/V so far, dequantized
        (the states' dtype, (batch, kv_heads, tokens, head_dim)), for attention.

        With ``working_copy="model"`` the returned tensors are views of the working buffer: valid until
        the next update or crop of this layer (clone them to keep them).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        s = self.spec
        for side, x in (("k", key_states), ("v", value_states)):
            bits = self._bits(side)
            if bits >= 16:
                self._append_fp(side, x)
            elif s.mode == "per-token":
                self._add_packed(side, self._quantize(x, bits, side == "k"), x.dtype, 0)
            else:  # KIVI: append to the window, move whole blocks of the oldest tokens out of it
                self._append_fp(side, x)
                n = self._fp(side).shape[-2]
                if n >= s.window + s.group_size:
                    m = (n - s.window) // s.group_size * s.group_size              # whole blocks leave the window
                    q = self._quantize(self._fp(side)[..., :m, :], bits, side == "k")
                    self._add_packed(side, q, x.dtype, m)
        return self._all("k", key_states.dtype), self._all("v", value_states.dtype)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def exact_prefix(self, n: int) -> int:
        """The longest prefix, at most ``n`` tokens, to which :meth:`crop` cuts this layer to exactly what a
        fresh prefill of that prefix holds: quantized tokens as packed blocks, the others in full precision.

        Per-token mode and 16-bit sides: ``n`` (a token's codes depend on that token only). KIVI: ``n`` if
        at least ``window`` full-precision tokens would remain after the packed ones; otherwise the
        block boundary ``max(0, (n - window) // group * group)`` where a fresh KIVI prefill of ``n``
        tokens ends its packed part (the tokens after it were quantized here and their full-precision
        values are gone: the caller recomputes them).
        """
        n = max(0, min(n, self.cumulative_length))
        s = self.spec
        if s.mode != "kivi" or max(self._n_old("k"), self._n_old("v")) == 0:
            return n
        fresh = max(0, (n - s.window) // s.group_size * s.group_size)
        return n if fresh >= max(self._n_old("k"), self._n_old("v")) else fresh

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the ``-tokens_to_remove`` newest tokens (transformers' ``Cache.crop``: a negative count).

        Per-token mode and full-precision tokens: exact (the kept tokens' codes and values are untouched).
        KIVI, when the cut falls inside the packed part: the whole blocks before the cut stay packed; the
        kept tokens of the cut block return to the window as their dequantized values (what attention saw
        before the crop; they are quantized again when they leave the window). Cut at
        :meth:`exact_prefix` to avoid that second rounding.

        Raises:
            ValueError: a positive count (transformers' legacy absolute length is not supported).
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = max(0, self.cumulative_length + tokens_to_remove)
        for side in ("k", "v"):
            old, n_old = self._old(side), self._n_old(side)
            work = self._work[side]
            if n >= n_old:                                             # the cut is in the full-precision tokens
                if self.working_copy == "model":
                    work.n = n
                    self._set_fp(side, work.view(n_old))
                else:
                    self._set_fp(side, self._fp(side)[..., :n - n_old, :].clone())
                continue
            g = self.spec.group_size
            keep = n // g * g if self.spec.mode == "kivi" else n             # KIVI: both sides in whole blocks
            back = None
            if keep < n and self.working_copy != "model":                # part of a block returns to the window
                back = dequantize(take_tokens(old, keep + g, start=keep))[..., :n - keep, :]
                if work is not None:                                     # as the half-precision copy read them
                    back = back.to(work.dtype)
            self._set_old(side, take_tokens(old, keep) if keep else None)
            dtype = self._fp(side).dtype
            if self.working_copy == "model":
                work.n = n                                               # positions [keep, n) already hold those values
                self._set_fp(side, work.view(keep))
            else:
                if work is not None:
                    work.n = keep
                empty = torch.empty(*old.shape[:-2], 0, old.shape[-1], dtype=dtype, device=old.codes.device)
                self._set_fp(side, back.to(dtype) if back is not None else empty)
        self.cumulative_length = n

    def nbytes(self) -> int:
        """Bytes the cache must hold: packed codes with scales and zero points, plus full-precision tokens.

        Does not include the working copy (:meth:`working_nbytes`).
        """
        total = 0
        for t in (self.k_old, self.v_old, self.keys, self.values):
            if isinstance(t, Packed):
                total += t.nbytes
            elif t is not None:
                total += t.numel() * t.element_size()
        return total

    def working_nbytes(self) -> int:
        """Bytes the working copy allocates on top of :meth:`nbytes` (0 with ``working_copy="none"``).

        With ``"model"`` the buffer's whole allocation (dequantized tokens, spare capacity up to the next
        64 tokens) minus the full-precision tokens :meth:`nbytes` already counts.
        """
        total = sum(w.nbytes() for w in self._work.values() if w is not None)
        if self.working_copy == "model":
            total -= sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return total

    def reset(self) -> None:
        super().reset()
        self.k_old = self.v_old = None
        self._work = {"k": None, "v": None}
        self.cumulative_length = 0


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose layer i is a :class:`QuantizedKVLayer` with ``specs[i]``.

    Args:
        specs: one :class:`KVSpec` per decoder layer.
        working_copy: what each layer keeps dequantized for attention (:class:`QuantizedKVLayer`):
            ``"model"`` (default: fast, exact, but holds a full-width copy), ``"float16"``, ``"bfloat16"``
            or ``"none"`` (packed only, dequantizes the history at every step).

    Raises:
        ValueError: an unknown ``working_copy``.
    """

    def __init__(self, specs: list[KVSpec], working_copy: str = DEFAULT_WORKING_COPY):
        super().__init__(layers=[QuantizedKVLayer(s, working_copy) for s in specs])
        self.specs = specs
        self.working_copy = working_copy

    def nbytes(self) -> int:
        """Bytes the cache must hold now: packed codes, scales, zero points and full-precision tokens."""
        return sum(layer.nbytes() for layer in self.layers)

    def working_nbytes(self) -> int:
        """Bytes the working copies hold on top of :meth:`nbytes` (what the process holds: the sum)."""
        return sum(layer.working_nbytes() for layer in self.layers)

    def exact_prefix(self, n: int) -> int:
        """The longest prefix of at most ``n`` tokens every layer crops to exactly (:meth:`QuantizedKVLayer.exact_prefix`)."""
        return min((layer.exact_prefix(n) for layer in self.layers), default=n)
