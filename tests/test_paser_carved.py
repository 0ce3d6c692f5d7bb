"""PASER recovery of a carved MoE after PEP expert pruning, on a tiny generated model: the carved model scores
against its dense source, recovery lowers the loss, the output is a carved checkpoint in the store layout with the
pruned expert count (torch backend), Ctrl-C keeps the last checkpoint, mismatched originals are named."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from converters import paser
from edgerun.errors import UsageError

from conftest import cli_env, edgerun_cmd
from test_paser import _pool, _tiny, interrupted_recovery


def _calibration_words() -> list[str]:
    from edgerun import data

    return re.findall(r"\w+|[^\w\s]", data.text("wiki", "calibration")[:60_000])


@pytest.fixture(scope="module")
def carved_pair(tmp_path_factory):
    """(pool, dense original, carved S1A2E4 of it (3 routed, top-2), that carve PEP-pruned to experts {0, 2}, top-2).

    The dense model is test_paser's tiny Llama (hidden 32, FFN 128, 2 layers) with a word-level vocabulary of
    the pool and of the wiki calibration text the carve profiles (so the calibration tokens are real words).
    """
    from converters.carve import carve_checkpoint
    from edgerun.moe.store import select_experts

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("carved-paser")
    pool = _pool(16)
    dense = _tiny(root / "dense", pool, prune=False, extra_words=_calibration_words(), intermediate=128)
    carved = carve_checkpoint(dense, root / "carved", "S1A2E4", tokens=512, seq_len=128)
    pruned = select_experts(carved, root / "pruned", [[0, 2], [0, 2]], 2, {"task": "test", "score": "hand"})
    return pool, dense, carved, pruned


def test_carved_pruned_model_scores_against_the_dense_original(carved_pair):
    from transformers import AutoTokenizer

    from edgerun.moe.layer import CarvedMoE

    pool, dense, _, pruned = carved_pair
    paser.check_match(pruned, dense)
    model = paser._load(pruned)
    assert isinstance(model.model.layers[0].mlp, CarvedMoE) and model.model.layers[0].mlp.n_routed == 2
    tok = AutoTokenizer.from_pretrained(pruned)
    same, _ = paser.sample_jsd(model, model, tok, pool[:4])
    assert same == pytest.approx([0.0] * 4, abs=1e-6)
    scores, lengths = paser.sample_jsd(paser._load(dense), model, tok, pool[:4])
    assert (scores > 0).all() and (scores < 0.6932).all() and (lengths > 0).all()
    nll, tokens = paser.response_nlls(pruned, pool[:3])                   # per sample, batched with padding
    ids, n_prompt = paser.encode_pair(tok, pool[1])
    with torch.inference_mode():
        alone = model(input_ids=torch.tensor([ids]), labels=torch.tensor([[-100] * n_prompt + ids[n_prompt:]])).loss
    assert tokens[1] == len(ids) - n_prompt and nll[1] / tokens[1] == pytest.approx(float(alone), rel=1e-4)
    assert paser.losses_on(pruned, pool[:3]) == pytest.approx(nll.sum() / tokens.sum())


def test_recovery_of_a_pruned_carved_moe_lowers_the_loss_and_keeps_the_store_layout(carved_pair, tmp_path):
    from edgerun.backends.torch import TorchBackend
    from edgerun.moe import adapters, store

    torch.set_num_threads(1)
    pool, _, _, pruned = carved_pair
    out = tmp_path / "recovered"
    report = paser.recover(pruned, pool, out, steps=30, epochs=20, lr=1e-2, checkpoint_every=0)
    assert report.steps == 30 and report.stopped == "steps"
    assert report.lora["parameters"] == ["mlp.shared_gate", "mlp.shared_up", "mlp.shared_down", "mlp.expert_gate",
                                         "mlp.expert_up", "mlp.expert_down"]
    assert paser.losses_on(out, pool) < paser.losses_on(pruned, pool) - 0.2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["edgerun_moe"]["routed"] == 2 and cfg["edgerun_moe"]["pruned"]["keep"] == [[0, 2], [0, 2]]
    assert cfg["edgerun_recovery"]["steps"] == 30
    before, after = store.read_layer(pruned, 0), store.read_layer(out, 0)
    assert sorted(after) == sorted(before)                                   # the same store tensors, 2 experts
    assert not torch.equal(before["experts.1.up_proj.weight"], after["experts.1.up_proj.weight"])   # trained
    for frozen in ("router.weight", "router.scale", "router.bias", "neurons.experts"):
        assert torch.equal(before[frozen], after[frozen]), frozen
    backend = TorchBackend(out, n_ctx=128)
    layers = adapters.moe_layers(backend.model)
    assert [layer.n_experts for layer in layers] == [2, 2] and layers[0].top_k == 2


def test_ctrl_c_during_carved_recovery_writes_nothing_then_resumes(carved_pair, tmp_path):
    torch.set_num_threads(1)
    pool, _, _, pruned = carved_pair
    out = tmp_path / "recovered"
    state = interrupted_recovery(pruned, pool, out, stop_at=5, steps=6, every=2)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert state["step"] == 4
    report = paser.recover(pruned, pool, out, steps=6, epochs=5, checkpoint_every=2)
    assert report.resumed_from == 4 and report.steps == 6
    assert (out / "experts" / "layer-01.safetensors").is_file() and not (tmp_path / ".recovered.recover").exists()


def test_a_mismatching_original_is_named(carved_pair, tmp_path):
    pool, _, _, pruned = carved_pair
    other = _tiny(tmp_path / "wide", pool, hidden=64, prune=False)
    with pytest.raises(UsageError, match="hidden_size is 32 but the original's is 64"):
        paser.check_match(pruned, other)
    host = tmp_path / "host"
    host.mkdir()
    (host / "config.json").write_text(json.dumps({"model_type": "granitemoeshared",
                                                  "edgerun_moe": {"export": "granitemoeshared"}}))
    with pytest.raises(UsageError, match="engine host of a carved MoE"):
        paser.check_match(host, other)


def test_a_different_vocabulary_is_named(carved_pair, tmp_path):
    pool, dense, _, pruned = carved_pair
    cfg = json.loads((dense / "config.json").read_text())
    small = _tiny(tmp_path / "small", pool, hidden=32, prune=False)            # the pool's vocabulary only
    assert json.loads((small / "config.json").read_text())["vocab_size"] != cfg["vocab_size"]
    with pytest.raises(UsageError, match="vocab_size is"):
        paser.check_match(pruned, small)


def test_prune_carved_keeps_the_patterns_top_experts(carved_pair, tmp_path):
    from converters.prune import prune_carved
    from edgerun.moe import calibrate as cal
    from edgerun.moe import tcess

    torch.set_num_threads(1)
    _, _, carved, _ = carved_pair
    model, tok = cal.load_model(carved, threads=1)
    pattern = cal.calibrate(model, tok, [("wiki", "wiki")], tokens=256, name="tiny")[0]
    tcess.save(pattern, tmp_path / "patterns")
    out = prune_carved(carved, tmp_path / "p", "wiki", 1, 2, patterns=tmp_path / "patterns")
    meta = json.loads((out / "config.json").read_text())["edgerun_moe"]
    assert meta["pruned"]["keep"] == pattern.keep(2) and (meta["routed"], meta["active"]) == (2, 1)
    with pytest.raises(UsageError, match="b = 4 exceeds the 3 routed experts"):
        prune_carved(carved, tmp_path / "q", "wiki", 2, 4, patterns=tmp_path / "patterns")
    with pytest.raises(UsageError, match="not a carved checkpoint"):
        prune_carved(carved_pair[1], tmp_path / "r", "wiki", 1, 2, patterns=tmp_path / "patterns")
    # the same from the command line: `edgerun experts prune`, then its refusals
    from edgerun import cli

    assert cli.main(["experts", "prune", str(carved), "--prune-experts", "wiki:1/2", "--patterns",
                     str(tmp_path / "patterns"), "-o", str(tmp_path / "cli")]) == 0
    cli_meta = json.loads((tmp_path / "cli" / "config.json").read_text())["edgerun_moe"]
    assert cli_meta["pruned"]["keep"] == meta["pruned"]["keep"]
    assert cli.main(["experts", "prune", str(carved), "--prune-experts", "wiki:1/2", "--patterns",
                     str(tmp_path / "patterns"), "-o", str(tmp_path / "cli")]) != 0       # exists, no --force
    assert cli.main(["experts", "prune", str(carved), "-o", str(tmp_path / "none")]) != 0  # no TASK:a/b
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_recovered_carved_smollm2_exports_to_gguf_with_its_pruned_expert_count(smollm2_source, tmp_path):
    """The real model carved S3A3E8 (2,048 calibration tokens, cached), PEP-pruned by hand to 3 of its 5 routed
    experts, PASER-recovered for 3 steps, then `edgerun export --to gguf` (the host pass): 3 experts, top-3, chats."""
    from converters.export import carved_cache
    from edgerun.formats import gguf as gguf_format
    from edgerun.moe.store import select_experts

    torch.set_num_threads(1)
    carved = carved_cache(smollm2_source, "S3A3E8", 2048, False, lambda m: None)
    layers = json.loads((carved / "config.json").read_text())["num_hidden_layers"]
    pruned = select_experts(carved, tmp_path / "pruned", [[0, 2, 4]] * layers, 3, {"task": "hand", "score": "-"})
    out = tmp_path / "recovered"
    record = paser.run(pruned, str(smollm2_source.path), out, budget=0.25, pool_size=24, clusters=3, steps=3,
                       progress=False, log=lambda m: None)
    assert record["recovery"]["steps"] == 3 and (out / "paser_selection.json").is_file()
    assert (out / "paser_clusters.png").is_file() and paser.is_carved(out)
    gguf_path = tmp_path / "r.gguf"
    r = subprocess.run(edgerun_cmd("export", str(out), "--to", "gguf", "--quant", "Q8_0", "--no-verify", "-o",
                                   str(gguf_path)), capture_output=True, text=True, env=cli_env(), timeout=900)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "r.gguf.manifest.json").read_text())
    assert "host-as-granitemoe" in [p["name"] for p in manifest["passes"]]
    meta = gguf_format.validate(gguf_path).metadata
    assert (meta["granitemoe.expert_count"], meta["granitemoe.expert_used_count"]) == (3, 3)
    chat = subprocess.run(edgerun_cmd("chat", str(gguf_path), "-p", "What is the capital of France?", "--temperature",
                                      "0", "--max-tokens", "8"), capture_output=True, text=True, env=cli_env(),
                          timeout=300)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
