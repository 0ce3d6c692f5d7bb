"""The packed KV cache's working copy (incremental dequantization) and cropping to a prefix."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_checkpoint
from edgerun.kv import quant
from edgerun.kv.cache import WORKING_COPIES, KVSpec, QuantizedKVCache, QuantizedKVLayer
from edgerun.kv.layout import Layout

SPECS = [KVSpec(4, 4), KVSpec(8, 4), KVSpec(2, 2), KVSpec(16, 16),
         KVSpec(4, 4, "kivi"), KVSpec(2, 8, "kivi"), KVSpec(4, 2, "kivi", group_size=16, window=16)]
CHUNKS = (70, 1, 1, 33, 1, 64, 5, 1, 1)


def _states(t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 3, t, 64, generator=gen) * 2 + 0.5, torch.randn(1, 3, t, 64, generator=gen)


def _full_dequantization(layer: QuantizedKVLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token dequantized from the packed history at once: what the cache returned before the working copy."""
    out = []
    for old, fp in ((layer.k_old, layer.keys), (layer.v_old, layer.values)):
        out.append(fp if old is None else torch.cat([quant.dequantize(old).to(fp.dtype), fp], dim=-2))
    return out[0], out[1]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"K{s.k_bits}V{s.v_bits}-{s.mode}-g{s.group_size}")
def test_incremental_dequantization_equals_full_dequantization(spec):
    """Each token dequantized once into the working copy gives bit-identical K/V and attention output."""
    gen = torch.Generator().manual_seed(0)
    layers = {copy: QuantizedKVLayer(spec, copy) for copy in ("model", "none")}
    for t in CHUNKS:
        k, v = _states(t, gen)
        q = torch.randn(1, 9, t, 64, generator=gen)                  # 9 query heads over 3 KV heads (GQA)
        outs = {}
        for copy, layer in layers.items():
            keys, values = layer.update(k, v)
            full_k, full_v = _full_dequantization(layer)
            assert torch.equal(keys, full_k) and torch.equal(values, full_v)
            outs[copy] = torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
        assert torch.equal(outs["model"], outs["none"])
    a, b = layers["model"], layers["none"]
    assert a.nbytes() == b.nbytes() and b.working_nbytes() == 0 < a.working_nbytes()


def test_a_half_precision_working_copy_rounds_only_the_dequantized_values():
    gen = torch.Generator().manual_seed(1)
    for spec in (KVSpec(4, 4), KVSpec(4, 4, "kivi")):
        exact, half = QuantizedKVLayer(spec, "model"), QuantizedKVLayer(spec, "float16")
        for t in CHUNKS:
            k, v = _states(t, gen)
            ke, ve = exact.update(k, v)
            kh, vh = half.update(k, v)
            assert kh.dtype == torch.float32 and kh.shape == ke.shape
            assert torch.allclose(kh, ke, rtol=2 ** -10, atol=1e-6) and torch.allclose(vh, ve, rtol=2 ** -10, atol=1e-6)
            n_fp = exact.keys.shape[-2]                             # the full-precision tokens stay exact
            if n_fp:
                assert torch.equal(kh[..., -n_fp:, :], ke[..., -n_fp:, :])
        assert half.nbytes() == exact.nbytes()
        n_old = exact.k_old.shape[-2]
        assert half.working_nbytes() >= 2 * 2 * 3 * 64 * n_old     # 2 bytes per dequantized value, K and V


def test_working_copy_choices_are_checked():
    assert WORKING_COPIES == ("model", "float16", "bfloat16", "none")
    with pytest.raises(ValueError, match="working copy"):
        QuantizedKVLayer(KVSpec(4, 4), "int8")


