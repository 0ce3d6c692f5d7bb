"""CMoE carving: exactness of the carved layer, the partition, determinism, bad input, and a real carve."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from converters.carve import activation_markers, balanced_assignment, carve_ffn
from edgerun.errors import UsageError
from edgerun.moe import config as moe_config

from conftest import make_tiny_checkpoint


def _dense(x, g, u, d):
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


@pytest.fixture
def ffn():
    torch.manual_seed(0)
    d, d_ff = 64, 256
    w = [torch.randn(d_ff, d) / 8, torch.randn(d_ff, d) / 8, torch.randn(d, d_ff) / 16]
    x = torch.randn(512, d)
    return w, x


def test_config_parsing_and_refusals():
    c = moe_config.parse("S2A4E16", 1536)
    assert (c.expert_size, c.routed, c.shared_neurons, c.active_fraction) == (96, 14, 192, 0.375)
    with pytest.raises(UsageError, match="do not divide the FFN width 1536; valid z: 2, 3, 4, 6, 8, 12, 16, 24, 48"):
        moe_config.parse("S1A2E10", 1536)
    with pytest.raises(UsageError, match="not a multiple of 32"):
        moe_config.parse("S1A2E64", 1536)  # m = 24
    with pytest.raises(UsageError, match="expected SxAyEz"):
        moe_config.parse("2-shared", 1536)
    with pytest.raises(UsageError, match="x \\+ y <= z"):
        moe_config.parse("S4A6E8", 1536)


def test_every_neuron_lands_in_exactly_one_expert(ffn):
    (g, u, d), x = ffn
    cfg = moe_config.parse("S2A2E8", 256)
    moe, shared, members, _ = carve_ffn(g, u, d, x, cfg)
    ids = torch.cat([shared, members.flatten()])
    assert sorted(ids.tolist()) == list(range(256))
    assert members.shape == (6, 32) and shared.shape == (64,)


def test_all_experts_selected_equals_the_dense_ffn(ffn):
    (g, u, d), x = ffn
    cfg = moe_config.parse("S2A6E8", 256)  # every routed expert active
    moe, _, _, _ = carve_ffn(g, u, d, x, cfg)
    assert (moe(x[None]) - _dense(x, g, u, d)).abs().max() < 1e-5


def test_training_free_layer_equals_the_dense_ffn_without_unselected_neurons(ffn):
    (g, u, d), x = ffn
    cfg = moe_config.parse("S2A2E8", 256)
    moe, shared, members, _ = carve_ffn(g, u, d, x, cfg)
    selected, gates, _ = moe.route(x)
    assert torch.equal(gates, torch.ones_like(gates))  # training-free: every selected expert has gate 1
    expected = torch.empty_like(x)
    for t in range(x.shape[0]):
        keep = torch.cat([shared, members[selected[t]].flatten()])
        mask = torch.zeros(256)
        mask[keep] = 1
        expected[t] = F.linear(F.silu(F.linear(x[t], g)) * F.linear(x[t], u) * mask, d)
    assert (moe(x[None])[0] - expected).abs().max() < 1e-5


def test_router_scores_follow_the_representative_neuron(ffn):
    (g, u, d), x = ffn
    cfg = moe_config.parse("S2A2E8", 256)
    moe, _, _, stats = carve_ffn(g, u, d, x, cfg, router="analytical")
    reps = stats["representatives"]
    gn, un = F.normalize(g[reps], dim=-1), F.normalize(u[reps], dim=-1)
    scores = torch.abs((x @ un.T) * F.silu(x @ gn.T))
    assert torch.allclose(moe.router_probs(x), torch.softmax(scores, -1), atol=1e-6)


def test_balanced_assignment_is_exact_and_balanced():
    import numpy as np

    cost = np.array([[0, 5], [0, 4], [9, 0], [1, 0]], dtype=float)
    groups = balanced_assignment(cost, 2)
    assert groups.tolist() == [0, 0, 1, 1]
    assert (np.bincount(balanced_assignment(np.random.default_rng(0).random((60, 3)), 20)) == 20).all()


def test_markers_mark_k_neurons_per_token(ffn):
    (g, u, _), x = ffn
    assert (activation_markers(x, g, u, 10).sum(1) == 10).all()


def test_carving_is_deterministic(ffn):
    (g, u, d), x = ffn
    cfg = moe_config.parse("S1A3E8", 256)
    a, b = carve_ffn(g, u, d, x, cfg), carve_ffn(g, u, d, x, cfg)
    assert torch.equal(a[2], b[2]) and torch.equal(a[0].router_gate, b[0].router_gate)


def _one_hot_experts(n_experts=4, m=8, d=16):
    """A tiny carved layer whose expert j reads only input dimension j (gate and up rows on e_j), so the
    expert with the largest activation mass for x = a e_j + noise is j."""
    from edgerun.moe.layer import CarvedMoE

    moe = CarvedMoE(d, 0, n_experts, m, 1, router_kind="fitted")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for j in range(n_experts):
            moe.expert_gate[j, :, j] = 1.0 + torch.rand(m, generator=g)
            moe.expert_up[j, :, j] = 1.0 + torch.rand(m, generator=g)
            moe.expert_down[j] = torch.randn(d, m, generator=g) / 4
    return moe


def _tokens_with_best_expert(n, n_experts, d, seed):
    g = torch.Generator().manual_seed(seed)
    best = torch.randint(0, n_experts, (n,), generator=g)
    x = 0.05 * torch.randn(n, d, generator=g)
    x[torch.arange(n), best] += 1.0 + 2.0 * torch.rand(n, generator=g)
    return x, best


def test_fitted_router_selects_the_known_best_expert():
    from converters.carve import fit_router

    moe = _one_hot_experts()
    x, _ = _tokens_with_best_expert(2048, 4, 16, seed=1)
    with torch.no_grad():
        moe.router_weight.copy_(fit_router(x, moe.expert_gate, moe.expert_up))
    fresh, best = _tokens_with_best_expert(512, 4, 16, seed=2)
    assert torch.equal(moe.expert_mass(fresh).argmax(1), best)   # the construction: j has the largest mass
    selected, gates, _ = moe.route(fresh)
    assert torch.equal(selected[:, 0], best)
    assert torch.equal(gates, torch.ones_like(gates))
    moe.router_kind = "analytical"   # zero representative rows: an analytical router over them picks no best
    assert not torch.equal(moe.route(fresh)[0][:, 0], best)


def test_oracle_is_exact_in_chunks_and_greedy_past_the_set_limit(ffn, monkeypatch):
    """Chunked evaluation gives the same sets as one pass; past EXACT_ORACLE_SETS the greedy sets are
    distinct sorted experts whose remainder is never below the exact oracle's."""
    from edgerun.moe import layer as moe_layer

    (g, u, d), x = ffn
    moe, *_ = carve_ffn(g, u, d, x, moe_config.parse("S2A2E8", 256))
    probe = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = moe.oracle_select(probe)
        monkeypatch.setattr(moe_layer, "ORACLE_CHUNK_FLOATS", 32 * 64 * 2)      # 2 sets per chunk
        assert torch.equal(moe.oracle_select(probe), whole)
        monkeypatch.setattr(moe_layer, "EXACT_ORACLE_SETS", 1)
        greedy = moe.oracle_select(probe)
        outs = moe.expert_outputs(probe)

    def remainder(sets):
        kept = outs.gather(1, sets[:, :, None].expand(-1, -1, outs.shape[-1])).sum(1)
        return torch.linalg.vector_norm(outs.sum(1) - kept, dim=-1)

    assert greedy.shape == whole.shape and bool((greedy[:, 1:] > greedy[:, :-1]).all())
    assert bool((remainder(greedy) >= remainder(whole) - 1e-5).all())


