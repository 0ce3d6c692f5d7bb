"""PreMoe: TCESS, patterns, PEP pruning, TAER retrieval; carved models and standard MoE architectures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgerun.errors import ModelFileError, UsageError
from edgerun.moe import tcess

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find some food."


def test_tcess_on_a_hand_checkable_router():
    # 2 tokens, 3 experts, top-1: token 0 picks expert 2 (logit 2.0), token 1 picks expert 0 (logit -1.0)
    logits = torch.tensor([[0.0, 1.0, 2.0], [-1.0, -3.0, -2.0]])
    c = tcess.TcessCollector(n_layers=1, n_experts=3, top_k=1)
    c.add(0, logits)
    stats = c.layer_stats()[0]
    p = torch.softmax(logits.double(), dim=-1)
    assert c.tokens == 2
    assert tcess.scores(stats, 2, "frequency").tolist() == [0.5, 0.0, 0.5]
    assert tcess.scores(stats, 2, "raw-logit").tolist() == [-0.5, 0.0, 1.0]
    assert tcess.scores(stats, 2, "probability").tolist() == pytest.approx([float(p[1, 0]) / 2, 0.0, float(p[0, 2]) / 2])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert tcess.scores(stats, 2, "softplus").tolist() == pytest.approx([sp(-1.0) / 2, 0.0, sp(2.0) / 2])
    # the released raw-logit score ranks the often-chosen expert 0 (negative logit) below never-chosen expert 1
    assert tcess.scores(stats, 2, "raw-logit").argsort().tolist()[0] == 0


def _pattern(task="t", experts=4, layers=2):
    c = tcess.TcessCollector(layers, experts, 2)
    torch.manual_seed(0)
    for layer in range(layers):
        c.add(layer, torch.randn(64, experts))
    return tcess.Pattern(task=task, tokens=c.tokens, model={"name": "m", "layers": layers, "experts": experts, "top_k": 2},
                         score="frequency", key_layer=0, stats=c.layer_stats())


def test_pattern_round_trip(tmp_path):
    p = _pattern()
    path = tcess.save(p, tmp_path)
    q = tcess.load(path)
    assert q.stats == p.stats and q.keep(2) == p.keep(2) and torch.equal(q.key(), p.key())
    data = json.loads(path.read_text())
    assert data["rankings"][1] == p.ranking(1) and len(data["key_vector"]) == 4


def test_corrupted_pattern_is_refused(tmp_path):
    path = tcess.save(_pattern(), tmp_path)
    path.write_text(path.read_text()[:200])
    with pytest.raises(ModelFileError, match="not a valid expert pattern"):
        tcess.load(path)


def test_key_depth_cuts_only_the_all_layer_keys():
    """A layer key deeper than key_depth is still that layer's scores; mass/frequency keys use the first layers."""
    p = _pattern(layers=4)
    stats = p.stats
    layer3 = tcess.key_vector(stats, p.tokens, "layer", key_layer=3, score="frequency", depth=2)
    assert torch.equal(layer3, p.layer_scores(3, "frequency"))
    assert tcess.key_vector(stats, p.tokens, "frequency", depth=2).shape == (2 * 4,)


def test_pattern_from_another_model_is_refused():
    with pytest.raises(UsageError, match="made for a model with experts = 4, this model has 6"):
        tcess.check_model(_pattern(), {"layers": 2, "experts": 6, "top_k": 2})


# --- carved tiny model: pruning and assembly --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, smollm2_source):
    from converters.carve import carve_checkpoint
    from converters.moe_export import to_granite

    from conftest import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("premoe")
    dense = make_tiny_checkpoint(root / "llama", "llama", smollm2_source.path, intermediate_size=256)
    carved = carve_checkpoint(dense, root / "carved", "S1A2E8", tokens=1024, seq_len=256)   # 7 routed, top-2
    host = to_granite(carved, root / "host", tokens=1024, heldout_tokens=512)
    return root, carved, host


@pytest.mark.parametrize("kind", ["carved", "host"])
def test_pruning_with_every_expert_kept_is_exact_and_permutation_safe(tiny_moe, kind):
    from converters.prune import prune_host
    from edgerun.moe.store import select_experts as prune_carved
    from edgerun.backends.torch import TorchBackend

    root, carved, host = tiny_moe
    src, prune = (carved, prune_carved) if kind == "carved" else (host, prune_host)
    full = TorchBackend(src, n_ctx=128)
    tokens = full.tokenize(TEXT)
    reference = full.logits(tokens)
    same = prune(src, root / f"{kind}-all", [list(range(7))] * 2, 2, {"task": "all"})
    shuffled = prune(src, root / f"{kind}-perm", [[6, 0, 5, 1, 4, 2, 3], [3, 2, 1, 0, 6, 5, 4]], 2, {"task": "perm"})
    assert abs(TorchBackend(same, n_ctx=128).logits(tokens) - reference).max() == 0.0
    assert abs(TorchBackend(shuffled, n_ctx=128).logits(tokens) - reference).max() < 1e-5


