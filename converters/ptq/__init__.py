"""Torch-side post-training quantization of a whole checkpoint (RTN, GPTQ, AWQ) into the GPTQ checkpoint layout.

Calibration follows GPTQ's sequential procedure (Frantar et al. 2023, Sec. 4 "Step 3"): the inputs
of block 0 are captured on calibration text (the wiki calibration split, :mod:`edgerun.data`), then
block by block the inputs of every linear layer are recorded, the layer's linears are quantized,
and the block is re-run with its quantized weights to produce the next block's inputs, so every
block is calibrated on what the already-quantized model actually feeds it.

AWQ's per-channel scales (Lin et al. 2024, Sec. 3.2) are folded into the operation producing the
layer's input, so the checkpoint is self-contained: q/k/v and gate/up scales into the preceding
RMSNorm weight (Gemma's ``1 + w`` norms: ``(1 + w) / s - 1``), down_proj's into up_proj's rows.
o_proj's input comes from the attention heads (not 1:1 with any weight under GQA), so o_proj is
quantized with s = 1, as in the AWQ reference implementation when shapes do not line up.

Output: an HF checkpoint directory with ``config.json`` carrying ``quantization_config``
(``quant_method: gptq``, ``checkpoint_format: gptq``, ``bits``, ``group_size``, ``sym: false``,
``desc_act: false``, plus ``edgerun_method``), ``model.safetensors`` with ``qweight``/``qzeros``/
``scales``/``g_idx`` per linear (layout in :mod:`edgerun.formats.gptq`) and every other tensor in
float32, and the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.numpy import save_file

from converters.source import architecture_of, copy_tokenizer
from edgerun.atomic import atomic_dir
from edgerun.calibration import block_inputs, calibration_windows, run_block
from converters.ptq.methods import METHODS
from edgerun.formats.gptq import BITS, QuantizedLinear, check_format, from_gptq_tensors, to_gptq_tensors
from edgerun.errors import UsageError
from edgerun.formats import safetensors as st_format

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _record_inputs(layer, hiddens, kwargs_list) -> dict[str, torch.Tensor]:
    """Run the block once, recording the (tokens, in) float32 inputs of each of its linear layers."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in LINEARS}
    handles = []
    for name in LINEARS:
        mod = layer.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())))
    try:
        run_block(layer, hiddens, kwargs_list)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in seen.items()}


def _fold_norm(norm: torch.nn.Module, s: torch.Tensor, one_plus: bool) -> None:
    with torch.no_grad():
        if one_plus:
            norm.weight.copy_((1.0 + norm.weight) / s - 1.0)
        else:
            norm.weight.div_(s)