def test_oracle_is_the_best_router_by_brute_force(ffn):
    """Per token, over all C(6, 2) expert pairs, the oracle's pair leaves the smallest error against the dense
    FFN; so its mean error is at most the fitted, analytical and random routers'."""
    import itertools

    (g, u, d), x = ffn
    cfg = moe_config.parse("S2A2E8", 256)
    moe, shared, members, _ = carve_ffn(g, u, d, x, cfg)
    probe = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    dense = _dense(probe, g, u, d)
    errors = []
    for pair in itertools.combinations(range(6), 2):
        keep = torch.cat([shared, members[list(pair)].flatten()])
        mask = torch.zeros(256)
        mask[keep] = 1
        approx = F.linear(F.silu(F.linear(probe, g)) * F.linear(probe, u) * mask, d)
        errors.append(torch.linalg.vector_norm(approx - dense, dim=-1))
    errors = torch.stack(errors, 1)                                   # (tokens, 15)
    with torch.no_grad():
        moe.routing_override = "oracle"
        oracle_err = torch.linalg.vector_norm(moe(probe[None])[0] - dense, dim=-1)
        assert torch.allclose(oracle_err, errors.min(1).values, atol=1e-4)
        means = {}
        for name, kind, override in (("fitted", "fitted", None), ("analytical", "analytical", None),
                                     ("random", "fitted", "random")):
            moe.router_kind, moe.routing_override = kind, override
            moe.random_generator = torch.Generator().manual_seed(0)
            means[name] = float(torch.linalg.vector_norm(moe(probe[None])[0] - dense, dim=-1).mean())
    assert all(float(oracle_err.mean()) <= v + 1e-6 for v in means.values()), means


