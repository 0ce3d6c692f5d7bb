"""Wanda pruning of a dense checkpoint's linear layers: unstructured at a ratio, or semi-structured N:M.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models" (Wanda),
arXiv 2306.11695, Sec. 3: the importance of weight W_ij of a linear layer (out x in) is

    S_ij = |W_ij| * ||X_j||_2                                              (Eq. 1)

where ||X_j||_2 is the L2 norm of input feature j over all calibration tokens. Weights are compared
**per output row** (Sec. 3, "comparison group"): unstructured pruning zeroes the ``ratio`` lowest-scoring
weights of every row; N:M pruning zeroes the N lowest-scoring weights of every group of M consecutive
input columns in every row (2:4 keeps 2 of every 4, as sparse tensor cores want). Pruning is one-shot,
no weight update.

As in the paper's code, blocks are pruned in order: each block's input norms are measured on what the
already-pruned blocks give it (:func:`edgerun.calibration.block_inputs` / ``run_block``), on token
windows of the wiki calibration split. Every linear layer inside the decoder blocks (attention q/k/v/o,
MLP gate/up/down) is pruned; embeddings and the output head are not.

What sparsity buys here: the pruned checkpoint stores its zeros densely, and so do the GGUF and ONNX
files exported from it (llama.cpp and onnxruntime have no sparse weight kernels on CPU): the file size and
speed are those of the dense model. The pass is for measuring quality (and recovery, :mod:`converters.paser`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from edgerun.errors import UsageError

SPARSITY_KEY = "edgerun_sparsity"     # config.json key recording the pruning
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_sparsity(spec: str) -> tuple[float, int, int]:
    """``"0.5"`` -> (0.5, 0, 0) unstructured; ``"2:4"`` -> (0.5, 2, 4): N:M keeps N of every M.

    Returns:
        (fraction of weights zeroed, N, M); N = M = 0 for unstructured.

    Raises:
        UsageError: not a ratio in (0, 1) nor N:M with 0 < N < M.
    """
    s = str(spec).strip()
    m = _NM.match(s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise UsageError(f"N:M sparsity needs 0 < N < M (keep N of every M weights), got {s!r}")
        return (mm - n) / mm, n, mm
    try:
        ratio = float(s)
    except ValueError:
        raise UsageError(f"sparsity must be a ratio in (0, 1) such as 0.5, or N:M such as 2:4, got {s!r}") from None
    if not 0 < ratio < 1:
        raise UsageError(f"sparsity ratio must be in (0, 1), got {s!r}")
    return ratio, 0, 0


def parse_spec(spec: str) -> str:
    """``wanda:0.5`` / ``wanda:2:4`` (``--prune``) -> the sparsity part (``0.5`` / ``2:4``), checked.

    Raises:
        UsageError: another method or a bad sparsity.
    """
    method, _, rest = str(spec).strip().partition(":")
    if method.lower() != "wanda" or not rest:
        raise UsageError(f"bad --prune {spec!r}; expected wanda:RATIO (e.g. wanda:0.5) or wanda:N:M (wanda:2:4)")
    parse_sparsity(rest)
    return rest


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, ratio: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """The Wanda pruning mask of one linear layer (Eq. 1, per-output comparison groups).

    Args:
        weight: (out, in) float weights.
        input_sq_norm: (in,) float, the squared L2 norm of each input feature over the calibration tokens.
        ratio: fraction of each row to prune (unstructured; ignored when ``m`` > 0).
        n, m: N:M semi-structured pruning: keep ``n`` of every ``m`` consecutive inputs of each row.

    Returns:
        (out, in) bool tensor, True where the weight is pruned (set to zero).

    Raises:
        UsageError: N:M with an input width not divisible by M.
    """
    score = weight.abs().float() * input_sq_norm.float().sqrt().reshape(1, -1)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if m:
        if score.shape[1] % m:
            raise UsageError(f"N:M sparsity {n}:{m} needs input widths divisible by {m}, got {score.shape[1]}")
        groups = score.reshape(score.shape[0], -1, m)                       # (out, in/m, m)
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(score.shape)
    else:
        k = int(score.shape[1] * ratio)
        if k:
            drop = torch.topk(score, k, dim=1, largest=False).indices       # (out, k)
            mask.scatter_(1, drop, True)
    return mask


def _linears(layer) -> dict[str, torch.nn.Linear]:
    return {name: layer.get_submodule(name) for name in LINEARS if _has(layer, name)}


def _has(layer, name: str) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


def prune_checkpoint(checkpoint: str | Path, out: str | Path, sparsity: str = "0.5", n_samples: int = 16,
                     seq_len: int = 512, dataset: str = "wiki", force: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Prune every decoder-block linear layer of a dense HF checkpoint with Wanda; write the pruned checkpoint.

    Args:
        checkpoint: a dense Llama-family HF checkpoint (float weights).
        out: the output directory (written atomically; the config records the pruning under ``edgerun_sparsity``).
        sparsity: ``"0.5"`` (unstructured ratio per row) or ``"2:4"`` (N:M).
        n_samples, seq_len: calibration windows of ``seq_len`` tokens from ``dataset``'s calibration split.
        force: replace an existing output.
        progress: called as ``progress(block, blocks)``.

    Returns:
        The pruning record: method, sparsity, N, M, the measured fraction of zeros in the pruned layers,
        the calibration, and the layers pruned.

    Raises:
        UsageError: a bad sparsity, a checkpoint that is not dense, N:M on widths not divisible by M,
            too little calibration text, ``out`` exists without ``force``.
        ModelFileError: missing or corrupted checkpoint files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer   # heavy: only a prune needs it

    from converters.source import copy_tokenizer
    from edgerun.atomic import atomic_dir
    from edgerun.calibration import block_inputs, calibration_windows, run_block
    from edgerun.formats import safetensors as st_format

    checkpoint, out = Path(checkpoint), Path(out)
    ratio, n, m = parse_sparsity(sparsity)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    st_format.checkpoint_files(checkpoint)
    cfg = st_format.read_config(checkpoint)
    if "quantization_config" in cfg or "edgerun_moe" in cfg:
        raise UsageError(f"{checkpoint} is not a dense float checkpoint: Wanda prunes dense models")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    windows = calibration_windows(tokenizer, n_samples, seq_len, dataset)
    hiddens, kwargs_list = block_inputs(model, windows)
    layers = model.model.layers
    zeros = total = 0
    for i, layer in enumerate(layers):
        linears = _linears(layer)
        norms = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}

        def hook(name):
            def record(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                norms[name] += (x * x).sum(dim=0)
            return record

        handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
        try:
            run_block(layer, hiddens, kwargs_list)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for name, lin in linears.items():
                mask = wanda_mask(lin.weight, norms[name], ratio, n, m)
                lin.weight[mask] = 0.0
                zeros += int(mask.sum())
                total += mask.numel()
        hiddens = run_block(layer, hiddens, kwargs_list)      # the next block sees the pruned block's output
        if progress:
            progress(i + 1, len(layers))
    record = {"method": "wanda", "sparsity": str(sparsity), "ratio": ratio, "n": n, "m": m,
              "zero_fraction": zeros / max(1, total), "pruned_weights": zeros, "layer_weights": total,
              "layers": list(LINEARS),
              "calibration": {"dataset": dataset, "split": "calibration", "windows": n_samples,
                              "tokens_per_window": seq_len}}
    cfg = dict(cfg)
    cfg[SPARSITY_KEY] = record
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        copy_tokenizer(checkpoint, tmp)
    return record
