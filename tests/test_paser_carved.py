"""PASER recovery of a carved MoE after PEP expert pruning, on a tiny generated model: the carved model scores
against its dense source, recovery lowers the loss, the output is a carved checkpoint in the store layout with the
pruned expert count (torch backend), Ctrl-C keeps the last checkpoint, mismatched originals are named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from converters import paser
from edgerun.errors import UsageError

from test_paser import _pool, _tiny


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
    carved = carve_checkpoint(dense, root / "carved", "S1A2E4", tokens=1024, seq_len=128)
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

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        paser.recover(pruned, pool, out, steps=6, epochs=5, checkpoint_every=2, progress=interrupt)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert json.loads((tmp_path / ".recovered.recover" / "state.json").read_text())["step"] == 4
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
