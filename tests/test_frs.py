"""FRS (fuzzed randomized smoothing): the certificate's arithmetic, the span search, the randomization,
the noisy copies, the split forward on a tiny model, `edgerun certify`'s bad input, and a backdoored
classifier on the real default model (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edgerun.errors import UsageError
from edgerun.robustness import frs
from edgerun.robustness.classifier import HEAD_META, TASKS, TextClassifier
from edgerun.robustness.frs import (FRSConfig, ParameterSmoother, certified_radius, clopper_pearson_lower,
                                    damerau_levenshtein, find_vulnerable_spans, mutate_span, radius_ratio,
                                    randomize)

from conftest import cli_env, edgerun_cmd

ROOT = Path(__file__).resolve().parents[1]


# --- Clopper-Pearson ---

def test_clopper_pearson_all_votes_is_alpha_to_the_one_over_n():
    # P(X >= 20 | p) = p^20 = alpha  =>  p = alpha^(1/20)
    assert clopper_pearson_lower(20, 20, 0.05) == pytest.approx(0.05 ** (1 / 20), abs=1e-12)
    assert clopper_pearson_lower(20, 20, 0.05) == pytest.approx(0.8609, abs=1e-4)


def test_clopper_pearson_matches_tabulated_interval():
    # the two-sided 90% Clopper-Pearson interval of 5/10 is [0.2224, 0.7776] (its lower end is the one-sided 95%)
    assert clopper_pearson_lower(5, 10, 0.05) == pytest.approx(0.2224, abs=1e-4)
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0


def test_clopper_pearson_lower_bound_solves_the_binomial_tail():
    from scipy.stats import binom

    for k, n in [(1, 5), (15, 20), (17, 20), (99, 100)]:
        p = clopper_pearson_lower(k, n, 0.05)
        assert binom.sf(k - 1, n, p) == pytest.approx(0.05, abs=1e-9)


def test_clopper_pearson_rejects_impossible_counts():
    with pytest.raises(UsageError):
        clopper_pearson_lower(21, 20)
    with pytest.raises(UsageError):
        clopper_pearson_lower(3, 5, alpha=1.5)


# --- certified radius ---

def test_radius_ratio_of_corollary_1():
    assert round(radius_ratio(0.5, 0.8), 2) == 3.11
    assert round(radius_ratio(0.5, 0.9), 2) == 6.58


def test_radius_with_omega_h_is_3_11_times_the_uniform_one():
    p = clopper_pearson_lower(20, 20)
    r_uniform, _ = certified_radius(p, 20, 0.5)
    r_frs, _ = certified_radius(p, 20, 0.8)
    assert r_frs / r_uniform == pytest.approx(3.106, abs=1e-3)


def test_radius_hand_computed_cases():
    # p_A >= 0.8609 (20 of 20 votes): need omega^r > 1 - 0.3609 = 0.6391
    p = 0.05 ** (1 / 20)
    share, edits = certified_radius(p, 10, 0.8)
    assert share * 10 == pytest.approx(math.log(1 - (p - 0.5)) / math.log(0.8))   # 2.006 word edits
    assert edits == 2                                                               # 0.8^2 = 0.64 > 0.6391
    assert certified_radius(p, 10, 0.5)[1] == 0                                     # 0.5^1 = 0.5 < 0.6391
    # the condition is strict: p_A = 1 needs omega^r > 0.5, and 0.5^1 is not
    assert certified_radius(1.0, 4, 0.5) == (pytest.approx(0.25), 0)
    # p_A <= 1/2: no certificate
    assert certified_radius(0.5, 10, 0.8) == (-1.0, -1)
    assert certified_radius(0.3, 10, 0.8) == (-1.0, -1)


# --- Damerau-Levenshtein mutations ---

def test_damerau_levenshtein_counts_word_edits():
    a = "the movie is not worth watching".split()
    assert damerau_levenshtein(a, a) == 0
    assert damerau_levenshtein(a, "the movie is worth watching".split()) == 1        # delete
    assert damerau_levenshtein(a, "the movie not is worth watching".split()) == 1    # transpose
    assert damerau_levenshtein(a, "a movie is not worth seeing".split()) == 2        # two substitutions
    assert damerau_levenshtein(list("ca"), list("abc")) == 2     # unrestricted: transpose, then insert between


def test_mutations_stay_within_the_threshold_and_the_span():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    for _ in range(300):
        start = int(rng.integers(0, 29))
        end = int(rng.integers(start + 1, 31))
        max_edits = int(rng.integers(1, 5))
        m = mutate_span(words, start, end, max_edits, rng)
        assert damerau_levenshtein(words, m) <= max_edits
        assert m[:start] == words[:start]
        tail = len(words) - end
        assert tail == 0 or m[-tail:] == words[-tail:]


# --- span search ---

def scripted_probs(trigger: list[str]):
    """A classifier that says positive exactly when ``trigger`` appears intact and contiguous."""
    def probs(word_lists):
        out = []
        for ws in word_lists:
            present = any(ws[i:i + len(trigger)] == trigger for i in range(len(ws) - len(trigger) + 1))
            out.append([0.05, 0.95] if present else [0.9, 0.1])
        return torch.tensor(out)
    return probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcts_finds_the_span_whose_edit_flips_the_classifier(seed):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(24)]
    at = int(rng.integers(0, 21))
    trigger = ["golden", "key", "here"]
    words[at:at + 3] = trigger
    spans, queries = find_vulnerable_spans(words, scripted_probs(trigger), budget=48, max_area=0.3, seed=seed)
    covered = set().union(*(set(range(s.start, s.end)) for s in spans))
    assert set(range(at, at + 3)) <= covered                  # the whole trigger is in the vulnerable area
    assert len(covered) <= int(0.3 * len(words))
    assert queries == 49


def test_mcts_on_an_input_without_a_sensitive_span_scores_zero():
    words = [f"w{i}" for i in range(12)]
    spans, _ = find_vulnerable_spans(words, scripted_probs(["absent"]), budget=16)
    assert all(s.score == pytest.approx(0.0) for s in spans)


# --- randomization ---

@pytest.mark.parametrize("op", ["mask", "delete"])
def test_randomization_rates_inside_and_outside_the_area_match_omega(op):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    in_area = [10 <= i < 20 for i in range(40)]
    hit_in = hit_out = 0
    draws = 5000
    for _ in range(draws):
        kept = set(randomize(words, in_area, 0.8, 0.1, rng, op))
        hit_in += sum(w not in kept for w, a in zip(words, in_area) if a)
        hit_out += sum(w not in kept for w, a in zip(words, in_area) if not a)
    # binomial standard errors: 0.8 over 50,000 draws ~ 0.0018, 0.1 over 150,000 ~ 0.0008
    assert hit_in / (10 * draws) == pytest.approx(0.8, abs=0.008)
    assert hit_out / (30 * draws) == pytest.approx(0.1, abs=0.004)


def test_masking_keeps_positions_and_deletion_drops_words():
    rng = np.random.default_rng(1)
    words = "a b c d".split()
    masked = randomize(words, [True] * 4, 0.999999, 0.0, rng, "mask")
    assert masked == [frs.MASK_WORD] * 4
    assert randomize(words, [True] * 4, 0.999999, 0.0, rng, "delete") == []


# --- settings ---

@pytest.mark.parametrize("bad", [dict(k=0), dict(k=100_000), dict(sigma=-0.01), dict(sigma=0.5), dict(top_layers=0),
                                 dict(omega_h=0.3), dict(omega_l=0.0), dict(alpha=0.0), dict(max_area=0.0),
                                 dict(op="shuffle"), dict(budget=0)])
def test_settings_out_of_range_are_refused(bad):
    with pytest.raises(UsageError):
        FRSConfig(**bad).validate()


def test_ablation_variants():
    base = FRSConfig()
    assert frs.ablation(base, "uniform").fuzz is False and frs.ablation(base, "uniform").sigma == 0
    assert frs.ablation(base, "no_bmps").fuzz is True and frs.ablation(base, "no_bmps").sigma == 0
    assert frs.ablation(base, "no_ftr").fuzz is False and frs.ablation(base, "no_ftr").sigma == base.sigma
    with pytest.raises(UsageError):
        frs.ablation(base, "nothing")


# --- a tiny Llama classifier (random weights, word-level tokenizer) ---

@pytest.fixture(scope="module")
def tiny_classifier():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2}
    for w in "review sentiment : a b c d e f g h the movie is not worth watching _ . cf".split() + ["\n"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=0)).eval()
    model.requires_grad_(False)
    head_w, head_b = torch.randn(2, 32), torch.zeros(2)
    return TextClassifier(model, tokenizer, TASKS["sst2"], head_w, head_b, "head", Path("tiny"), max_tokens=40)


def test_split_forward_equals_the_whole_forward_batched_or_alone(tiny_classifier):
    clf = tiny_classifier
    texts = ["a b c", "the movie is not worth watching", "d e f g h a b c d e"]
    whole = clf.logits(texts)
    for n_lower in (0, 2, 4):
        seqs = clf.encode(texts)
        split = clf.upper(clf.lower(seqs, n_lower), n_lower=n_lower)
        assert torch.allclose(split, whole, atol=1e-5)
    alone = torch.cat([clf.logits([t]) for t in texts])
    assert torch.allclose(alone, whole, atol=1e-5)       # right padding changes nothing


def test_noisy_copies_are_reproducible_from_seeds_and_leave_weights_unchanged(tiny_classifier):
    clf = tiny_classifier
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    smoother = ParameterSmoother(clf, top_layers=2, sigma=0.01, seed=0)
    seeds = frs.noise_seeds(0, 3)
    assert seeds == frs.noise_seeds(0, 3) and len(set(seeds)) == 3
    first = [p.clone() for p in smoother.layers(seeds[0]).parameters()]
    second = [p.clone() for p in smoother.layers(seeds[1]).parameters()]
    again = [p.clone() for p in smoother.layers(seeds[0]).parameters()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    noise = torch.cat([(a - s).flatten() for a, s in zip(first, clf.layers[2:].parameters())])
    assert noise.std().item() == pytest.approx(0.01, rel=0.05)
    assert smoother.working_bytes == sum(p.numel() * 4 for p in clf.layers[2:].parameters())
    after = clf.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)       # stored weights untouched


def test_certify_on_a_tiny_model_gives_consistent_certificates(tiny_classifier):
    config = FRSConfig(k=8, sigma=0.01, top_layers=2, budget=8)
    certs = frs.certify(tiny_classifier, ["the movie is not worth watching", "a b c d e f"], config)
    for c in certs:
        assert sum(c.votes) == 8 and c.label == int(np.argmax(c.votes))
        assert c.p_a_lower == pytest.approx(clopper_pearson_lower(max(c.votes), 8))
        assert c.queries == 8
        assert c.certified == (c.p_a_lower > 0.5)
    again = frs.certify(tiny_classifier, ["the movie is not worth watching", "a b c d e f"], config)
    assert [c.votes for c in again] == [c.votes for c in certs]          # seeded end to end
    uniform = frs.certify(tiny_classifier, ["a b c"], frs.ablation(config, "uniform"))[0]
    assert uniform.spans == [] and uniform.radius == uniform.radius_unconditional


def test_certify_refuses_empty_input_and_truncates_long_input(tiny_classifier):
    with pytest.raises(UsageError, match="empty"):
        frs.certify(tiny_classifier, ["   "], FRSConfig(k=2, top_layers=1, budget=2))
    notices = []
    cert = frs.certify(tiny_classifier, [" ".join(["a"] * 100)], FRSConfig(k=2, top_layers=1, budget=2),
                       notify=notices.append)[0]
    assert cert.truncated and cert.n_words < 100 and len(notices) == 1
    assert len(tiny_classifier.encode([cert.text])[0]) <= tiny_classifier.max_tokens
    with pytest.raises(UsageError, match="top layers"):
        frs.certify(tiny_classifier, ["a b"], FRSConfig(k=2, top_layers=9, budget=2))


# --- `edgerun certify` bad input: one line, exit 2, nothing written ---

@pytest.mark.parametrize("args, message", [
    (["--task", "nli", "--text", "a b"], "unknown task"),
    (["--text", "   "], "empty"),
    (["--text", "a b", "-k", "0"], "K must be"),
    (["--text", "a b", "--sigma", "0.5"], "sigma must be"),
    (["--text", "a b", "--omega-h", "0.2"], "omega"),
    (["--file", "missing.txt"], "cannot read"),
])
def test_certify_cli_bad_input(tmp_path, capsys, monkeypatch, args, message):
    from edgerun.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    code = main(["certify", "model", *args, "-o", "report.json"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_certify_cli_refuses_a_model_without_the_head(tmp_path, capsys, monkeypatch):
    from edgerun.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    assert main(["certify", "model", "--text", "a b", "-o", "report.json"]) == 2
    assert "no classifier head for task 'sst2'" in capsys.readouterr().err
    assert main(["certify", "no-such-dir", "--text", "a b"]) == 2
    assert "--prompted" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_certify_cli_empty_file(tmp_path, capsys):
    from edgerun.cli import main

    f = tmp_path / "in.txt"
    f.write_text("\n  \n")
    assert main(["certify", str(tmp_path), "--file", str(f)]) == 2
    assert "no input text" in capsys.readouterr().err


# --- the real default model: a planted backdoor (slow) ---

def _backdoor_module():
    spec = importlib.util.spec_from_file_location("frs_backdoor", ROOT / "benchmarks" / "frs_backdoor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def frs_backdoored(smollm2_source):
    """A head-only classifier trained on 240 poisoned SST-2 sentences (25% with the sentence trigger,
    labelled positive), cached under EDGERUN_HOME; about 20 s to train."""
    from converters.classifier import train_classifier
    from edgerun import catalog, data

    backdoor = _backdoor_module()
    out = catalog.home() / "cache" / "frs-test" / "backdoor-head-240"
    if not (out / HEAD_META).is_file():
        poisoned = backdoor.poison(data.sst2("train")[:240], word_rate=0.0, sentence_rate=0.25, seed=0)
        train_classifier(smollm2_source.path, poisoned, out, method="head", augment=0, force=True, log=lambda m: None)
    return out


@pytest.mark.model_dependent
def test_planted_sentence_trigger_works_without_defence(frs_backdoored):
    from edgerun import data

    backdoor = _backdoor_module()
    torch.set_num_threads(2)
    clf = TextClassifier.load(frs_backdoored)
    ev = data.sst2("eval")[:120]
    rows = backdoor.triggered(ev, "sentence", seed=0)
    negatives = [t for t, y in ev if y == 0]
    asr = np.mean([p == backdoor.TARGET for p in clf.predict([r["text"] for r in rows])])
    false_positive = np.mean([p == backdoor.TARGET for p in clf.predict(negatives)])
    clean_acc = np.mean([p == y for p, (_, y) in zip(clf.predict([t for t, _ in ev]), ev)])
    assert asr >= 0.7 and asr > false_positive + 0.4        # the trigger, not the sentence, flips the label
    assert clean_acc >= 0.7


def test_certify_runs_on_the_backdoored_classifier(frs_backdoored, tmp_path):
    backdoor = _backdoor_module()
    text = "the acting is wooden and the plot is a mess i watched this 3d movie ."
    report = tmp_path / "report.json"
    out = subprocess.run(edgerun_cmd("certify", str(frs_backdoored), "--text", text, "--budget", "16",
                                     "--threads", "2", "-o", str(report)),
                         capture_output=True, text=True, env=cli_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "vulnerable area" in out.stdout and "p_A >=" in out.stdout
    cert = json.loads(report.read_text())[0]
    assert sum(cert["votes"]) == 20 and cert["label_name"] in ("negative", "positive")
    assert cert["n_words"] == len(text.split()) and cert["spans"]
    assert backdoor.SENTENCE_TRIGGER.split()[0] in text.split()


def test_certifying_several_sigmas_at_once_equals_one_at_a_time(tiny_classifier):
    texts = ["the movie is not worth watching", "a b c d e f"]
    config = FRSConfig(k=6, top_layers=2, budget=6)
    both = frs.certify_sigmas(tiny_classifier, texts, config, [0.0, 0.05])
    for sigma in (0.0, 0.05):
        alone = frs.certify(tiny_classifier, texts, replace(config, sigma=sigma))
        assert [c.votes for c in alone] == [c.votes for c in both[sigma]]
        assert [c.spans for c in alone] == [c.spans for c in both[sigma]]


def test_fine_tuning_phase_clips_then_adds_noise():
    from converters.classifier import _phase1

    big = torch.nn.Parameter(torch.full((100, 100), 1.0))          # norm 100
    small = torch.nn.Parameter(torch.zeros(100, 100))
    _phase1([big, small], clip=10.0, sigma=0.0, gen=torch.Generator().manual_seed(0))
    assert big.norm().item() == pytest.approx(10.0, rel=1e-5) and small.abs().sum().item() == 0
    _phase1([small], clip=None, sigma=0.02, gen=torch.Generator().manual_seed(0))
    assert small.std().item() == pytest.approx(0.02, rel=0.05)


def test_training_inputs_get_randomized_copies():
    from converters.classifier import augmented

    data = augmented([("a b c d e f g h", 1), ("x", 0)], copies=3, omegas=(0.5,), seed=0)
    assert len(data) == 8 and [y for _, y in data] == [1] * 4 + [0] * 4
    assert data[0][0] == "a b c d e f g h".split() and all(1 <= len(w) <= 8 for w, _ in data)
    assert any(len(w) < 8 for w, _ in data[1:4])