# --- checkpoints ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_source):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", smollm2_source.path)


def test_carved_checkpoint_runs_in_the_torch_backend_and_matches_all_experts_dense(tiny_llama, tmp_path):
    from converters.carve import carve_checkpoint
    from edgerun.backends.torch import TorchBackend
    from edgerun.moe import store

    out = carve_checkpoint(tiny_llama, tmp_path / "carved", "S2A2E4", tokens=1024, seq_len=256)
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["layer-00.safetensors", "layer-01.safetensors"]
    one = store.read_layer(out, 0, experts=[1])
    assert "experts.1.gate_proj.weight" in one and "experts.0.gate_proj.weight" not in one
    dense = TorchBackend(tiny_llama, n_ctx=128)
    carved = TorchBackend(out, n_ctx=128)
    tokens = dense.tokenize("The quick brown fox jumps over the lazy dog and runs into the forest.")
    with torch.no_grad():
        for layer in carved.model.model.layers:  # select every routed expert: the model must equal the dense one
            layer.mlp.top_k = layer.mlp.n_routed
    assert abs(dense.logits(tokens) - carved.logits(tokens)).max() < 1e-4


def test_already_carved_and_non_llama_sources_are_refused(tiny_llama, tmp_path, smollm2_source):
    from converters.carve import carve_checkpoint

    out = carve_checkpoint(tiny_llama, tmp_path / "carved", "S1A1E4", tokens=512, seq_len=256)
    with pytest.raises(UsageError, match="already a carved MoE"):
        carve_checkpoint(out, tmp_path / "again", "S1A1E4")
    gemma = make_tiny_checkpoint(tmp_path / "gemma", "gemma3", smollm2_source.path)
    with pytest.raises(UsageError, match="supports Llama-family SwiGLU models"):
        carve_checkpoint(gemma, tmp_path / "g", "S1A1E4")


def test_too_little_calibration_text_is_refused(tiny_llama, tmp_path):
    from converters.carve import carve_checkpoint

    with pytest.raises(UsageError, match=r"calibration text has|\(calibration\) has \d+ tokens"):
        carve_checkpoint(tiny_llama, tmp_path / "c", "S1A1E4", tokens=10_000_000, seq_len=2048)


def test_interrupted_carve_leaves_no_output(tiny_llama, tmp_path):
    from converters.carve import carve_checkpoint

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        carve_checkpoint(tiny_llama, tmp_path / "c", "S1A1E4", tokens=512, seq_len=256, progress=stop)
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


# --- engines: the carved model hosted as Granite's shared-expert MoE ---------------------------------

@pytest.fixture(scope="module")
def tiny_hosts(tiny_llama, tmp_path_factory):
    """Tiny carved models (every routed expert active / one of three) and their Granite hosts."""
    from converters.carve import carve_checkpoint
    from converters.moe_export import to_granite

    root = tmp_path_factory.mktemp("hosts")
    out = {}
    for cfg in ("S2A2E4", "S1A1E4"):
        carved = carve_checkpoint(tiny_llama, root / cfg, cfg, tokens=1024, seq_len=256)
        out[cfg] = (carved, to_granite(carved, root / f"{cfg}-granite", tokens=1024, heldout_tokens=512))
    return out


