"""Weight-only PTQ methods for one linear layer: RTN, GPTQ and AWQ, group-wise, on calibration activations.

Each method is a small registered unit that turns a float weight (out, in) and the layer's
calibration inputs into :class:`~edgerun.formats.gptq.QuantizedLinear` codes.

- **RTN**: round to nearest, per group (:func:`edgerun.formats.gptq.rtn`).
- **GPTQ** (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers", ICLR 2023, Alg. 1): minimise ||W X - W_hat X||^2 column by column with the inverse
  Hessian H^-1 of H = 2 X X^T (Eq. 2-3): quantize column i, spread its error
  (w_i - q_i) / [H^-1]_ii over the columns not yet quantized with row i of the upper Cholesky factor
  of H^-1 (Eq. 4, "Cholesky reformulation"), lazily in blocks of 128 columns; dampening 1% of the
  mean diagonal; group scales are fixed when the group's first column is reached.
- **AWQ** (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
  Acceleration", MLSys 2024, Sec. 3.2-3.3): scale input channel j by s_j = mean|x_j|^alpha before
  quantizing (W diag(s), X diag(s)^-1), alpha chosen on a grid of 20 in [0, 1) to minimise the output
  error ||Q(W diag(s)) diag(s)^-1 X - W X||; the caller folds 1/s into the operation that produces X.
"""

from __future__ import annotations

from typing import Callable

import torch

from edgerun import minmax
from edgerun.formats.gptq import QuantizedLinear, check_format, group_params, rtn

METHODS: dict[str, Callable] = {}


def register(name: str):
    """Decorator: add a method ``fn(w, x, bits, group_size) -> (QuantizedLinear, extra)`` to :data:`METHODS`."""
    def wrap(fn):
        METHODS[name] = fn
        return fn
    return wrap


@register("rtn")
def quantize_rtn(w: torch.Tensor, x: torch.Tensor | None, bits: int, group_size: int) -> tuple[QuantizedLinear, None]:
    """Round to nearest per group of ``w`` (out, in) float32; the calibration inputs ``x`` are ignored.

    Returns:
        (the codes, None).

    Raises:
        ValueError: ``group_size`` does not divide ``in`` or unsupported ``bits``.
    """
    return rtn(w, bits, group_size), None


@register("gptq")
def quantize_gptq(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
                  block: int = 128) -> tuple[QuantizedLinear, None]:
    """GPTQ (Alg. 1) of weight ``w`` (out, in) float32 given calibration inputs ``x`` (tokens, in) float32.

    Args:
        damp: dampening of H's diagonal, as a fraction of its mean. block: lazy-update block (columns).

    Returns:
        (the codes: uint8 (out, in), float32 scales and int32 zeros (out, in / group_size); None).

    Raises:
        ValueError: ``group_size`` does not divide ``in`` or unsupported ``bits``.
    """
    out_f, in_f = w.shape
    check_format(in_f, bits, group_size)
    W = w.clone().double()
    X = x.double()
    H = 2.0 * X.T @ X / X.shape[0]                                     # (in, in), Eq. 2
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # Eq. 4
    Q = torch.zeros_like(W)
    n_groups = in_f // group_size
    block = max(block // group_size, 1) * group_size  # a group never straddles two blocks
    scales = torch.zeros(out_f, n_groups, dtype=W.dtype)
    zeros = torch.zeros(out_f, n_groups, dtype=W.dtype)
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        W1, Err1 = W[:, b0:b1].clone(), torch.zeros(out_f, b1 - b0, dtype=W.dtype)
        Hinv1 = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            g = col // group_size
            if col % group_size == 0:  # fix this group's grid on its (already error-updated) weights
                scales[:, g], zeros[:, g] = group_params(W1[:, i:i + group_size], bits)
            q = minmax.quantize(W1[:, i], scales[:, g], zeros[:, g], bits)
            Q[:, col] = q
            w_hat = minmax.dequantize(q, scales[:, g], zeros[:, g])
            err = (W1[:, i] - w_hat) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return QuantizedLinear(Q.to(torch.uint8), scales.float(), zeros.to(torch.int32), bits, group_size), None


@register("awq")
def quantize_awq(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int,
                 grid: int = 20) -> tuple[QuantizedLinear, torch.Tensor]:
    """AWQ scale search for ``w`` (out, in) on inputs ``x`` (tokens, in); returns the codes of W diag(s) and s (in,).

    The codes represent ``W diag(s)``: the layer computes the right output only when its input is
    divided by ``s`` (folded by the caller into the previous operation).

    Args:
        grid: candidate exponents alpha = k / grid, k = 0 .. grid - 1.

    Returns:
        (the codes of ``W diag(s)``, s float32 (in,)).

    Raises:
        ValueError: ``group_size`` does not divide ``in`` or unsupported ``bits``.
    """
    out_f, in_f = w.shape
    check_format(in_f, bits, group_size)
    x_mean = x.abs().mean(dim=0).clamp(min=1e-8)                      # (in,) mean |x_j|
    sample = x[torch.linspace(0, x.shape[0] - 1, min(x.shape[0], 2048)).long()]
    ref = sample @ w.T
    best = (float("inf"), None)
    for k in range(grid):
        alpha = k / grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()                              # keep the scales centred on 1
        ql = rtn(w * s[None, :], bits, group_size)
        err = ((sample / s[None, :]) @ ql.dequantize().T - ref).pow(2).mean().item()
        if err < best[0]:
            best = (err, s)
    s = best[1]
    return rtn(w * s[None, :], bits, group_size), s