def test_assembled_gguf_matches_the_torch_pruned_model(tiny_moe):
    from converters import gguf as gguf_writer
    from converters.prune import prune_host
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.backends.torch import TorchBackend

    root, _, host = tiny_moe
    pruned = prune_host(host, root / "host-pruned", [[0, 3, 5, 6], [1, 2, 4, 6]], 2, {"task": "x"})
    ref = TorchBackend(pruned, n_ctx=128)
    tokens = ref.tokenize(TEXT)
    expected = ref.logits(tokens)
    engine = LlamaCppBackend(gguf_writer.write_f32(pruned, root / "pruned.gguf"), n_ctx=128,
                             cache_type_k="f32", cache_type_v="f32")
    try:
        got = engine.logits(tokens)
    finally:
        engine.close()
    assert abs(got - expected).max() < 1e-3 * (expected.max() - expected.min())


def test_patterns_of_the_carved_routing_are_refused_on_its_host(tiny_moe):
    """Keys made on CMoE's exact routing are not keys of the host's linear router (one task whatever the
    message): the pattern is refused, also an older one that names its model directory only."""
    from edgerun.moe import adapters
    from edgerun.moe import calibrate as cal

    _, carved, host = tiny_moe
    carved_fp = adapters.fingerprint(cal.load_model(carved)[0], str(carved))
    host_fp = adapters.fingerprint(cal.load_model(host)[0], str(host))
    assert (carved_fp["routing"], host_fp["routing"]) == ("carved", "standard")
    pattern = _pattern(experts=7)
    pattern.model = carved_fp
    tcess.check_model(pattern, carved_fp)
    with pytest.raises(UsageError, match="calibrate the patterns on the model that runs"):
        tcess.check_model(pattern, host_fp)
    pattern.model = {k: v for k, v in carved_fp.items() if k != "routing"}
    with pytest.raises(UsageError, match="exact CMoE routing"):
        tcess.check_model(pattern, host_fp)
    pattern.model = {k: v for k, v in host_fp.items() if k != "routing"}
    tcess.check_model(pattern, host_fp)


def test_bad_keep_values_are_refused(tiny_moe):
    from converters.prune import parse_spec, prune_host

    root, _, host = tiny_moe
    with pytest.raises(UsageError, match="b = 9 exceeds the 7 routed experts"):
        prune_host(host, root / "x", [list(range(9))] * 2, 2, {})
    for spec in ("math:0/4", "math:5/4", "math-4"):
        with pytest.raises(UsageError):
            parse_spec(spec)


def test_adaptive_experts_on_a_dense_model_is_refused(tiny_moe, tmp_path):
    import edgerun

    root, carved, _ = tiny_moe
    with pytest.raises(UsageError, match="not a carved mixture of experts"):
        edgerun.load(str(root / "llama"), adaptive_experts=True, keep="1/2", patterns=str(tmp_path))
    with pytest.raises(UsageError, match="pass assembler="):   # the runtime writes no GGUF itself
        edgerun.load(str(carved), adaptive_experts=True, keep="1/2", patterns=str(tmp_path))


def test_adaptive_experts_and_kv_layouts_are_one_plan(tiny_moe, tmp_path):
    """torch: per message the plan picks the task's experts, then the KV layout that fits the budget left
    after that model's weights; the plan explains both, and one record per turn holds it."""
    import edgerun
    from edgerun.kv.layout import Layout
    from edgerun.moe import calibrate as cal
    from edgerun.planner import model_file_bytes

    _, carved, _ = tiny_moe
    model, tok = cal.load_model(carved)
    pats = tmp_path / "patterns"
    for p in cal.calibrate(model, tok, [("wiki", "wiki"), ("code", "code")], tokens=1024, name="carved"):
        tcess.save(p, pats)
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    front = tmp_path / "front"
    for lay in (Layout.uniform("KV4", n_layers), Layout.uniform("KV8", n_layers)):
        lay.save(front / f"{lay.name}.yaml")
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv16_per_token = 2 * n_layers * cfg.num_key_value_heads * hd * 4
    # a budget where the assembled model's weights leave room for KV16 over a short message only
    code_model = model_file_bytes(carved)  # an upper bound on any pruned model's bytes
    retrieval = sum(p.numel() * p.element_size() for p in model.parameters())   # the resident key model
    device = tmp_path / "d.yaml"
    device.write_text(f"name: d\ncpu_model: t\ncores: 1\nthreads: 1\nram_gib: 1\n"
                      f"memory_budget_gib: {(code_model + retrieval + 200 * kv16_per_token) / 2**30:.9f}\n")
    s = edgerun.load(str(carved), backend="torch", adaptive_experts=True, keep="2/4", patterns=str(pats),
                     kv_layout=str(front), device=str(device), chat_template="chatml", temperature=0.0,
                     max_tokens=4, n_ctx=1024)
    try:
        s.chat(cal.task_text("code")[:300], stream=False)
        plan = s.last_turn.plan
        assert plan.engine == "torch" and plan.experts.task == "code" and plan.experts.b == 4
        assert plan.kv is not None and plan.kv.kv_bytes <= plan.budget_bytes - plan.weights_bytes - retrieval
        assert any(r.startswith("experts: task 'code'") for r in plan.reasons)
        assert any(r.startswith("KV layout") for r in plan.reasons)
        assert s.backend.kv_layout is plan.kv.layout or (plan.kv.layout.name == "KV16")
        d = s.last_turn.as_dict()
        assert d["plan"]["experts"]["task"] == "code" and d["stats"]["generated_tokens"] >= 1
    finally:
        s.backend.close()