TEXT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find some food."


def test_granite_host_with_every_expert_active_matches_the_carved_model(tiny_hosts):
    from edgerun.backends.torch import TorchBackend

    carved, granite = tiny_hosts["S2A2E4"]
    a, b = TorchBackend(carved, n_ctx=128), TorchBackend(granite, n_ctx=128)
    assert type(b.model).__name__ == "GraniteMoeSharedForCausalLM"
    tokens = a.tokenize(TEXT)
    la, lb = a.logits(tokens), b.logits(tokens)
    # only the flat-router approximation separates them: weights within ~1% of 1
    assert abs(la - lb).max() < 2e-3 * (la.max() - la.min())


def test_exported_routing_equals_the_fitted_router_exactly(tiny_hosts):
    """The host's linear router is the carved model's fitted router times 2^-7: on the same FFN inputs both
    choose the same experts for every token of every layer (exported = exact by construction)."""
    import json

    from edgerun.calibration import run_with_input_hooks
    from edgerun.backends.torch import TorchBackend
    from edgerun.moe import store

    carved, granite = tiny_hosts["S1A1E4"]
    meta = json.loads((granite / "config.json").read_text())["edgerun_moe"]
    assert meta["router"] == "fitted" and meta["host_router"] == "exact" and meta["router_agreement"] == [1.0, 1.0]
    exact = store.load_model(carved)
    host = TorchBackend(granite, n_ctx=256).model
    tok = TorchBackend(carved, n_ctx=256).tokenizer
    seen = {}
    run_with_input_hooks(exact, {i: layer.mlp for i, layer in enumerate(exact.model.layers)},
                         [torch.tensor([tok(TEXT * 3).input_ids])], lambda i, x: seen.setdefault(i, x.float()))
    for i, layer in enumerate(exact.model.layers):
        x = seen[i].reshape(-1, seen[i].shape[-1])
        mine = torch.sort(layer.mlp.route(x)[0], dim=-1).values
        with torch.no_grad():
            _, _, indices = host.model.layers[i].block_sparse_moe.router(x)
        assert torch.equal(mine, torch.sort(indices, dim=-1).values)


def test_router_agreement_is_measured_and_recorded(tiny_hosts):
    import json

    _, granite = tiny_hosts["S1A1E4"]
    meta = json.loads((granite / "config.json").read_text())["edgerun_moe"]
    assert len(meta["router_agreement"]) == 2 and all(0 <= a <= 1 for a in meta["router_agreement"])
    full = json.loads((tiny_hosts["S2A2E4"][1] / "config.json").read_text())["edgerun_moe"]
    assert full["router_agreement"] == [1.0, 1.0]  # all experts chosen: any router agrees


@pytest.mark.parametrize("cfg", ["S2A2E4", "S1A1E4"])
def test_gguf_and_onnx_match_the_exported_routing(tiny_hosts, tmp_path, cfg):
    from converters import gguf as gguf_writer
    from converters.onnx import write_onnx
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.backends.onnx import OnnxBackend
    from edgerun.backends.torch import TorchBackend

    _, granite = tiny_hosts[cfg]
    ref = TorchBackend(granite, n_ctx=128)
    tokens = ref.tokenize(TEXT)
    expected = ref.logits(tokens)
    tol = 1e-3 * (expected.max() - expected.min())
    gguf_path = gguf_writer.write_f32(granite, tmp_path / "m.gguf")
    engine = LlamaCppBackend(gguf_path, n_ctx=128, cache_type_k="f32", cache_type_v="f32")
    try:
        assert abs(engine.logits(tokens) - expected).max() < tol
    finally:
        engine.close()
    onnx_dir = write_onnx(granite, tmp_path / "onnx", precision="fp32")
    assert abs(OnnxBackend(onnx_dir, n_ctx=128).logits(tokens) - expected).max() < tol


