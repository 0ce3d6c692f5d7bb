"""KVTuner: the quantizer, bit packing, the packed KV cache, layouts, the search and the per-query planner."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import cli_env, edgerun_cmd, make_tiny_checkpoint, write_tiny_gguf
from edgerun.backends.base import SamplingParams
from edgerun.errors import UsageError
from edgerun.kv import quant
from edgerun.kv.cache import KVSpec, QuantizedKVCache, QuantizedKVLayer
from edgerun.kv.layout import Layout, llama_cpp_types, load
from edgerun.formats.yamlfile import YamlError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


# --- quantizer and packing ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_dequantize_error_is_bounded_by_the_step(bits, axis):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 64, 64) * 3 + 1
    p = quant.quantize(x, bits, axis=axis, group=32)
    err = (quant.dequantize(p) - x).abs()
    # step s per group, broadcast back to x's layout
    s = p.scale.float()
    if axis == -1:
        step = s.expand(*s.shape[:-1], 32).reshape(x.shape)
    else:
        step = s.expand(*s.shape[:-1], 32).reshape(*x.shape[:-2], x.shape[-1], x.shape[-2]).transpose(-1, -2)
    assert bool((err <= step * 1.0005 + 1e-6).all())          # rounding, and at most one step where clipped
    assert float((err <= step / 2 + 1e-5).float().mean()) > 0.95  # most values: half a step
    # the step is KVTuner's formula (max - min) / (2^b - 1), stored as float16
    g = x[0, 0, 0, :32] if axis == -1 else x[0, 0, :32, 0]
    assert float(s.flatten()[0]) == pytest.approx(float(((g.max() - g.min()) / (2 ** bits - 1)).half()))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_near_constant_groups_far_from_zero_keep_the_bound(bits):
    """The int16 zero point never overflows: a constant group, and a KIVI key channel at 10 +- 0.01."""
    for x, axis in ((torch.full((1, 1, 4, 64), 0.5), -1), (torch.full((1, 1, 4, 64), -300.0), -1),
                    (10 + 0.01 * torch.randn(1, 1, 32, 64, generator=torch.Generator().manual_seed(0)), -2)):
        p = quant.quantize(x, bits, axis=axis, group=32)
        err = (quant.dequantize(p) - x).abs().max()
        assert err <= max(float((x.max() - x.min()) / (2 ** bits - 1)), float(x.abs().max()) / 32000) * 1.01


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 64))
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 64 * bits // 8
    assert torch.equal(quant.unpack(packed, bits, 64), codes)


def test_kv_codes_share_the_weights_zero_point_convention():
    """zero = round(-min / scale), x_hat = (q - zero) * scale: the GPTQ weights' grid (edgerun.minmax)."""
    from edgerun import minmax

    x = torch.rand(1, 1, 4, 32, generator=torch.Generator().manual_seed(0)) + 3   # all positive: zero < 0
    p = quant.quantize(x, 4)
    scale, zero = p.scale.float(), p.zero.float()             # one group per token: (1, 1, 4, 1, 1)
    assert torch.equal(zero, minmax.zero_point(x.amin(-1)[..., None, None], scale)) and bool((zero < 0).all())
    codes = quant.unpack(p.codes, 4, 32).float().reshape(1, 1, 4, 1, 32)
    assert torch.equal(quant.dequantize(p), minmax.dequantize(codes, scale, zero).reshape(x.shape))


def test_quantizer_refuses_unsupported_bits_and_ragged_groups():
    with pytest.raises(ValueError, match="3-bit"):
        quant.quantize(torch.randn(4, 64), 3)
    with pytest.raises(ValueError, match="multiple of the group"):
        quant.quantize(torch.randn(4, 60), 4, group=32)