def test_empty_calibration_data_is_refused(tiny_moe, tmp_path):
    from edgerun.moe import calibrate as cal

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    model, tok = cal.load_model(tiny_moe[1])
    with pytest.raises(UsageError, match="no calibration text"):
        cal.calibrate(model, tok, [("empty", str(empty))], tokens=256)


def test_a_recalibrated_pattern_invalidates_its_cached_assembled_model(tiny_moe, tmp_path):
    """torch engine: the assembled model is keyed by the pattern's content, so a pattern recalibrated under
    the same task name gets a new model with its own experts; an unchanged pattern reuses the cached one."""
    import json

    from edgerun.moe import calibrate as cal
    from edgerun.moe.taer import ExpertPlanner

    _, carved, _ = tiny_moe
    model, tok = cal.load_model(carved)
    pats = tmp_path / "patterns"
    for p in cal.calibrate(model, tok, [("wiki", "wiki"), ("code", "code")], tokens=512, name=str(carved)):
        tcess.save(p, pats)
    first = ExpertPlanner(carved, pats, 2, 4, engine="torch").model_for("code")
    stamp = (first / "config.json").stat().st_mtime_ns
    again = ExpertPlanner(carved, pats, 2, 4, engine="torch").model_for("code")
    assert again == first and (first / "config.json").stat().st_mtime_ns == stamp   # cache hit
    old = tcess.load(pats / "code.json")
    for layer in old.stats:   # a recalibration that ranks the experts the other way round
        layer.logit_sum = [-v for v in layer.logit_sum]
    tcess.save(old, pats)
    new_pattern = tcess.load(pats / "code.json")
    second = ExpertPlanner(carved, pats, 2, 4, engine="torch").model_for("code")
    assert second != first
    kept = json.loads((second / "config.json").read_text())["edgerun_moe"]["pruned"]["keep"]
    assert kept == new_pattern.keep(4) != json.loads((first / "config.json").read_text())["edgerun_moe"]["pruned"]["keep"]


def test_old_patterns_without_mass_statistics_still_load_and_retrieve_by_layer(tmp_path):
    p = _pattern()
    d = p.to_json()
    for layer in d["stats"]:
        del layer["mass_sum"]
    for k in ("key_kind", "hidden_sum", "version"):
        del d[k]
    (tmp_path / "t.json").write_text(json.dumps(d))
    q = tcess.load(tmp_path / "t.json")
    assert q.key_kind == "layer" and torch.equal(q.key(), tcess.scores(q.stats[0], q.tokens, q.score))
    with pytest.raises(UsageError, match="calibrate it again"):
        q.key(kind="mass")


def test_taer_session_rebuilds_the_model_for_a_new_task(tiny_moe, tmp_path):
    """Llama.cpp path: calibrate on the host, chat, the planner assembles per-pattern GGUFs."""
    import edgerun
    from converters.assemble import GGUFAssembler
    from edgerun.moe import calibrate as cal

    _, carved, host = tiny_moe
    model, tok = cal.load_model(host)
    for p in cal.calibrate(model, tok, [("wiki", "wiki"), ("code", "code")], tokens=1024, name="host"):
        tcess.save(p, tmp_path)
    s = edgerun.load(str(carved), adaptive_experts=True, keep="2/4", patterns=str(tmp_path), chat_template="chatml",
                     temperature=0.0, max_tokens=4, n_ctx=256, assembler=GGUFAssembler("Q8_0"))
    code_text = cal.task_text("code")[:600]   # a task's own text retrieves its own pattern
    s.chat(code_text, stream=False)
    plan = s.last_turn.plan
    assert plan.experts.task == "code" and plan.model_path.suffix == ".gguf" and plan.engine == "llama.cpp"
    assert plan.weights_bytes > 0 and s.backend.path == plan.model_path