@pytest.mark.parametrize("copy", WORKING_COPIES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"K{s.k_bits}V{s.v_bits}-{s.mode}-g{s.group_size}")
def test_crop_keeps_a_prefix_with_transformers_semantics(spec, copy):
    """crop(-k) leaves k fewer tokens; the kept tokens read as before; a positive count is refused."""
    gen = torch.Generator().manual_seed(2)
    layer = QuantizedKVLayer(spec, copy)
    for t in CHUNKS:
        before = [x.clone() for x in layer.update(*_states(t, gen))]
    total = layer.get_seq_length()
    for cut in (1, 30, 45):
        layer.crop(-cut)
        total -= cut
        assert layer.get_seq_length() == total
        k, v = layer.update(*_states(1, gen))
        # what attention saw of the kept tokens before the crop it still sees (KIVI: returned to the window as read)
        assert torch.equal(k[..., :total, :], before[0][..., :total, :])
        assert torch.equal(v[..., :total, :], before[1][..., :total, :])
        total += 1
        before = [k.clone(), v.clone()]
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)
    layer.crop(-total)
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0


def test_exact_prefix_in_kivi_mode_backs_off_to_a_fresh_prefill_s_block_boundary():
    layer = QuantizedKVLayer(KVSpec(4, 4, "kivi", group_size=16, window=16))
    gen = torch.Generator().manual_seed(3)
    layer.update(*_states(60, gen))                        # packed 0:32, window 32:60
    assert layer.k_old.shape[-2] == 32 and layer.exact_prefix(59) == 59 and layer.exact_prefix(48) == 48
    assert layer.exact_prefix(47) == 16                    # 32:47 would be a fresh prefill's window: back off
    for _ in range(10):
        layer.update(*_states(1, gen))                     # 70 tokens: packed 0:48
    assert layer.exact_prefix(65) == 65 and layer.exact_prefix(63) == 32 and layer.exact_prefix(20) == 0
    per_token = QuantizedKVLayer(KVSpec(2, 2))
    per_token.update(*_states(60, gen))
    assert per_token.exact_prefix(7) == 7


# --- a tiny generated model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    """make_tiny_checkpoint's Llama (hidden 64, 2 layers, 2 KV heads of 16), built in memory: no tokenizer needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         tie_word_embeddings=True, rope_theta=10000.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _run(model, cache, ids: list[int], past: int) -> torch.Tensor:
    import inspect

    kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(past, past + len(ids))[None],
                    use_cache=True, **{kwarg: cache})
    return out.logits[0]


def _continue(model, cache, ids: list[int], past: int) -> torch.Tensor:
    """Feed ``ids`` one token at a time (decode steps): logits of each."""
    return torch.cat([_run(model, cache, [t], past + i) for i, t in enumerate(ids)])


def _packed(cache):
    return [(p.codes, p.scale, p.zero) for layer in cache.layers for p in (layer.k_old, layer.v_old) if p is not None]


@pytest.mark.parametrize("copy", ["model", "none"])
def test_crop_then_continue_equals_a_fresh_prefill_of_the_prefix_per_token(tiny_model, copy):
    torch.manual_seed(4)
    prefix, extra, cont = torch.randint(0, 512, (40,)).tolist(), torch.randint(0, 512, (7,)).tolist(), \
        torch.randint(0, 512, (8,)).tolist()
    layout = Layout.uniform("KV4", 2, group_size=16)
    fresh = QuantizedKVCache(layout.specs(), copy)
    _run(tiny_model, fresh, prefix, 0)
    ref = _continue(tiny_model, fresh, cont, len(prefix))

    cache = QuantizedKVCache(layout.specs(), copy)
    _run(tiny_model, cache, prefix, 0)
    _continue(tiny_model, cache, extra, len(prefix))          # e.g. the previous reply
    assert cache.exact_prefix(len(prefix)) == len(prefix)
    cache.crop(-len(extra))
    assert cache.get_seq_length() == len(prefix)
    out = _continue(tiny_model, cache, cont, len(prefix))
    assert torch.equal(out, ref)                               # exact
    assert all(torch.equal(a, b) for x, y in zip(_packed(cache), _packed(fresh)) for a, b in zip(x, y))
    assert cache.nbytes() == fresh.nbytes()