def test_cache_memory_equals_the_computed_bytes():
    # 4-bit per-token, group 32 along head_dim 64: 0.5 byte per value + (2 + 2) bytes per 32 values
    shape = (1, 3, 100, 64)
    p = quant.quantize(torch.randn(shape), 4, axis=-1, group=32)
    assert p.nbytes == 3 * 100 * 64 // 2 + 3 * 100 * 2 * 4
    for mode in ("per-token", "kivi"):
        for pair in ("K8V4", "KV2", "KV16"):
            lay = Layout.uniform(pair, 2, mode=mode)
            cache = QuantizedKVCache(lay.specs())
            for t in (70, 1, 1, 33):                          # a prefill then decode steps and a chunk
                for i in range(2):
                    cache.update(torch.randn(1, 3, t, 64), torch.randn(1, 3, t, 64), i)
            assert cache.nbytes() == lay.cache_bytes(105, 3, 64, fp_bits=32), (mode, pair)


def test_kivi_window_keeps_the_newest_tokens_exact():
    layer = QuantizedKVLayer(KVSpec(2, 2, "kivi", group_size=32, window=32))
    k, v = torch.randn(1, 2, 150, 64), torch.randn(1, 2, 150, 64)
    full_k, full_v = layer.update(k[..., :100, :], v[..., :100, :])
    for i in range(100, 150):
        full_k, full_v = layer.update(k[..., i:i + 1, :], v[..., i:i + 1, :])
    assert layer.get_seq_length() == 150 and full_k.shape == k.shape
    n_fp = 32 + (150 - 32) % 32                               # the window plus the partial block
    assert layer.keys.shape[-2] == n_fp
    assert torch.equal(full_k[..., -n_fp:, :], k[..., -n_fp:, :]) and torch.equal(full_v[..., -n_fp:, :], v[..., -n_fp:, :])
    assert not torch.equal(full_k[..., :-n_fp, :], k[..., :-n_fp, :])     # older tokens went to 2 bits


# --- layouts ----------------------------------------------------------------------------------------

def test_layout_yaml_round_trip_and_bits(tmp_path):
    lay = Layout([(8, 4), (4, 4), (2, 2), (16, 16)], name="mix")
    assert lay.average_bits == pytest.approx((12 + 8 + 4 + 32) / 8)
    back = load(lay.save(tmp_path / "mix.yaml"), n_layers=4)
    assert back.pairs == lay.pairs and back.mode == "per-token"
    # true bits add a float16 scale and an int16 zero per group of 32
    assert Layout.uniform("KV4", 4).true_bits(64) == pytest.approx(4 + 32 / 32)
    assert "layers 0: K8V4" in lay.describe()


@pytest.mark.parametrize("text, message", [
    ("layers: 2\npairs:\n  0: {nbits_key: 4, nbits_value: 4}\n  1: {nbits_key: 3, nbits_value: 4}\n", "must be one of"),
    ("layers: 2\npairs:\n  0: {nbits_key: 2, nbits_value: 8}\n  1: {nbits_key: 4, nbits_value: 4}\n", "K2V8 is not one of"),
    ("layers: 2\npairs:\n  0: {nbits_key: 4, nbits_value: 4}\n", "layer 1 has no pair"),
    ("layers: 2\nmode: fancy\npairs:\n  0: {nbits_key: 4, nbits_value: 4}\n", "mode"),
    ("layers: [2\n", "YAML"),
    ("layers: 1\npairs:\n  0: 8\n", "must map to"),
    ("layers: 1\npairs:\n  0: {nbits_key: 4, nbits_value: 4}\n  7: {nbits_key: 9, nbits_value: 4}\n", "outside"),
    ("layers: 1\nwindow: true\npairs:\n  0: {nbits_key: 4, nbits_value: 4}\n", "window"),
])
def test_bad_layout_files_are_refused_with_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(YamlError, match=message):
        load(path)


def test_layout_for_another_model_is_refused(tmp_path):
    path = Layout.uniform("KV4", 3).save(tmp_path / "three.yaml")
    with pytest.raises(YamlError, match="for 3 layers, the model has 30"):
        load(path, n_layers=30)