# --- standard MoE architectures in the torch path -----------------------------------------------------

def _tiny_standard_moe(kind: str):
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM,
                              Qwen2MoeConfig, Qwen2MoeForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                                                **common))
    if kind == "qwen2moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=6,
                                                  num_experts_per_tok=2, shared_expert_intermediate_size=24,
                                                  decoder_sparse_step=1, mlp_only_layers=[], **common))
    common["num_key_value_heads"] = 4  # multi-head latent attention has one KV head per query head
    return DeepseekV3ForCausalLM(DeepseekV3Config(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=6,
                                                  num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                                                  first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
                                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2moe", "deepseek"])
def test_standard_moe_calibration_pruning_and_retrieval(kind):
    from edgerun.moe import adapters

    model = _tiny_standard_moe(kind).eval()
    layers = adapters.moe_layers(model)
    with torch.no_grad():  # random routers with a clear preference per token, so tasks route differently
        for m in layers:
            torch.nn.init.normal_(m.router.weight, std=1.0)
    assert len(layers) == 2 and layers[0].n_experts == 6 and layers[0].top_k == 2
    texts = {"low": torch.arange(0, 60)[None] % 40, "high": 80 + torch.arange(0, 60)[None] % 40}
    patterns = {}
    for task, ids in texts.items():
        c = tcess.TcessCollector(2, 6, 2)
        with adapters.collecting(model, c), torch.inference_mode():
            model(input_ids=ids)
        assert c.tokens == 60 and c.count.sum().item() == 2 * 60 * 2
        patterns[task] = tcess.Pattern(task, c.tokens, adapters.fingerprint(model), "frequency", 0, c.layer_stats())
    # retrieval: a query of a task's own text finds that task's key (distance 0), not the other one
    for task, ids in texts.items():
        c = tcess.TcessCollector(2, 6, 2)
        with adapters.collecting(model, c), torch.inference_mode():
            model(input_ids=ids)
        q = tcess.scores(c.layer_stats()[0], c.tokens, "frequency")
        nearest = min(patterns, key=lambda t: float(torch.linalg.norm(patterns[t].key() - q)))
        assert nearest == task
    with torch.inference_mode():
        full = model(input_ids=texts["low"]).logits
    adapters.prune(model, [list(range(6))] * 2, 2)
    with torch.inference_mode():
        same = model(input_ids=texts["low"]).logits
    assert (same - full).abs().max() < 1e-5
    adapters.prune(model, patterns["low"].keep(4), 2)
    assert adapters.moe_layers(model)[0].n_experts == 4
    with torch.inference_mode():
        pruned = model(input_ids=texts["low"]).logits
    assert pruned.shape == full.shape and torch.isfinite(pruned).all()


def test_taer_retrieves_the_right_task_on_the_real_carved_model(smollm2_source):
    """Code vs children's stories: held-out prompts find their own task's pattern with the all-layer key
    (normalised expert mass of every MoE layer; exact routing of the carved model)."""
    from converters.export import carved_cache
    from edgerun.data import documents
    from edgerun.moe import calibrate as cal

    carved = carved_cache(smollm2_source, "S2A2E8", 2048, False, lambda m: None)
    model, tok = cal.load_model(carved)
    patterns = {p.task: p for p in cal.calibrate(model, tok, [("code", "code"), ("tiny", "tiny")], tokens=2048,
                                                 key="mass")}
    hits, misses = 0, []
    for task in ("code", "tiny"):
        prompts = [d[:400] for d in documents(task, "heldout") if len(d) > 200][:8]
        for prompt in prompts:
            q = cal.query_key(model, tok, prompt, kind="mass")
            nearest = min(patterns, key=lambda t: float(torch.linalg.norm(patterns[t].key() - q)))
            hits += nearest == task
            if nearest != task:
                misses.append((task, prompt[:60]))
    # chance is 8 of 16; benchmarks/premoe_table.py --retrieval measures every key on all 7 tasks (code and
    # tiny stories: 10/10 each with the mass key there)
    assert hits >= 14, misses


def test_the_cached_pattern_key_changes_with_the_model_files(tmp_path):
    """Two models of the same directory name, or one re-carved in place, never share a cached pattern."""
    import os

    from edgerun.moe.calibrate import _cache_key

    a, b = tmp_path / "x" / "carved", tmp_path / "y" / "carved"
    for d in (a, b):
        (d / "experts").mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "experts" / "layer-00.safetensors").write_bytes(b"0" * 8)
    assert _cache_key(a).startswith("carved-") and _cache_key(a) != _cache_key(b)
    before = _cache_key(a)
    assert _cache_key(a) == before
    f = a / "experts" / "layer-00.safetensors"
    f.write_bytes(b"1" * 16)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert _cache_key(a) != before
