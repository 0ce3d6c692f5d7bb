"""MixPE emulation: shift-and-add exactness, batched codes vs bit-planes, dequantize-after-accumulate exactness,
op counts, the simulator time model, the real model."""

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
    p.write_text("clock_mhz: 500\nif_width_bits: 1024\ndesigns: {}\n")
    with pytest.raises(UsageError, match="field 'dram_pj_per_bit'"):
        mixpe.load_cost_table(p)
    table = mixpe.load_cost_table()
    table["designs"]["W4A8"]["array"] = [64]
    import yaml
    p.write_text(yaml.safe_dump(table))
    with pytest.raises(UsageError, match="designs.W4A8.array"):
        mixpe.load_cost_table(p)


# --- batched codes vs bit-planes -------------------------------------------------------------------------

def test_codes_path_equals_bitplane_path_on_every_int4_int8_pair():
    # every two's-complement INT4 code (16) x every INT8 value (256), each pair a one-element group
    q = torch.arange(16).reshape(16, 1)                        # unsigned codes 0..15 -> signed -8..7
    qs, _ = mixpe.signed_codes(q, torch.zeros(16, 1, dtype=torch.int64), 4)
    x = torch.arange(-128, 128, dtype=torch.float64).reshape(256, 1)
    oracle = mixpe.bitplane_partial_sums(x, qs, 1, 4)                                     # (256, 16, 1) float64
    fast = mixpe.codes_partial_sums(x, mixpe.pack_codes(qs, 1))                           # float32
    assert fast.dtype == torch.float32
    assert torch.equal(fast.double(), oracle)
    assert torch.equal(oracle[:, :, 0], x * qs[:, 0].double()[None, :])                  # = the integer products


def test_codes_path_is_exact_at_the_float32_bound_and_refuses_beyond(monkeypatch):
    # the largest groups whose integer partial sums stay below 2^24: 127 * 8 * 16512 = 16,776,192 (W4A8)
    gs = 16512
    assert mixpe.check_float32_exact(gs, 4) == 16_776_192 < 2 ** 24
    qs = torch.full((2, gs), -8)
    x = torch.full((1, gs), -127.0)
    x[0, 0] = -126.0                                            # an odd total, which float32 rounding would lose
    oracle = mixpe.bitplane_partial_sums(x, qs, gs, 4)
    fast = mixpe.codes_partial_sums(x, mixpe.pack_codes(qs, gs))
    assert oracle[0, 0, 0].item() == 127 * 8 * gs - 8 and torch.equal(fast.double(), oracle)
    with pytest.raises(ValueError, match="2\\^24"):
        mixpe.check_float32_exact(1033, 8)                     # W8A8: 127 * 128 * 1033 >= 2^24

    def w8a8_layer(gemm="codes"):
        return mixpe.MixPELinear(torch.full((2, 2066), 255, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64),
                                 torch.ones(2, 2), 1033, 8, "W8A8", gemm=gemm)

    if mixpe.int8_mm_available():            # int32 accumulation: exact past the float32 bound
        x8 = torch.full((1, 2066), 127.0)
        assert torch.equal(w8a8_layer()(x8), w8a8_layer("bitplane")(x8))
    monkeypatch.setattr(mixpe, "_INT_MM", False)   # the float32 fallback refuses what it cannot sum exactly
    with pytest.raises(ValueError, match="2\\^24"):
        w8a8_layer()


@pytest.mark.parametrize("tokens", [1, 3, 40])          # block-diagonal product (t * G <= 48) and one per group
def test_int8_partial_sums_equal_the_bitplane_oracle(tokens):
    if not mixpe.int8_mm_available():
        pytest.skip("this torch has no int8 matrix product on CPU")
    q, zeros, scales = _random_layer(n=24, k=200, group=64)  # 4 groups, the last one short
    q_signed, _ = mixpe.signed_codes(q, zeros, 4)
    x = torch.randint(-127, 128, (tokens, 200))
    fast = mixpe.int8_partial_sums(x, mixpe.pack_codes(q_signed, 64, torch.int8))
    assert fast.dtype == torch.int32
    assert torch.equal(fast.double(), mixpe.bitplane_partial_sums(x.double(), q_signed, 64, 4))