def test_the_kv_type_table_is_ggml_s():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from edgerun.kv.types import KV_TYPES

    for name, t in KV_TYPES.items():
        ggml = GGMLQuantizationType[name.upper()]
        assert t.ggml_id == int(ggml) and (t.block, t.block_bytes) == GGML_QUANT_SIZES[ggml]
    assert KV_TYPES["q8_0"].bits == 8.5 and KV_TYPES["q4_1"].bits == 5 and KV_TYPES["f16"].bits == 16
    assert KV_TYPES["q4_0"].quantized and not KV_TYPES["bf16"].quantized


def test_llama_cpp_maps_a_layout_to_the_nearest_uniform_type_not_less_precise():
    tk, tv, note = llama_cpp_types(Layout([(8, 4), (4, 2), (2, 2)], name="mix"))
    assert (tk, tv) == ("q8_0", "q4_1") and "flash attention" in note
    assert llama_cpp_types(Layout.uniform("KV2", 2))[:2] == ("q4_0", "q4_0")
    assert llama_cpp_types(Layout.uniform("KV16", 2))[:2] == ("f16", "f16")


# --- the planner ------------------------------------------------------------------------------------

def _front(n_layers=30):
    out = []
    for name, kl in (("K8V4", 1e-3), ("KV4", 5e-3), ("K4V2", 3e-2), ("KV2", 1e-1)):
        lay = Layout.uniform(name, n_layers)
        lay.meta = {"kl": kl}
        out.append(lay)
    return out