def test_real_model_carve_export_and_chat(tmp_path, smollm2_f32_gguf):
    """End to end on SmolLM2: export --carve to GGUF, chat with it in llama.cpp and the exact torch reference."""
    import json
    import subprocess

    from conftest import cli_env, edgerun_cmd

    out = tmp_path / "moe.gguf"
    r = subprocess.run(edgerun_cmd("export", "smollm2-135m-instruct", "--carve", "S2A2E8", "--carve-tokens", "2048",
                                   "--to", "gguf", "--quant", "Q8_0", "--no-verify", "-o", str(out)),
                       capture_output=True, text=True, env=cli_env(), timeout=1200)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "moe.gguf.manifest.json").read_text())
    names = [p["name"] for p in manifest["passes"]]
    assert names[:2] == ["carve", "host-as-granitemoe"] and "router_agreement_mean" in manifest["passes"][1]
    from edgerun.formats import gguf as gguf_format

    info = gguf_format.validate(out)
    assert info.architecture == "granitemoe" and info.metadata["granitemoe.expert_count"] == 6
    chat = subprocess.run(edgerun_cmd("chat", str(out), "-p", "What is the capital of Germany?", "--temperature", "0",
                                      "--max-tokens", "16"), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    carved_dir = manifest["passes"][0]["checkpoint"]
    exact = subprocess.run(edgerun_cmd("chat", carved_dir, "--backend", "torch", "-p", "Hello!", "--temperature", "0",
                                       "--max-tokens", "8"), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert exact.returncode == 0 and exact.stdout.strip(), exact.stderr


def test_finetune_trains_gate_scales_lora_and_balances_the_load(tiny_llama, tmp_path):
    """CMoE's optional fine-tune: bounded steps, gate scales leave 0, bias moves in +-0.001 steps towards
    balance, LoRA is merged into the weights, the store layout and neuron ids are kept."""
    from converters.carve import carve_checkpoint
    from converters.cmoe_finetune import finetune
    from edgerun.backends.torch import TorchBackend
    from edgerun.moe import store

    carved = carve_checkpoint(tiny_llama, tmp_path / "carved", "S1A1E4", tokens=512, seq_len=256,
                              router="analytical")   # CMoE's path: frozen router, bias balancing
    with pytest.raises(UsageError, match="not a carved checkpoint"):
        finetune(tiny_llama, tmp_path / "x", steps=1)
    with pytest.raises(UsageError, match="trains a fitted linear router"):
        finetune(carved, tmp_path / "y", steps=1, router_distill=1.0)
    out, report = finetune(carved, tmp_path / "ft", minutes=5, steps=4, seq_len=128)
    assert report.steps == 4 and report.tokens == 512 and report.lora["rank"] == 8
    with pytest.raises(UsageError, match="already exists"):
        finetune(carved, out, steps=1)
    before, after = store.load_model(carved), store.load_model(out)
    for a, b in zip(before.model.layers, after.model.layers):
        assert torch.count_nonzero(b.mlp.scale) > 0 and torch.count_nonzero(a.mlp.scale) == 0
        steps = b.mlp.bias / 1e-3
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 4
        assert (b.mlp.expert_gate - a.mlp.expert_gate).abs().max() > 0          # LoRA merged into the experts
        assert (b.self_attn.q_proj.weight - a.self_attn.q_proj.weight).abs().max() > 0
        old, new = store.read_layer(carved, 0, experts=[]), store.read_layer(out, 0, experts=[])
        assert torch.equal(old["neurons.experts"], new["neurons.experts"])
    meta = json.loads((out / "config.json").read_text())["edgerun_moe"]
    assert meta["finetune"]["steps"] == 4 and meta["name"] == "S1A1E4"
    engine = TorchBackend(out, n_ctx=128)
    assert engine.logits(engine.tokenize("Hello there"))[-1].shape[0] == engine.model.config.vocab_size


def test_finetune_distils_the_oracle_into_a_fitted_router_and_keeps_the_export_exact(tiny_llama, tmp_path):
    """Fitted router: --finetune trains the router towards the oracle's sets (on fixed FFN inputs the
    cross-entropy to the oracle's experts falls), the bias stays 0, and the host still routes exactly as
    the model."""
    from converters.carve import carve_checkpoint
    from converters.cmoe_finetune import finetune
    from converters.moe_export import to_granite
    from edgerun.backends.torch import TorchBackend
    from edgerun.calibration import run_with_input_hooks
    from edgerun.moe import store

    carved = carve_checkpoint(tiny_llama, tmp_path / "carved", "S1A1E4", tokens=512, seq_len=256)
    out, report = finetune(carved, tmp_path / "ft", minutes=5, steps=12, seq_len=128, lora=False, lr=1e-3)
    assert report.router_distill == 1.0 and report.distill_loss_first is not None
    before, after = store.load_model(carved), store.load_model(out)
    seen = {}
    ids = TorchBackend(carved, n_ctx=256).tokenizer(TEXT * 3).input_ids
    run_with_input_hooks(before, {i: layer.mlp for i, layer in enumerate(before.model.layers)},
                         [torch.tensor([ids])], lambda i, x: seen.setdefault(i, x.float()))

    def cross_entropy(moe, x):
        with torch.no_grad():
            return float(-torch.log_softmax(moe.router_logits(x), -1).gather(1, moe.oracle_select(x)).mean())

    ce_before = sum(cross_entropy(a.mlp, seen[i]) for i, a in enumerate(before.model.layers))
    ce_after = sum(cross_entropy(b.mlp, seen[i]) for i, b in enumerate(after.model.layers))
    assert ce_after < ce_before
    for a, b in zip(before.model.layers, after.model.layers):
        assert (b.mlp.router_weight - a.mlp.router_weight).abs().max() > 0
        assert torch.count_nonzero(b.mlp.bias) == 0
    host = to_granite(out, tmp_path / "host", tokens=512, heldout_tokens=256)
    meta = json.loads((host / "config.json").read_text())["edgerun_moe"]
    assert meta["host_router"] == "exact" and meta["router_agreement"] == [1.0, 1.0]


def test_cli_carve_with_finetune_writes_one_checkpoint_and_no_staging(tiny_llama, tmp_path):
    import subprocess

    from conftest import cli_env, edgerun_cmd

    out = tmp_path / "moe"
    r = subprocess.run(edgerun_cmd("carve", str(tiny_llama), "--config", "S1A1E4", "--tokens", "512", "--finetune", "1",
                                   "--finetune-steps", "2", "-o", str(out)),
                       capture_output=True, text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fine-tune: 2 steps" in r.stdout
    assert json.loads((out / "config.json").read_text())["edgerun_moe"]["finetune"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]          # the training-free staging is gone
    bad = subprocess.run(edgerun_cmd("carve", str(tiny_llama), "--config", "S1A1E4", "--finetune", "0", "-o",
                                     str(tmp_path / "x")), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert bad.returncode != 0 and "must be positive" in bad.stderr


# --- domain-aware grouping (issue 16, item 4) -------------------------------------------------------

def _two_domain_ffn():
    """An FFN whose neurons 0-127 read only the first half of the input and 128-255 only the second; domain 0's
    tokens live in the first half, domain 1's in the second, so each domain activates its own 128 neurons."""
    torch.manual_seed(0)
    d, d_ff, t = 32, 256, 1024
    g, u = torch.zeros(d_ff, d), torch.zeros(d_ff, d)
    for rows, cols in ((slice(0, 128), slice(0, 16)), (slice(128, 256), slice(16, 32))):
        g[rows, cols], u[rows, cols] = torch.randn(128, 16), torch.randn(128, 16)
    x, dom = torch.zeros(t, d), torch.arange(t) % 2
    x[dom == 0, :16], x[dom == 1, 16:] = torch.randn(t // 2, 16), torch.randn(t // 2, 16)
    return (g, u, torch.randn(d, d_ff) / 16), x, dom


def test_domain_preferences_of_a_constructed_profile():
    from converters.carve import domain_preferences

    profile = torch.tensor([[1., 0., 0.], [1., 1., 0.], [0., 1., 0.], [0., 1., 0.]])   # 4 tokens, 3 neurons
    rates, prefs = domain_preferences(profile, torch.tensor([0, 0, 1, 1]), 2)
    assert torch.allclose(rates, torch.tensor([[1., .5, 0.], [0., 1., 0.]]))
    assert torch.allclose(prefs, torch.tensor([[1., 0.], [1 / 3, 2 / 3], [.5, .5]]))   # never active: uniform
    with pytest.raises(ValueError, match="domain labels"):
        domain_preferences(profile, torch.tensor([0, 0, 1, 2]), 2)


def test_a_domain_aware_carve_puts_each_domains_neurons_into_its_own_experts():
    """Two synthetic domains with disjoint active neurons: the domain-aware grouping gives three experts to each
    domain, each (nearly) made of that domain's neurons, where CMoE's co-activation grouping mixes them (its
    sparse ATopK markers barely distinguish a same-domain pair from a cross-domain one)."""
    (g, u, d), x, dom = _two_domain_ffn()
    cfg = moe_config.parse("S2A2E8", 256)

    def majority(members):
        side = (members >= 128).float().mean(1)
        return torch.maximum(side, 1 - side), side

    _, _, plain, _ = carve_ffn(g, u, d, x, cfg)
    _, _, aware, stats = carve_ffn(g, u, d, x, cfg, domains=dom, n_domains=2)
    pure, side = majority(aware)
    assert stats["expert_domains"] == [0, 1, 0, 1, 0, 1]
    assert bool((pure >= 0.9).all()), side
    assert [bool(s > 0.5) for s in side] == [False, True, False, True, False, True]   # expert j on domain j mod 2
    assert float(pure.mean()) > float(majority(plain)[0].mean()) + 0.05
    with pytest.raises(ValueError, match="domain weight"):
        carve_ffn(g, u, d, x, cfg, domains=dom, n_domains=2, domain_weight=1.5)
    with pytest.raises(ValueError, match="n_domains >= 1"):
        carve_ffn(g, u, d, x, cfg, domains=dom)


def test_a_domain_aware_checkpoint_calibrates_on_each_domain_and_records_it(tiny_llama, tmp_path, monkeypatch):
    from converters import carve
    from converters.carve import carve_checkpoint
    from converters.passes import carve_record

    calls = []
    real = carve.calibration_windows

    def recording(tokenizer, n, seq_len, dataset="wiki"):
        calls.append((dataset, n, seq_len))
        return real(tokenizer, n, seq_len, dataset)

    monkeypatch.setattr(carve, "calibration_windows", recording)
    out = carve_checkpoint(tiny_llama, tmp_path / "carved", "S1A1E4", tokens=1024, seq_len=256,
                           domains=["wiki", "code"])
    assert calls == [("wiki", 2, 256), ("code", 2, 256)]
    meta = json.loads((out / "config.json").read_text())["edgerun_moe"]
    assert meta["domains"] == ["wiki", "code"] and meta["domain_weight"] == 0.5
    assert meta["calibration"] == {"dataset": "wiki,code", "split": "calibration", "tokens": 1024, "window": 256}
    assert len(meta["domain_purity"]) == 2 and all(0.5 <= p <= 1.0 for p in meta["domain_purity"])
    assert carve_record(out)["domains"] == ["wiki", "code"]
    with pytest.raises(UsageError, match="repeated domain"):
        carve_checkpoint(tiny_llama, tmp_path / "c2", "S1A1E4", tokens=1024, domains=["wiki", "wiki"])
    with pytest.raises(UsageError, match="at least two domains"):
        carve_checkpoint(tiny_llama, tmp_path / "c4", "S1A1E4", tokens=1024, domains=["code"])
    with pytest.raises(UsageError, match="4 domains for 3 routed experts"):
        carve_checkpoint(tiny_llama, tmp_path / "c5", "S1A1E4", tokens=1024, domains=["wiki", "code", "c4", "tiny"])
    assert not any((tmp_path / c).exists() for c in ("c2", "c3", "c4", "c5"))
    with pytest.raises(UsageError, match="domain weight"):
        carve_checkpoint(tiny_llama, tmp_path / "c3", "S1A1E4", tokens=1024, domains=["wiki", "code"],
                         domain_weight=2.0)