@pytest.mark.parametrize("mode", ["W4A8", "W4A16"])
def test_codes_layer_equals_bitplane_layer_on_a_random_layer(mode):
    q, zeros, scales = _random_layer(n=40, k=200, group=64)   # 200 = 3 x 64 + 8: a short last group
    codes, planes = (mixpe.MixPELinear(q, zeros, scales.float(), 64, 4, mode, gemm=g) for g in ("codes", "bitplane"))
    x = torch.randn(5, 200) * 4
    xq = mixpe.quantize_activations_int8(x)[0] if mode == "W4A8" else x.half()
    if mode == "W4A8":  # integers: the partial sums and, through the same float64 dequantization, the outputs
        assert torch.equal(codes.partial_sums(xq).double(), planes.partial_sums(xq))
        assert torch.equal(codes(x), planes(x))
    else:               # fp16 activations summed in fp32 vs float64: a rounding apart
        assert torch.allclose(codes.partial_sums(xq).double(), planes.partial_sums(xq), rtol=1e-6, atol=1e-4)
        assert torch.allclose(codes(x), planes(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("accum,tol", [("fp64", 1e-7), ("fp32", 1e-6), ("fp16", 2e-3), ("bf16", 2e-2)])
def test_w4a16_accumulation_precision_is_configurable(accum, tol):
    q, zeros, scales = _random_layer(n=24, k=128, group=32)
    layer = mixpe.MixPELinear(q, zeros, scales.float(), 32, 4, "W4A16", accum=accum)
    assert layer.codes.dtype == mixpe.ACCUMULATIONS[accum][0]
    x = torch.randn(3, 128)
    act = mixpe.ACCUMULATIONS[accum][1]
    ref = x.to(act).double() @ _dequantized(q, zeros, scales.float().double(), 32).T
    err = ((layer(x).double() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol                                            # the output is float32: 1e-7 at best
    if accum == "fp64":                                         # partial sums: the float64 oracle's, to rounding
        xq = x.half()
        oracle = mixpe.bitplane_partial_sums(xq, layer.q_signed, 32, 4)
        assert torch.allclose(layer.partial_sums(xq), oracle, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown accumulation"):
        mixpe.MixPELinear(q, zeros, scales.float(), 32, 4, "W4A16", accum="fp8")


# --- the simulator time model --------------------------------------------------------------------------

def test_time_model_reproduces_the_simulator_row_it_was_calibrated_on():
    # results/mixpe_res.csv of the simulator: OPT-6.7B at batch 64, time vs FP16 (two decimals) W4A8 0.10, W4A16 0.19
    row = mixpe.reproduce_simulator_row("OPT-6.7B")
    for mode in ("W4A8", "W4A16"):
        ours, published = row[mode]["time"]
        assert abs(ours - published) <= 0.005, (mode, ours, published)


def test_time_model_counts_a_small_layer_by_hand():
    table = mixpe.load_cost_table()
    # W4A8 on 64x64 8/4 PEs, K=256 -> N=300 at batch 1: main GEMM at 4 bits, factor 2 on each side:
    # ceil(1 / 128) * ceil(300 / 128) * 256 = 768 cycles; dequant GEMM 32 -> 3 at 8 bits: 1 * 1 * 32 = 32
    r = mixpe.model_design([(256, 300)], "W4A8", 1, table)
    assert r["compute_cycles"] == 768 + 32
    # traffic of the main GEMM: (256*300*4 + 256*4 + 300*16) bits / 1024 per cycle = 306 cycles < 768
    assert r["cycles"] == 800 and r["memory_bound_gemms"] == 0
    # FP16 on 32x28: K -> N/8 (38) and K -> N at 16 bits: ceil(38/28) * 256 + ceil(300/28) * 256
    f = mixpe.model_design([(256, 300)], "FP16", 1, table)
    assert f["compute_cycles"] == 2 * 256 + 11 * 256
    # at batch 64 the FP16 rows fill twice (ceil(64/32)), MixPE's once (ceil(64/128))
    assert mixpe.model_design([(256, 300)], "FP16", 64, table)["compute_cycles"] == 2 * f["compute_cycles"]
    assert mixpe.model_design([(256, 300)], "W4A8", 64, table)["compute_cycles"] == 800
    # batch 1 uses one PE row, so only a very shallow layer waits for DRAM: K=2 -> N=4096, compute
    # 32 * 2 = 64 cycles, traffic (2*4096*4 + 2*4 + 4096*16) / 1024 -> 97 cycles
    r = mixpe.model_design([(2, 4096)], "W4A8", 1, table)
    assert r["memory_bound_gemms"] == 1 and r["cycles"] == 97 + 1   # + its dequant GEMM (1 -> 32): 1 cycle


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
    assert set(acc["mixpe"]["model"]) == {"batch_1", "batch_64"}
    assert acc["mixpe"]["model"]["batch_1"]["mixpe"]["gemms"] == 2 * 7 * 30   # 7 linear layers x 30 blocks


def test_codes_path_equals_bitplane_path_on_a_real_layer(w4_checkpoint):
    from safetensors.numpy import load_file

    from edgerun.formats import safetensors as st_format
    from edgerun.formats.gptq import from_gptq_tensors

    cfg = st_format.read_config(w4_checkpoint)
    qc = cfg["quantization_config"]
    raw = {}
    for f in st_format.checkpoint_files(w4_checkpoint):
        raw.update(load_file(str(f)))
    base = "model.layers.0.mlp.down_proj"                      # K = 1536: 24 groups of 64
    t = {k: raw[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    ql = from_gptq_tensors(t, qc["bits"], qc["group_size"], t["g_idx"].shape[0], t["scales"].shape[1])
    x = torch.randn(6, ql.q.shape[1], generator=torch.Generator().manual_seed(0)) * 2
    x[:, 7] = 40.0                                              # an outlier channel, as LLM activations have
    for mode in ("W4A8", "W4A16"):
        codes, planes = (mixpe.MixPELinear(ql.q, ql.zeros, ql.scales, qc["group_size"], 4, mode, gemm=g)
                         for g in ("codes", "bitplane"))
        xq = mixpe.quantize_activations_int8(x)[0] if mode == "W4A8" else x.half()
        if mode == "W4A8":
            assert torch.equal(codes.partial_sums(xq).double(), planes.partial_sums(xq))
            assert torch.equal(codes(x), planes(x))
        else:
            assert torch.allclose(codes(x), planes(x), rtol=1e-5, atol=1e-5)


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


def test_chat_cli_selects_the_gemm_path_and_accumulation(w4_checkpoint):
    """`edgerun chat --backend mixpe --mixpe-gemm/--mixpe-accum`: W4A8 integer partial sums are exact on both
    paths, so the greedy replies agree; the flags are refused without --backend mixpe."""
    import subprocess

    from conftest import cli_env, edgerun_cmd

    def chat(*extra):
        r = subprocess.run(edgerun_cmd("chat", str(w4_checkpoint), "-p", "Name a colour.", "--temperature", "0",
                                       "--max-tokens", "6", "--ctx-size", "128", *extra),
                           capture_output=True, text=True, env=cli_env(), timeout=600)
        return r

    codes = chat("--backend", "mixpe", "--mixpe", "W4A8", "--mixpe-gemm", "codes")
    planes = chat("--backend", "mixpe", "--mixpe", "W4A8", "--mixpe-gemm", "bitplane")
    assert codes.returncode == 0 and planes.returncode == 0, codes.stderr + planes.stderr
    assert codes.stdout == planes.stdout and codes.stdout.strip()
    half = chat("--backend", "mixpe", "--mixpe-accum", "fp16")
    assert half.returncode == 0, half.stderr
    bad = chat("--backend", "torch", "--mixpe-gemm", "codes")
    assert bad.returncode != 0 and "apply to --backend mixpe" in bad.stderr