# linears sharing one input, and the operation whose output that input is (AWQ folds 1/s into it)
def _input_groups(gemma: bool) -> list[tuple[tuple[str, ...], str | None]]:
    return [(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
            (("self_attn.o_proj",), None),
            (("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"),
            (("mlp.down_proj",), "mlp.up_proj")]


def _awq_scale_and_fold(layer, inputs: dict[str, torch.Tensor], bits: int, group_size: int,
                        gemma: bool) -> dict[str, torch.Tensor]:
    """AWQ: search one scale per input group on the float inputs, fold it in; return the scaled inputs.

    All scales are searched and folded before any weight is quantized (folding 1/s into up_proj
    after up_proj was quantized would take it off its grid).
    """
    scaled = dict(inputs)
    for names, fold_into in _input_groups(gemma):
        if fold_into is None:
            continue
        mods = [layer.get_submodule(n) for n in names]
        stacked = torch.cat([m.weight.detach().float() for m in mods])
        _, s = METHODS["awq"](stacked, inputs[names[0]], bits, group_size)
        target = layer.get_submodule(fold_into)
        with torch.no_grad():
            if fold_into == "mlp.up_proj":
                target.weight.div_(s[:, None])            # up_proj's rows are down_proj's input channels
            else:
                _fold_norm(target, s, one_plus=gemma)
            for m in mods:
                m.weight.mul_(s[None, :])
        for n in names:
            scaled[n] = inputs[n] / s[None, :]
    return scaled


def quantize_layer_linears(layer, inputs: dict[str, torch.Tensor], method: str, bits: int, group_size: int,
                           gemma: bool) -> dict[str, QuantizedLinear]:
    """Quantize the seven linears of one block in place (their weights become the dequantized values).

    Args:
        layer: a decoder block (transformers Llama/Gemma 3 layer).
        inputs: recorded float32 inputs (tokens, in) of each linear, by name.
        method: ``rtn``, ``gptq`` or ``awq`` (:data:`converters.ptq.methods.METHODS`).
        bits, group_size: weight bits and input columns per scale.
        gemma: Gemma 3's ``1 + w`` norms (AWQ folds its scales into them).

    Returns:
        ``{linear name: QuantizedLinear}`` (codes uint8 (out, in), scales float32 and zeros int32
        (out, in / group_size)).
    """
    if method == "awq":
        inputs = _awq_scale_and_fold(layer, inputs, bits, group_size, gemma)
    code_method = "rtn" if method == "awq" else method
    result: dict[str, QuantizedLinear] = {}
    for names, _ in _input_groups(gemma):
        for n in names:
            m = layer.get_submodule(n)
            ql, _ = METHODS[code_method](m.weight.detach().float(), inputs[n], bits, group_size)
            with torch.no_grad():
                m.weight.copy_(ql.dequantize())
            result[n] = ql
    return result


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, method: str = "gptq", bits: int = 4,
                        group_size: int = 64, n_samples: int = 16, seq_len: int = 512, force: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Quantize every linear layer of an HF Llama/Gemma 3 checkpoint and write it in the GPTQ layout.

    Args:
        checkpoint: float HF checkpoint directory.
        out: output directory.
        method: ``rtn``, ``gptq`` or ``awq``.
        bits: 2, 3, 4 or 8. group_size: input columns per scale (must divide every layer's input width).
        n_samples, seq_len: calibration windows (count, tokens each) from the wiki calibration split.
        force: replace an existing output.
        progress: called as ``progress(done_layers, total_layers)``.

    Returns:
        ``out`` (layout in the module doc).

    Raises:
        UsageError: unknown method, unsupported bits or group size, unsupported architecture, too
            little calibration text, output exists without ``force``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer   # heavy: only a quantization loads a model

    checkpoint, out = Path(checkpoint), Path(out)
    if method not in METHODS:
        raise UsageError(f"unknown PTQ method '{method}'; valid: {', '.join(METHODS)}")
    if bits not in BITS:
        raise UsageError(f"unsupported bit width {bits}; valid: {', '.join(map(str, BITS))}")
    st_format.checkpoint_files(checkpoint)
    cfg = st_format.read_config(checkpoint)
    arch = architecture_of(cfg)
    for width in {cfg["hidden_size"], cfg["intermediate_size"],
                  cfg["num_attention_heads"] * (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])}:
        try:
            check_format(int(width), bits, group_size)
        except ValueError as e:
            raise UsageError(f"{e}; pick a group size dividing {width} (e.g. 32 or 64)") from None
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    windows = calibration_windows(tokenizer, n_samples, seq_len)
    hiddens, kwargs_list = block_inputs(model, windows)
    quantized: dict[str, QuantizedLinear] = {}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        inputs = _record_inputs(layer, hiddens, kwargs_list)
        for name, ql in quantize_layer_linears(layer, inputs, method, bits, group_size, arch == "gemma3").items():
            quantized[f"model.layers.{i}.{name}"] = ql
        hiddens = run_block(layer, hiddens, kwargs_list)
        if progress:
            progress(i + 1, len(layers))
    return _save(model, quantized, checkpoint, out, cfg, method, bits, group_size, force)


def _save(model, quantized, checkpoint: Path, out: Path, cfg: dict, method: str, bits: int, group_size: int,
          force: bool) -> Path:
    tensors: dict[str, np.ndarray] = {}
    for name, value in model.state_dict().items():
        base = name.removesuffix(".weight")
        if base in quantized:
            for k, v in to_gptq_tensors(quantized[base]).items():
                tensors[f"{base}.{k}"] = v
        elif not (name == "lm_head.weight" and cfg.get("tie_word_embeddings", False)):
            tensors[name] = value.detach().float().numpy().copy()
    cfg = dict(cfg)
    cfg["quantization_config"] = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits,
                                  "group_size": group_size, "sym": False, "desc_act": False,
                                  "edgerun_method": method}
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        copy_tokenizer(checkpoint, tmp)
    return out