def test_planner_chooses_lower_bits_when_the_budget_shrinks():
    from edgerun.planner import KVPlanner

    weights = 540 * 2**20                               # SmolLM2-135M at float32
    per16 = Layout.uniform("KV16", 30).cache_bytes(4096, 3, 64, fp_bits=32)
    chosen = []
    for room in (2 * per16, per16 // 3, per16 // 6, per16 // 9):
        planner = KVPlanner(_front(), 30, 3, 64, budget_bytes=weights + room, weights_bytes=weights)
        plan = planner.choose(4096)
        assert plan.kv_bytes <= room
        chosen.append(plan.layout.name)
    assert chosen == ["KV16", "K8V4", "KV4", "KV2"] or chosen[:3] == ["KV16", "K8V4", "KV4"]
    bits = [Layout.uniform(c, 30).average_bits for c in chosen]
    assert bits == sorted(bits, reverse=True) and bits[-1] < bits[0]
    # a fixed budget binds as the context grows
    planner = KVPlanner(_front(), 30, 3, 64, budget_bytes=weights + per16 // 3, weights_bytes=weights)
    short, long = planner.choose(512), planner.choose(4096)
    assert short.layout.name == "KV16" and long.layout.average_bits < 16
    assert "fits" in long.reason and "KV16 would need" in long.reason


def test_planner_budget_below_the_cheapest_layout_names_it():
    from edgerun.planner import KVPlanner

    planner = KVPlanner(_front(), 30, 3, 64, budget_bytes=10 * 2**20, weights_bytes=9 * 2**20)
    with pytest.raises(UsageError, match="cheapest layout KV2"):
        planner.choose(8192)


# --- the search (tiny model) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_source):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kv") / "tiny", "llama", smollm2_source.path)


def test_search_writes_a_pareto_front_and_resumes(tiny, tmp_path):
    from edgerun import data
    from edgerun.kv import tune as kvt

    out = tmp_path / "layouts"
    logs = []
    kw = dict(budget=4.0, population=4, groups=2, context=256, contexts=1, calib_windows=1, calib_len=128,
              search="nsga2", progress=False, log=logs.append)
    first = kvt.tune(tiny, out, trials=4, **kw)               # "interrupted" after 4 trials
    second = kvt.tune(tiny, out, trials=9, **kw)              # resumed to 9
    assert any("resuming: 4 of 9" in m for m in logs) and any("sensitivity: reusing" in m for m in logs)
    record = json.loads((out / "trials.json").read_text())
    assert len(record["trials"]) >= len(first.trials)
    assert set(record["uniform"]) == {"KV16", "KV8", "K8V4", "KV4", "K4V2", "KV2"}
    assert (out / "front.png").stat().st_size > 1000
    front = second.front
    assert front and all(lay.average_bits <= 4.0 for lay in front)
    for a in front:                                           # nothing on the front is dominated
        assert not any(b.average_bits <= a.average_bits and b.meta["kl"] < a.meta["kl"] for b in front if b is not a)
    for path in out.glob("pareto-*.yaml"):
        assert load(path, n_layers=2).meta["kl"] >= 0
    # the front's KL is really the layout's: re-evaluate one point
    from edgerun.backends.torch import TorchBackend

    engine = TorchBackend(tiny)
    ev = kvt.Evaluator(engine.model, [torch.tensor([w]) for w in data.token_windows(engine.tokenizer, "wiki",
                                                                                     "heldout", 256, 1)])
    assert ev(front[0])["kl"] == pytest.approx(front[0].meta["kl"], rel=1e-4)
    with pytest.raises(UsageError, match="below the cheapest layout"):
        kvt.tune(tiny, tmp_path / "x", budget=1.5, progress=False, log=logs.append)


def test_dp_search_verifies_its_front_and_resumes(tiny, tmp_path):
    from edgerun.kv import tune as kvt

    out = tmp_path / "dp"
    logs = []
    kw = dict(budget=6.0, context=256, contexts=1, calib_windows=1, calib_len=128, progress=False, log=logs.append)
    first = kvt.tune(tiny, out, points=3, **kw)
    memo = json.loads((out / "dp.json").read_text())
    second = kvt.tune(tiny, out, points=3, **kw)               # everything reused: nothing evaluated again
    assert any("sensitivity: reusing" in m for m in logs) and any("resuming: 3 done" in m for m in logs)
    assert json.loads((out / "dp.json").read_text()) == memo and len(memo) <= 3
    record = json.loads((out / "trials.json").read_text())
    assert np.array(record["sensitivity_kl"]).shape == (2, len(kvt.QUANT_PAIRS))
    verified = [r for r in record["trials"] if "predicted_kl" in r]
    assert len(verified) == 3 and all(r["avg_bits"] <= 6.0 for r in verified)
    for r in verified:                                   # each layer its own pair (no groups)
        assert r["kl"] == memo[",".join(r["choice"])]["kl"]
    assert [lay.meta["kl"] for lay in second.front] == [lay.meta["kl"] for lay in first.front]
    for a in second.front:
        assert not any(b.average_bits <= a.average_bits and b.meta["kl"] < a.meta["kl"] for b in second.front
                       if b is not a)


def test_dp_front_equals_exhaustive_search_on_four_layers():
    import itertools

    from edgerun.kv.cache import PAIRS
    from edgerun.kv.tune import QUANT_PAIRS, dp_front

    rng = np.random.default_rng(0)
    kl = rng.random((4, len(QUANT_PAIRS))) * np.array([2.0 ** -b for b in (8, 6, 6, 4, 3, 3, 2)])[None] * 100
    names = ["KV16"] + list(QUANT_PAIRS)
    best: dict[int, float] = {}
    for combo in itertools.product(range(len(names)), repeat=4):
        bits = sum(sum(PAIRS[names[c]]) for c in combo)
        value = sum(0.0 if c == 0 else kl[i, c - 1] for i, c in enumerate(combo))
        best[bits] = min(best.get(bits, np.inf), value)
    front, last = [], np.inf                              # the exhaustive Pareto front over total bits
    for bits in sorted(best):
        if best[bits] < last - 1e-15:
            front.append((bits, best[bits]))
            last = best[bits]
    dp = dp_front(kl)
    assert [(sum(sum(PAIRS[p]) for p in choice), pytest.approx(value)) for choice, value in dp] == front
    for choice, value in dp:                              # the choice really costs what is predicted
        assert value == pytest.approx(sum(0.0 if p == "KV16" else kl[i, QUANT_PAIRS.index(p)]
                                          for i, p in enumerate(choice)))


def test_kl_sensitivity_equals_a_brute_force_forward(tiny):
    """One layer quantized, the others KV16: the KL of the model's next-token distributions, computed here
    by hand from two forwards."""
    from edgerun.backends.torch import TorchBackend
    from edgerun.calibration import calibration_windows
    from edgerun.kv import tune as kvt
    from edgerun.kv.cache import PAIRS, QuantizedKVCache
    from edgerun.kv.layout import Layout

    engine = TorchBackend(tiny)
    windows = calibration_windows(engine.tokenizer, 1, 128)
    sens = kvt.kl_sensitivity(engine.model, windows)
    n = engine.model.config.num_hidden_layers
    kw = kvt._cache_kwarg(engine.model)
    for i, pair in ((0, "KV2"), (n - 1, "KV4")):
        pairs = [PAIRS["KV16"]] * n
        pairs[i] = PAIRS[pair]
        with torch.inference_mode():
            ref = torch.log_softmax(engine.model(input_ids=windows[0]).logits[0].float(), -1)
            cache = QuantizedKVCache(Layout(pairs).specs())
            got = torch.log_softmax(engine.model(input_ids=windows[0], use_cache=True, **{kw: cache}).logits[0].float(), -1)
        brute = float((ref.exp() * (ref - got)).sum(-1).mean())
        assert sens[i, kvt.QUANT_PAIRS.index(pair)] == pytest.approx(max(0.0, brute), rel=1e-5, abs=1e-9)
    for layer in sens:                                    # fewer bits, more KL (2-layer tiny model)
        assert layer[kvt.QUANT_PAIRS.index("KV8")] < layer[kvt.QUANT_PAIRS.index("KV2")]


def test_non_dominated_keeps_what_no_other_point_beats_on_every_objective():
    from edgerun.kv.tune import non_dominated

    points = [(2, 0.5), (3, 0.5), (3, 0.2), (4, 0.2), (4, 0.1), (4, 0.1), (8, 0.0)]
    assert non_dominated(points, lambda p: p) == [(2, 0.5), (3, 0.2), (4, 0.1), (4, 0.1), (8, 0.0)]


def test_sensitivity_grows_as_bits_shrink(tiny):
    from edgerun.backends.torch import TorchBackend
    from edgerun.calibration import calibration_windows
    from edgerun.kv import tune as kvt

    engine = TorchBackend(tiny)
    windows = calibration_windows(engine.tokenizer, 1, 128)
    err = kvt.sensitivity(engine.model, windows)
    names = kvt.QUANT_PAIRS
    for layer in err:
        assert layer[names.index("KV8")] < layer[names.index("KV4")] < layer[names.index("KV2")]
    assert "KV16" in kvt.pareto_pairs(err[0]) and "KV2" in kvt.pareto_pairs(err[0])


def test_the_carved_moe_runs_through_the_packed_cache(tiny, tmp_path):
    """A carved MoE keeps Llama attention: KV16 through the cache is exact, KV4 stores what its bits say."""
    from converters.carve import carve_checkpoint
    from edgerun.backends.torch import TorchBackend

    carved = carve_checkpoint(tiny, tmp_path / "carved", "S1A1E4", tokens=512, seq_len=256)
    engine = TorchBackend(carved, n_ctx=256)
    prompt = engine.tokenize("The history of the city begins with a small fishing village on the river")
    ref = "".join(engine.stream(prompt, GREEDY))
    ref_logits = engine.logits(prompt)
    engine.set_kv_layout(Layout.uniform("KV16", 2))
    assert "".join(engine.stream(prompt, GREEDY)) == ref
    assert np.array_equal(engine.logits(prompt), ref_logits)
    kv4 = Layout.uniform("KV4", 2)
    engine.set_kv_layout(kv4)
    out = "".join(engine.stream(prompt, GREEDY))
    assert out and engine.last_stats.kv_layout == "KV4"
    n_kv, head_dim = engine.model.config.num_key_value_heads, engine.model.config.head_dim
    tokens = engine._cache.get_seq_length()
    assert engine.last_stats.kv_cache_bytes == engine._cache.nbytes() == kv4.cache_bytes(tokens, n_kv, head_dim, fp_bits=32)


# --- the real model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_torch(smollm2_source):
    from edgerun.backends.torch import TorchBackend

    return TorchBackend(smollm2_source.path, n_ctx=1024)


def test_kv16_layout_through_the_cache_reproduces_unquantized_generation(smollm2_torch):
    b = smollm2_torch
    prompt = b.encode_prompt("<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n")
    b.set_kv_layout(None)
    ref = "".join(b.stream(prompt, GREEDY))
    ref_logits = b.logits(prompt)
    b.set_kv_layout(Layout.uniform("KV16", 30))
    try:
        assert "".join(b.stream(prompt, GREEDY)) == ref
        assert np.array_equal(b.logits(prompt), ref_logits)
        assert b.memory().kv_cache_bytes == b._cache.nbytes() > 0
    finally:
        b.set_kv_layout(None)


def test_teacher_forced_simulation_matches_the_packed_cache_in_per_token_mode(smollm2_torch):
    """The search scores a layout in one teacher-forced pass; chat fills the same cache token by token.

    Per-token quantization does not depend on how the sequence is chunked, so where the inputs are
    bit-identical (layer 0) the codes are identical. Deeper layers see float-rounding differences between
    a batched and a one-token forward pass, which can flip a code at a rounding boundary: that noise must
    stay well below the quantization effect itself.
    """
    from edgerun.kv.cache import QuantizedKVCache
    from edgerun.kv.quant import dequantize

    b = smollm2_torch
    lay = Layout([(8, 4)] * 10 + [(4, 4)] * 10 + [(4, 2)] * 10, name="mixed")
    tokens = b.tokenize("The Eiffel Tower is a wrought-iron lattice tower in Paris, named after the engineer "
                        "Gustave Eiffel, whose company designed and built it between 1887 and 1889.")
    teacher_cache = QuantizedKVCache(lay.specs())
    teacher = b._forward(tokens, teacher_cache, 0)[0].numpy()
    cache = QuantizedKVCache(lay.specs())
    steps = [b._forward(tokens[:8], cache, 0)[0].numpy()]    # prefill 8, then decode one by one
    for i in range(8, len(tokens)):
        steps.append(b._forward([tokens[i]], cache, i)[0].numpy())
    packed = np.concatenate(steps)
    unquantized = b.logits(tokens)
    for side in ("k_old", "v_old"):
        first, second = getattr(teacher_cache.layers[0], side), getattr(cache.layers[0], side)
        assert torch.equal(first.codes, second.codes)
        assert torch.equal(dequantize(first), dequantize(second))
    noise, effect = np.abs(teacher - packed).mean(), np.abs(teacher - unquantized).mean()
    assert effect > 0.1                                                     # quantization is real
    assert noise < 0.5 * effect, (noise, effect)
    assert (teacher.argmax(1) == packed.argmax(1)).mean() >= 0.85
    assert cache.nbytes() == teacher_cache.nbytes() == lay.cache_bytes(len(tokens), 3, 64, fp_bits=32)


def test_chat_plans_the_kv_layout_per_message_and_reprefills_on_a_change(smollm2_source, smollm2_torch, tmp_path):
    import edgerun

    out = tmp_path / "front"
    for lay in _front():
        lay.save(out / f"{lay.name}.yaml")
    weights = smollm2_torch.memory().model_bytes
    # room for KV16 over ~200 tokens, not over 700: a long second message makes the planner step down
    room = Layout.uniform("KV16", 30).cache_bytes(400, 3, 64, fp_bits=32)
    device = tmp_path / "small.yaml"
    device.write_text(f"name: small\ncpu_model: test\ncores: 2\nthreads: 2\nram_gib: 1\n"
                      f"memory_budget_gib: {(weights + room) / 2**30:.6f}\n")
    notices = []
    session = edgerun.load(str(smollm2_source.path), backend="torch", kv_layout=str(out), device=str(device),
                           max_tokens=16, temperature=0.0, notify=notices.append, n_ctx=1024)
    try:
        first = "".join(session.chat("Hi!"))
        turn = session.last_turn
        assert first and turn.plan.kv.layout.name == "KV16" and turn.history == "new"
        long = "Summarize this. " + "The river flows past the old mill and the bridge. " * 50
        "".join(session.chat(long))
        turn = session.last_turn
        k = turn.plan.kv
        assert k.layout.name != "KV16" and k.layout.average_bits < 16 and turn.plan.kv_changed
        assert turn.history.startswith("re-prefilled") and any("re-prefilled" in n for n in notices)
        assert any("KV layout" in r for r in turn.plan.reasons)
        assert session.stats.prefill_tokens == session.stats.prompt_tokens        # the history was prefilled again
        assert 0 < session.backend.memory().kv_cache_bytes <= k.available_bytes
        assert session.stats.kv_cache_bytes == session.backend.memory().kv_cache_bytes
        assert session.stats.kv_layout == k.layout.name
        assert turn.stats is session.stats and len(session.turns) == 2
    finally:
        session.backend.close()


def test_llama_cpp_runs_a_layout_as_its_uniform_type(default_model_path, tmp_path):
    import edgerun

    path = Layout([(8, 4)] * 30, name="k8v4").save(tmp_path / "k8v4.yaml")
    notices = []
    session = edgerun.load(None, kv_layout=str(path), max_tokens=8, temperature=0.0, notify=notices.append,
                           n_ctx=512)
    try:
        assert "".join(session.chat("Say hi."))
        assert session.backend.cache_type_k == "q8_0" and session.backend.cache_type_v == "q4_1"
        assert any("type_k=q8_0, type_v=q4_1" in n for n in notices)
    finally:
        session.backend.close()
    with pytest.raises(UsageError, match="one layout file"):
        edgerun.load(None, kv_layout=str(tmp_path), max_tokens=8)


def test_kv_show_gives_bytes_per_token_only_for_a_named_model(tmp_path, capsys):
    from edgerun.cli import main

    two = Layout([(8, 4), (4, 4)], name="two").save(tmp_path / "two.yaml")
    assert main(["kv", "show", str(two)]) == 0
    out = capsys.readouterr().out
    assert "average bits 5.000" in out and "true bits 6.000" in out and "bytes/token" not in out
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "hidden_size": 64}))
    assert main(["kv", "show", str(two), "--model", str(ckpt)]) == 0
    out = capsys.readouterr().out
    # head_dim 16: one group of 16 values per head (2 bits of scale and zero per value); 2 x 2 layers x 2 heads x 16
    assert "true bits 7.000" in out and "112 bytes/token" in out and "2 KV heads x 16" in out
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")                # 1 layer, 2 heads, embedding 32
    one = Layout([(8, 8)], name="one").save(tmp_path / "one.yaml")
    assert main(["kv", "show", str(one), "--model", str(gguf)]) == 0
    assert "80 bytes/token" in capsys.readouterr().out     # (8 + 2) bits x 2 x 2 heads x 16 / 8
    assert main(["kv", "show", str(two), "--model", str(gguf)]) != 0
    assert "for 2 layers, the model has 1" in capsys.readouterr().err


@pytest.mark.slow  # two CLI runs that each import torch and transformers: ~4-6 s on 2 shared cores
def test_cli_kv_show_and_tune_errors(tmp_path):
    path = Layout([(8, 4), (4, 4)], name="two").save(tmp_path / "two.yaml")
    r = subprocess.run(edgerun_cmd("kv", "show", str(path)), capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 0 and "average bits 5.000" in r.stdout and "layers 0: K8V4" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: 1\npairs:\n  0: {nbits_key: 5, nbits_value: 4}\n")
    r = subprocess.run(edgerun_cmd("kv", "show", str(bad)), capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode != 0 and "nbits_key" in r.stderr and "Traceback" not in r.stderr