@pytest.mark.parametrize("copy", ["model", "none"])
def test_crop_then_continue_in_kivi_mode(tiny_model, copy):
    """KIVI (window 16, blocks of 16): a cut that leaves a full window continues bit-identically to a fresh
    prefill of the prefix; a deeper cut backs off to the fresh prefill's block boundary, keeps those blocks
    bit-identical, and the recomputed tail matches the fresh prefill up to float rounding of a chunked forward."""
    torch.manual_seed(5)
    prefix, cont = torch.randint(0, 512, (60,)).tolist(), torch.randint(0, 512, (8,)).tolist()
    layout = Layout.uniform("KV4", 2, mode="kivi", group_size=16, window=16)
    fresh = QuantizedKVCache(layout.specs(), copy)
    _run(tiny_model, fresh, prefix, 0)                         # packed 0:32, window 32:60
    fresh_packed = [tuple(t.clone() for t in x) for x in _packed(fresh)]
    ref = _continue(tiny_model, fresh, cont, len(prefix))

    for n_extra, expect in ((3, 60), (10, 32)):               # 63 tokens: same blocks; 70: a block 32:48 left the window
        extra = torch.randint(0, 512, (n_extra,)).tolist()
        cache = QuantizedKVCache(layout.specs(), copy)
        _run(tiny_model, cache, prefix, 0)
        _continue(tiny_model, cache, extra, len(prefix))
        keep = cache.exact_prefix(len(prefix))
        assert keep == expect
        cache.crop(keep - cache.get_seq_length())
        if keep < len(prefix):
            _run(tiny_model, cache, prefix[keep:], keep)       # the caller prefills the rest again
        assert all(torch.equal(a, b) for x, y in zip(_packed(cache), fresh_packed) for a, b in zip(x, y))
        assert cache.nbytes() == layout.cache_bytes(len(prefix), 2, 16, fp_bits=32)
        out = _continue(tiny_model, cache, cont, len(prefix))
        if keep == len(prefix):
            assert torch.equal(out, ref)
        else:
            assert torch.allclose(out, ref, atol=1e-4, rtol=0) and torch.equal(out.argmax(-1), ref.argmax(-1))


# --- the torch backend --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, smollm2_source):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kvcache") / "tiny", "llama", smollm2_source.path)


@pytest.mark.parametrize("mode", ["per-token", "kivi"])
def test_chat_reuses_the_prefix_of_a_packed_cache(tiny_checkpoint, tmp_path, mode):
    import edgerun

    layout = Layout.uniform("KV4", 2, mode=mode)
    path = layout.save(tmp_path / f"kv4-{mode}.yaml")
    s = edgerun.load(str(tiny_checkpoint), backend="torch", kv_layout=str(path), n_ctx=512, max_tokens=40,
                     temperature=0.0, seed=0, progress=False, kv_working_copy="model")
    try:
        "".join(s.chat("The history of the city begins with a small fishing village on the river, where traders "
               "from the north met the boats that came up from the sea every spring, and stayed."))  # streamed: the decode loop
        first = s.backend.last_stats
        assert first.prefill_tokens == first.prompt_tokens
        "".join(s.chat("And then?"))
        second = s.backend.last_stats
        reused = second.prompt_tokens - second.prefill_tokens
        assert second.kv_layout == "KV4" and 0 < second.prefill_tokens < second.prompt_tokens
        if mode == "per-token":
            assert reused >= first.prompt_tokens                 # the whole first turn's prompt at least
        else:
            assert reused >= 32                                   # at least one packed block kept
        b = s.backend
        cached = len(b._cached_tokens)
        assert second.kv_cache_bytes == b._cache.nbytes() == layout.cache_bytes(cached, 2, 16, fp_bits=32)
        assert second.kv_working_bytes == b._cache.working_nbytes() > 0
        assert b.memory().kv_working_bytes == second.kv_working_bytes
    finally:
        s.backend.close()
    default = edgerun.load(str(tiny_checkpoint), backend="torch", kv_layout=str(path), n_ctx=512, max_tokens=4,
                           temperature=0.0, progress=False)
    try:                                # chat's default holds the packed bytes only: what the planner budgets
        default.chat("Hello there.", stream=False)
        assert default.backend.kv_working_copy == "none" and default.backend.memory().kv_working_bytes == 0
    finally:
        default.backend.close()
