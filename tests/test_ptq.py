"""Torch-side PTQ (RTN, GPTQ, AWQ) into the GPTQ checkpoint layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.ptq.methods import METHODS
from edgerun.formats.gptq import from_gptq_tensors, pack_bits, rtn, to_gptq_tensors, unpack_bits
from edgerun.errors import UsageError


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=(64, 7), dtype=np.uint8)
    words = pack_bits(codes, bits)
    assert words.dtype == np.int32 and words.shape == (64 * bits // 32, 7)
    assert (unpack_bits(words, bits, 64) == codes).all()


def test_4bit_packing_matches_the_gptq_word_layout():
    # value j of a column sits at bits 4j..4j+3 of its 32-bit word (GPTQ/AutoGPTQ qweight layout)
    codes = np.arange(8, dtype=np.uint8)[:, None]
    assert pack_bits(codes, 4)[0, 0] == np.int32(0x76543210)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_layout_round_trips_a_layer(bits):
    w = torch.randn(96, 128)
    ql = rtn(w, bits, 32)
    back = from_gptq_tensors(to_gptq_tensors(ql), bits, 32, in_f=128, out_f=96)
    assert torch.equal(back.q, ql.q) and torch.equal(back.zeros, ql.zeros)
    assert torch.allclose(back.scales, ql.scales, rtol=1e-3)  # scales are stored as float16


@pytest.fixture(scope="module")
def real_layer_activations(smollm2_source):
    """Weight and real calibration inputs of block 3's down_proj in the default model (4 x 256 tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import converters.ptq as ptq
    from edgerun.calibration import block_inputs, calibration_windows, run_block

    tok = AutoTokenizer.from_pretrained(smollm2_source.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_source.path, dtype=torch.float32)
    hiddens, kwargs = block_inputs(model, calibration_windows(tok, 4, 256))
    for layer in model.model.layers[:3]:
        hiddens = run_block(layer, hiddens, kwargs)
    layer = model.model.layers[3]
    inputs = ptq._record_inputs(layer, hiddens, kwargs)
    return layer, hiddens, kwargs, inputs


def _output_error(w, x, ql, s=None):
    xs = x if s is None else x / s[None, :]
    ref = x @ w.T
    return ((xs @ ql.dequantize().T - ref).pow(2).mean() / ref.pow(2).mean()).item()


def test_gptq_beats_rtn_on_layer_output_at_3_bits(real_layer_activations):
    layer, _, _, inputs = real_layer_activations
    w, x = layer.mlp.down_proj.weight.detach().float(), inputs["mlp.down_proj"]
    err_rtn = _output_error(w, x, METHODS["rtn"](w, x, 3, 64)[0])
    err_gptq = _output_error(w, x, METHODS["gptq"](w, x, 3, 64)[0])
    assert err_gptq < err_rtn / 2


def test_awq_scale_fold_preserves_the_block_output(real_layer_activations):
    import copy

    import converters.ptq as ptq
    from edgerun.calibration import run_block

    layer, hiddens, kwargs, inputs = real_layer_activations
    folded = copy.deepcopy(layer)
    ptq._awq_scale_and_fold(folded, inputs, 4, 64, gemma=False)
    before = run_block(layer, hiddens[:1], kwargs[:1])[0]
    after = run_block(folded, hiddens[:1], kwargs[:1])[0]
    assert (after - before).abs().max() < 1e-3 * before.abs().max()
    assert not torch.equal(folded.mlp.up_proj.weight, layer.mlp.up_proj.weight)  # a scale was folded in


@pytest.mark.model_dependent
def test_quantized_checkpoint_runs_in_the_torch_backend(smollm2_source, tmp_path):
    from converters.ptq import quantize_checkpoint
    from edgerun.backends.base import SamplingParams
    from edgerun.backends.torch import TorchBackend
    from converters.bpw import checkpoint_bpw

    out = quantize_checkpoint(smollm2_source.path, tmp_path / "w8", method="rtn", bits=8, group_size=64,
                              n_samples=2, seq_len=256)
    bpw = checkpoint_bpw(out)
    assert bpw.linear_tensor_types == {"int8": 1.0}
    assert bpw.linear_bpw == pytest.approx(8 + (16 + 8) / 64, rel=0.02)  # codes + fp16 scales + packed zeros
    engine = TorchBackend(out, n_ctx=256)
    prompt = "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"
    reply = engine.complete(engine.encode_prompt(prompt), SamplingParams(temperature=0.0, max_tokens=16))
    assert "Berlin" in reply


def test_group_size_that_does_not_divide_the_layers_is_refused(smollm2_source, tmp_path):
    from converters.ptq import quantize_checkpoint

    with pytest.raises(UsageError, match="group size 128 does not divide the layer's 576 inputs"):
        quantize_checkpoint(smollm2_source.path, tmp_path / "x", method="rtn", bits=4, group_size=128)


def test_unsupported_bits_and_methods_are_refused(smollm2_source, tmp_path):
    from converters.ptq import quantize_checkpoint

    with pytest.raises(UsageError, match="unsupported bit width 5"):
        quantize_checkpoint(smollm2_source.path, tmp_path / "x", method="rtn", bits=5)
    with pytest.raises(UsageError, match="unknown PTQ method 'smoothquant'"):
        quantize_checkpoint(smollm2_source.path, tmp_path / "x", method="smoothquant")


def test_export_ptq_pass_writes_the_checkpoint_and_records_its_calibration(smollm2_source, tmp_path):
    import json

    from conftest import make_tiny_checkpoint
    from converters.export import export

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    out = tmp_path / "q"
    result = export(str(ckpt), to="hf", out=out, ptq="rtn", bits=8, group_size=32, calib_tokens=300,
                    verify=False, progress=False, log=lambda m: None)
    assert result.record["type"] == "rtn-w8g32" and (out / "model.safetensors").is_file()
    [step] = result.record["passes"]
    assert step["name"] == "ptq" and (step["method"], step["bits"], step["group_size"]) == ("rtn", 8, 32)
    assert step["calibration"] == {"dataset": "wiki", "split": "calibration", "windows": 1, "tokens_per_window": 512}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    with pytest.raises(UsageError, match="--to hf writes the checkpoint a pass makes: give --ptq"):
        export(str(ckpt), to="hf", out=tmp_path / "none", progress=False)
