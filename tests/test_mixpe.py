"""MixPE emulation: shift-and-add exactness, dequantize-after-accumulate exactness, op counts, the real model."""

from __future__ import annotations

import pytest
import torch

from edgerun.backends import mixpe
from edgerun.errors import UsageError


def test_shift_add_equals_integer_products_for_every_int4_int8_pair():
    for q in range(-8, 8):
        for x in range(-128, 128):
            assert mixpe.shift_add_product(x, q, bits=4) == x * q


def _random_layer(n=24, k=100, group=32, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g)
    zeros = torch.randint(1, 2 ** bits - 1, (n, groups), generator=g)   # non-zero zero points
    scales = torch.rand(n, groups, generator=g, dtype=torch.float64) * 0.1 + 0.01
    return q, zeros, scales


def _dequantized(q, zeros, scales, group):
    k = q.shape[1]
    idx = torch.arange(k) // group
    return (q.double() - zeros[:, idx].double()) * scales[:, idx]


def test_group_accumulate_then_dequantize_equals_dequantize_then_gemm_float64():
    # k = 100 with groups of 32: the last group has 4 columns, handled like the others
    q, zeros, scales = _random_layer()
    x = torch.randn(5, 100, dtype=torch.float64)
    qs, zs = mixpe.signed_codes(q, zeros, 4)
    y = mixpe.group_accumulate_gemm(x, qs, zs, scales, 32, 4, integer=False)
    ref = x @ _dequantized(q, zeros, scales, 32).T
    assert ((y - ref).abs().max() / ref.abs().max()) < 1e-9


def test_w4a8_integer_path_is_exact_for_integer_activations():
    q, zeros, scales = _random_layer(group=25)
    codes = torch.randint(-127, 128, (3, 100))
    qs, zs = mixpe.signed_codes(q, zeros, 4)
    y = mixpe.group_accumulate_gemm(codes, qs, zs, scales, 25, 4, integer=True)
    ref = codes.double() @ _dequantized(q, zeros, scales, 25).T
    assert ((y - ref).abs().max() / ref.abs().max()) < 1e-12


def test_fp32_module_path_tolerance():
    q, zeros, scales = _random_layer(group=32)
    layer = mixpe.MixPELinear(q, zeros, scales.float(), 32, 4, "W4A16")
    x = torch.randn(4, 100)
    ref = x.half().double() @ _dequantized(q, zeros, scales.float().double(), 32).T
    assert ((layer(x).double() - ref).abs().max() / ref.abs().max()) < 1e-6  # fp32 output of a float64 sum


def test_op_counts_of_a_small_gemm_written_out_by_hand():
    # K = 6 inputs, N = 2 outputs, groups of 3 (2 groups), 4-bit weights, W4A8
    # codes (two's complement after -8): row 0 = [7, -8, 0, 1, 3, -1], row 1 = [0, 0, 0, 0, 0, 0]
    # popcounts of the 4-bit patterns: 7 -> 0111 (3), -8 -> 1000 (1), 0 (0), 1 (1), 3 -> 0011 (2), -1 -> 1111 (4) = 11
    q = torch.tensor([[15, 0, 8, 9, 11, 7], [8, 8, 8, 8, 8, 8]])
    zeros = torch.full((2, 2), 8)
    layer = mixpe.MixPELinear(q, zeros, torch.ones(2, 2), 3, 4, "W4A8")
    ops = layer.per_token["mixpe"]
    assert ops.macs == 12                  # K x N
    assert ops.shift_adds == 11            # sum of popcounts
    assert ops.dequant_ops == 16           # 4 per (group, output): 2 groups x 2 outputs x 4
    assert ops.row_sum_adds == 4           # (3 - 1) adds per group, 2 groups
    assert ops.act_quant_ops == 12         # 2 per input element for int8 activations
    assert ops.weight_bytes == 12 * 0.5 + 2 * 2 * 4   # 4-bit codes + fp16 scale and zero per (group, output)
    assert layer.per_token["dequant-loop"].dequant_ops == 24   # 2 per weight
    assert layer.per_token["fp16"].weight_bytes == 24


def test_malformed_cost_table_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("clock_mhz: 500\npe_cycle_pj: {int8_4: 0.7}\n")
    with pytest.raises(UsageError, match="field 'dram_pj_per_bit'"):
        mixpe.load_cost_table(p)


@pytest.fixture(scope="module")
def w4_checkpoint(smollm2_source, tmp_path_factory):
    from converters.ptq import quantize_checkpoint

    return quantize_checkpoint(smollm2_source.path, tmp_path_factory.mktemp("mixpe") / "w4", method="rtn", bits=4,
                               group_size=64, n_samples=2, seq_len=256)


def test_mixpe_w4a16_greedy_matches_the_dequantized_torch_model(w4_checkpoint):
    from edgerun.backends.base import SamplingParams
    from edgerun.backends.mixpe import MixPEBackend
    from edgerun.backends.torch import TorchBackend

    ref = TorchBackend(w4_checkpoint, n_ctx=256)
    emu = MixPEBackend(w4_checkpoint, "W4A16", n_ctx=256)
    prompt = ref.encode_prompt("<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    a = "".join(ref.stream(prompt, params))
    b = "".join(emu.stream(prompt, params))
    assert a == b and emu.last_stats.generated_tokens == 32
    acc = emu.accounting()
    # 4 dequantization ops per (group of 64, output) against 2 per weight: 32 = 64 / 2 times fewer
    assert acc["mixpe"]["ops_per_token"]["dequant_ops"] * 32 == pytest.approx(
        acc["dequant-loop"]["ops_per_token"]["dequant_ops"], rel=1e-9)
    assert 0 < acc["mixpe"]["energy_vs_fp16"] < 1


def test_w4a8_perplexity_stays_near_w4a16(w4_checkpoint):
    from edgerun.backends.mixpe import MixPEBackend
    from profilers.accuracy import perplexity

    a16 = perplexity(MixPEBackend(w4_checkpoint, "W4A16", n_ctx=300), "w4a16", window=256, n_windows=1).perplexity
    a8 = perplexity(MixPEBackend(w4_checkpoint, "W4A8", n_ctx=300), "w4a8", window=256, n_windows=1).perplexity
    assert a8 < a16 * 1.25  # per-token int8 activations cost little next to 4-bit weights


def test_checkpoint_without_quantized_weights_says_how_to_make_them(smollm2_source):
    from edgerun.backends.mixpe import MixPEBackend

    with pytest.raises(UsageError, match="--ptq rtn --bits 4"):
        MixPEBackend(smollm2_source.path, "W4A8", n_ctx=64)


def test_mode_must_match_the_checkpoint_bits(w4_checkpoint):
    from edgerun.backends.mixpe import MixPEBackend

    with pytest.raises(UsageError, match="W8A8 needs 8-bit weights"):
        MixPEBackend(w4_checkpoint, "W8A8", n_ctx=64)
    with pytest.raises(UsageError, match="unknown MixPE mode 'W3A8'"):
        MixPEBackend(w4_checkpoint, "W3A8", n_ctx=64)
