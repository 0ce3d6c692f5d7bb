"""Long-to-Short merging: the per-tensor methods on hand-made tensors, streaming merges of
tiny generated checkpoints and of two real SmolLM2 checkpoints, recipes, bad input, export and chat."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, edgerun_cmd, make_tiny_checkpoint
from converters import merge as mg
from edgerun.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


# --- per-tensor arithmetic ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_task_arithmetic_endpoints_are_exact(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g, dtype=torch.float64).to(dtype)
    model = (base.double() + torch.randn(64, 48, generator=g, dtype=torch.float64) * 3).to(dtype)
    at0 = mg.merge_tensor("w", base, [model], mg.make_spec("task-arithmetic", alpha=0.0))
    at1 = mg.merge_tensor("w", base, [model], mg.make_spec("task-arithmetic", alpha=1.0))
    assert at0.dtype == dtype and torch.equal(at0, base)
    assert torch.equal(at1, model)
    half = mg.merge_tensor("w", base, [model], mg.make_spec("task-arithmetic", alpha=0.5))
    torch.testing.assert_close(half.double(), (base.double() + model.double()) / 2,
                               rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_ties_trim_elect_disjoint_mean_known_result():
    base = torch.zeros(4, dtype=torch.float64)
    d1 = torch.tensor([4.0, -1.0, 2.0, -3.0], dtype=torch.float64)
    d2 = torch.tensor([-2.0, 3.0, 1.0, -5.0], dtype=torch.float64)
    d3 = torch.tensor([1.0, -6.0, 0.5, 2.0], dtype=torch.float64)
    # density 0.5 keeps the two largest |d| of each: [4,0,0,-3], [0,3,0,-5], [0,-6,0,2]
    assert torch.equal(mg.trim(d1, 0.5), torch.tensor([4.0, 0, 0, -3.0], dtype=torch.float64))
    # summed [4,-3,0,-6] -> signs [+,-,+,-]; agreeing means: 4, -6, (none) 0, (-3-5)/2
    out = mg.merge_tensor("t", base, [d1, d2, d3], mg.make_spec("ties", density=0.5, alpha=1.0))
    assert out.tolist() == [4.0, -6.0, 0.0, -4.0]
    scaled = mg.merge_tensor("t", base + 1, [d1 + 1, d2 + 1, d3 + 1], mg.make_spec("ties", density=0.5, alpha=0.5))
    assert scaled.tolist() == [3.0, -2.0, 1.0, -1.0]
    # ceil(0.3 * 10) is 3, not 4 (0.3 * 10 = 3.0000000000000004 in floating point)
    assert int((mg.trim(torch.arange(1.0, 11.0, dtype=torch.float64), 0.3) != 0).sum()) == 3
    # one model: TIES is magnitude-sparsified task arithmetic
    single = mg.merge_tensor("t", base, [d2], mg.make_spec("ties", density=0.25, alpha=1.0))
    assert single.tolist() == [0.0, 0.0, 0.0, -5.0]


def test_ties_elects_signs_on_unweighted_task_vectors_by_default():
    # the bug report's example: weights (1, 0.2), density 1 (nothing trimmed), alpha 1
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([1.0, 1.0, -1.0, 0.5], dtype=torch.float64)
    b = torch.tensor([-3.0, -0.5, 2.0, -0.5], dtype=torch.float64)
    # paper (Yadav et al. 2023, Alg. 1): a + b = [-2, 0.5, 1, 0] -> signs [-, +, +, +] (0 -> +);
    # disjoint mean of the weighted agreeing values: [0.2 * -3, 1 * 1, 0.2 * 2, 1 * 0.5]
    paper = mg.make_spec("ties", density=1.0, alpha=1.0, weights=(1.0, 0.2))
    assert paper.sign_rule == "paper" and paper.as_dict()["sign_rule"] == "paper"
    out = mg.merge_tensor("t", base, [a, b], paper)
    assert torch.sign(out).tolist() == [-1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(out, torch.tensor([-0.6, 1.0, 0.4, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    # weighted: a + 0.2 b = [0.4, 0.9, -0.6, 0.4] -> signs [+, +, -, +]; only a agrees anywhere
    weighted = mg.make_spec("ties", density=1.0, alpha=1.0, weights=(1.0, 0.2), sign_rule="weighted")
    out = mg.merge_tensor("t", base, [a, b], weighted)
    assert torch.sign(out).tolist() == [1.0, 1.0, -1.0, 1.0]
    assert out.tolist() == [1.0, 1.0, -1.0, 0.5]
    # every method that elects signs follows the rule: dare-ties without drops, aim-ties without relaxation
    for method, extra in (("dare-ties", {"drop": 0.0}), ("aim-ties", {"omega": 1.0})):
        for rule, expected in (("paper", [-0.6, 1.0, 0.4, 0.5]), ("weighted", [1.0, 1.0, -1.0, 0.5])):
            spec = mg.make_spec(method, density=1.0, alpha=1.0, weights=(1.0, 0.2), sign_rule=rule, **extra)
            assert spec.as_dict()["sign_rule"] == rule
            torch.testing.assert_close(mg.merge_tensor("t", base, [a, b], spec),
                                       torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    # the trim acts on the unweighted vectors too: density 0.5 keeps [1, 1, -1, 0] and [-3, 0, 2, 0];
    # paper signs of the sum [-2, 1, 1, 0]: [-, +, +, +] -> [0.2 * -3, 1, 0.2 * 2, 0]
    trimmed = mg.merge_tensor("t", base, [a, b], mg.make_spec("ties", density=0.5, alpha=1.0, weights=(1.0, 0.2)))
    torch.testing.assert_close(trimmed, torch.tensor([-0.6, 1.0, 0.4, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)
    # without weights the two rules agree
    assert torch.equal(mg.merge_tensor("t", base, [a, b], mg.make_spec("ties", density=1.0)),
                       mg.merge_tensor("t", base, [a, b], mg.make_spec("ties", density=1.0, sign_rule="weighted")))


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "aim-ties"])
def test_chunked_merge_equals_whole_tensor_formula(method):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50, 30, generator=g, dtype=torch.float64)
    models = [base + torch.randn(50, 30, generator=g, dtype=torch.float64) for _ in range(3)]
    scale = torch.rand(30, generator=g, dtype=torch.float64) if method == "aim-ties" else None
    spec = mg.make_spec(method, **({"density": 0.3} if method != "task-arithmetic" else {}))
    chunked = mg.merge_tensor("w", base, models, spec, channel_scale=scale, chunk_elements=64)
    deltas = [m - base for m in models]
    if method == "task-arithmetic":
        expected = base + spec.alpha * sum(deltas)
    else:
        expected = base + spec.alpha * mg.elect_and_mean([mg.trim(d, 0.3) for d in deltas]) * (
            1 - scale * (1 - spec.omega) if scale is not None else 1)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-12)
    assert torch.equal(chunked, mg.merge_tensor("w", base, models, spec, channel_scale=scale))


def test_dare_keeps_expected_fraction_and_expectation():
    n, drop = 200_000, 0.3
    delta = torch.linspace(-1, 1, n, dtype=torch.float64) + 0.5
    out = mg.dare(delta, drop, mg._generator(7, "w", 0))
    kept = (out != 0).double().mean().item()
    assert abs(kept - (1 - drop)) < 5 * (drop * (1 - drop) / n) ** 0.5          # 5 sigma of the binomial
    assert torch.allclose(out[out != 0], delta[out != 0] / (1 - drop))
    # E[out] = delta: the mean of out/delta over many elements is 1 within 5 sigma
    ratio = (out / delta).mean().item()
    sigma = ((1 / (1 - drop)) ** 2 * (1 - drop) - 1) ** 0.5 / n ** 0.5
    assert abs(ratio - 1) < 5 * sigma
    again = mg.dare(delta, drop, mg._generator(7, "w", 0))
    other = mg.dare(delta, drop, mg._generator(7, "v", 0))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_svd_full_rank_is_task_arithmetic_and_low_rank_is_optimal():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 24, generator=g, dtype=torch.float64)
    model = base + torch.randn(40, 24, generator=g, dtype=torch.float64)
    ta = mg.merge_tensor("w", base, [model], mg.make_spec("task-arithmetic", alpha=0.7))
    full = mg.merge_tensor("w", base, [model], mg.make_spec("svd", alpha=0.7, rank=24))
    torch.testing.assert_close(full, ta, rtol=0, atol=1e-12)
    delta = model - base
    r4 = mg.low_rank(delta, 4)
    s = torch.linalg.svdvals(delta)
    assert torch.linalg.matrix_rank(r4).item() == 4
    assert abs(torch.linalg.norm(delta - r4).item() - s[4:].pow(2).sum().sqrt().item()) < 1e-9  # Eckart-Young
    bias = torch.randn(24, generator=g, dtype=torch.float64)
    assert torch.equal(mg.low_rank(bias, 2), bias)                                  # 1-D deltas stay whole


def test_aim_relaxes_active_input_channels():
    base = torch.zeros(3, 4, dtype=torch.float64)
    model = torch.ones(3, 4, dtype=torch.float64)
    s = torch.tensor([1.0, 0.5, 0.0, 0.25], dtype=torch.float64)
    out = mg.merge_tensor("w", base, [model], mg.make_spec("aim-ties", density=1.0, omega=0.4), channel_scale=s)
    expected = 1 - s * (1 - 0.4)                                   # r_j = 1 - s_j (1 - omega), per input column
    assert torch.allclose(out, expected.expand(3, 4))
    plain = mg.merge_tensor("w", base, [model], mg.make_spec("aim-ties", density=1.0, omega=1.0), channel_scale=s)
    assert torch.equal(plain, model)                               # omega 1: no relaxation, the TIES merge


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "ties", "density": 0.0}, "density must be in (0, 1]"),
    ({"method": "ties", "density": 1.5}, "density must be in (0, 1]"),
    ({"method": "dare", "drop": 1.0}, "drop must be in [0, 1)"),
    ({"method": "task-arithmetic", "alpha": -0.1}, "alpha must be >= 0"),
    ({"method": "aim-ties", "omega": 2.0}, "omega must be in [0, 1]"),
    ({"method": "svd", "rank": 0}, "rank must be a positive integer"),
    ({"method": "ties", "sign_rule": "majority"}, "sign_rule must be one of paper, weighted"),
    ({"method": "task-arithmetic", "sign_rule": "paper"}, "does not use sign_rule"),
    ({"method": "task-arithmetic", "density": 0.2}, "does not use density"),
    ({"method": "slerp"}, "unknown merge method"),
])
def test_invalid_hyper_parameters(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        mg.make_spec(**kwargs)


def test_mergekit_names_and_defaults():
    assert mg.make_spec("dare_ties").as_dict() == {"method": "dare-ties", "alpha": 1.0, "seed": 0, "density": 0.2,
                                                   "drop": 0.3, "sign_rule": "paper"}
    assert mg.make_spec("task_arithmetic").alpha == 0.7
    assert mg.make_spec("aim-ties").omega == 0.4


# --- recipes ------------------------------------------------------------------------------------

def test_recipe_parses_and_reports_bad_fields(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("merge_method: ties\nbase_model: smollm2-135m-instruct\nmodels:\n  - model: ./s2\n"
                    "    parameters: {weight: 0.5}\n  - ./other\nparameters:\n  lambda: 0.8\n  density: 0.3\n"
                    "tokenizer_source: base\ncontext_length: 4096\nseed: 3\n")
    r = mg.load_recipe(good)
    assert r.base == "smollm2-135m-instruct" and r.models == ("./s2", "./other")
    assert (r.spec.method, r.spec.alpha, r.spec.density, r.spec.weights, r.spec.seed) == ("ties", 0.8, 0.3,
                                                                                          (0.5, 1.0), 3)
    assert (r.tokenizer_from, r.context_length) == ("base", 4096)
    assert r.spec.sign_rule == "paper"
    weighted = tmp_path / "w.yaml"
    weighted.write_text("merge_method: dare_ties\nbase_model: b\nmodels: [m]\nparameters: {sign_rule: weighted}\n")
    assert mg.load_recipe(weighted).spec.sign_rule == "weighted"
    assert mg.load_recipe(weighted).as_dict()["spec"]["sign_rule"] == "weighted"


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nbase_model: b\nmodels: [m]\nparameters:\n  densty: 0.3\n", r"line 5: unknown field 'parameters.densty'"),
    ("merge_method: ties\nbase_model: b\nmodels: [m]\nparameters: {density: 0}\n", r"line 4: field 'parameters.density' must be in \(0, 1\]"),
    ("merge_method: ties\nmodels: [m\n", "malformed YAML"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters: 3\n", "must be a mapping"),
    ("merge_method: ties\nbase_model: b\nmodels: [m]\nparameters: {alpha: 1, lambda: 1}\n", "not both"),
    ("merge_method: ties\nbase_model: b\nmodels: [m]\nparameters: {calib_samples: 4}\n",
     r"line 4: unknown field 'parameters.calib_samples'; known: alpha, density, sign_rule, lambda"),
    ("merge_method: ties\nbase_model: b\nmodels: []\n", "non-empty list"),
    ("merge_method: ties\nbase_model: b\nmodels: [m]\nparameters: {sign_rule: sum}\n",
     r"line 4: field 'parameters.sign_rule' must be one of paper, weighted"),
])
def test_bad_recipes(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(UsageError, match=message):
        mg.load_recipe(bad)


# --- streaming merges of checkpoints --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(smollm2_source, tmp_path_factory):
    """Two tiny Llama checkpoints with the same shapes (base, 'fine-tune') and an incompatible third."""
    root = tmp_path_factory.mktemp("merge-tiny")
    base = make_tiny_checkpoint(root / "base", "llama", smollm2_source.path, seed=0)
    tuned = make_tiny_checkpoint(root / "tuned", "llama", smollm2_source.path, seed=1)
    narrow = make_tiny_checkpoint(root / "narrow", "llama", smollm2_source.path, seed=2, intermediate_size=96)
    return base, tuned, narrow


def _reference(base: Path, models: list[Path], spec, scales=None) -> dict[str, torch.Tensor]:
    """The merge computed in memory from whole state dicts (the streaming merge must equal it)."""
    b = load_file(str(base / "model.safetensors"))
    ms = [load_file(str(m / "model.safetensors")) for m in models]
    out = {}
    for name, t in b.items():
        s = (scales or {}).get(name)
        out[name] = mg.merge_tensor(name, t, [m[name] for m in ms], spec,
                                    channel_scale=s if s is not None and s.numel() == t.shape[-1] else None)
    return out


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare", "dare-ties", "svd"])
def test_streaming_merge_equals_in_memory_reference(tiny_pair, tmp_path, method):
    base, tuned, _ = tiny_pair
    spec = mg.make_spec(method, **({"rank": 8} if method == "svd" else {}))
    res = mg.merge(base, [tuned], tmp_path / "m", spec, progress=False, log=lambda m: None)
    got = load_file(str(res.output / "model.safetensors"))
    ref = _reference(base, [tuned], spec)
    assert list(got) == list(load_file(str(base / "model.safetensors")))
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    record = json.loads((res.output / mg.MERGE_META).read_text())
    assert record["merge"]["method"] == method and record["tensors"] == len(ref)
    assert record["seconds"] > 0 and record["peak_rss_bytes"] > 0
    assert (res.output / "tokenizer.json").is_file()


def test_peak_rss_of_a_block_counts_a_short_lived_allocation():
    import numpy as np

    from edgerun.procmem import PeakRSS, peak_rss_bytes

    with PeakRSS() as outer:
        with PeakRSS() as inner:
            a = np.ones(2**24)                      # 128 MiB, touched, then freed before the block ends
            del a
    assert inner.peak_bytes - inner.start_bytes > 100 * 2**20
    assert outer.peak_bytes >= inner.peak_bytes     # the inner block's reset does not hide it from the outer one
    assert peak_rss_bytes() > 0


def test_aim_merge_of_checkpoints(tiny_pair, tmp_path):
    base, tuned, _ = tiny_pair
    scales = mg.aim_channel_scales(base, n_samples=2, seq_len=32)
    w = "model.layers.0.mlp.down_proj.weight"
    assert scales[w].shape == (128,) and scales[w].max().item() == 1.0 and scales[w].min().item() >= 0
    assert "model.layers.1.self_attn.q_proj.weight" in scales and "model.embed_tokens.weight" not in scales
    spec = mg.make_spec("aim-ties", calib_samples=2, calib_len=32)
    res = mg.merge(base, [tuned], tmp_path / "aim", spec, progress=False, log=lambda m: None)
    got = load_file(str(res.output / "model.safetensors"))
    ref = _reference(base, [tuned], spec, scales)
    ties = _reference(base, [tuned], mg.make_spec("ties"))
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=0, atol=1e-6), name
    assert torch.equal(got["model.embed_tokens.weight"], ties["model.embed_tokens.weight"])   # untouched by AIM
    assert not torch.equal(got[w], ties[w])


def test_merge_deterministic_for_a_seed(tiny_pair, tmp_path):
    base, tuned, _ = tiny_pair
    a = mg.merge(base, [tuned], tmp_path / "a", mg.make_spec("dare", seed=5), progress=False, log=lambda m: None)
    b = mg.merge(base, [tuned], tmp_path / "b", mg.make_spec("dare", seed=5), progress=False, log=lambda m: None)
    c = mg.merge(base, [tuned], tmp_path / "c", mg.make_spec("dare", seed=6), progress=False, log=lambda m: None)
    read = [(x.output / "model.safetensors").read_bytes() for x in (a, b, c)]
    assert read[0] == read[1] and read[0] != read[2]


def test_incompatible_models_name_the_first_mismatch(tiny_pair, smollm2_source, tmp_path):
    base, tuned, narrow = tiny_pair
    with pytest.raises(UsageError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape \[(96, 64|64, 96)\]"):
        mg.merge(base, [narrow], tmp_path / "x", mg.make_spec("ties"), progress=False)
    gemma = make_tiny_checkpoint(tmp_path / "gemma", "gemma3", smollm2_source.path)
    with pytest.raises(UsageError, match="different architectures"):
        mg.merge(base, [gemma], tmp_path / "x", mg.make_spec("ties"), progress=False)
    vocab = tmp_path / "vocab"
    shutil.copytree(tuned, vocab)
    cfg = json.loads((vocab / "config.json").read_text())
    (vocab / "config.json").write_text(json.dumps({**cfg, "vocab_size": 50000}))
    with pytest.raises(UsageError, match="vocabulary sizes differ"):
        mg.merge(base, [vocab], tmp_path / "x", mg.make_spec("ties"), progress=False)
    assert not (tmp_path / "x").exists()


def _untied_copy(src: Path, dst: Path, seed: int = 0) -> Path:
    """``src`` (a tied tiny checkpoint) with its own ``lm_head.weight`` (embedding + noise), untied."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = emb + torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)) * 0.1
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    return dst


def test_tied_and_untied_parents_merge_untied(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tuned, _ = tiny_pair
    untied = _untied_copy(tuned, tmp_path / "untied")
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(base / "model.safetensors"))
    spec = mg.make_spec("task-arithmetic")          # alpha 0.7
    b, m = load_file(str(base / "model.safetensors")), load_file(str(untied / "model.safetensors"))
    for first, second, out in ((base, untied, "tu"), (untied, base, "ut")):
        res = mg.merge(first, [second], tmp_path / out, spec, tokenizer_from="base", progress=False,
                       log=lambda msg: None)
        got = load_file(str(res.output / "model.safetensors"))
        assert json.loads((res.output / "config.json").read_text())["tie_word_embeddings"] is False
        assert res.record["untied"] is True and res.record["tie_word_embeddings"] is False
        # the tied parent's head is its embedding; the head merges like any other tensor
        head_first = b["model.embed_tokens.weight"] if first == base else m["lm_head.weight"]
        head_second = m["lm_head.weight"] if second == untied else b["model.embed_tokens.weight"]
        assert torch.equal(got["lm_head.weight"], mg.merge_tensor("lm_head.weight", head_first, [head_second], spec))
        torch.testing.assert_close(got["lm_head.weight"], head_first + 0.7 * (head_second - head_first),
                                   rtol=0, atol=1e-6)
        assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
        name = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(got[name], mg.merge_tensor(name, load_file(str(first / "model.safetensors"))[name],
                                                      [load_file(str(second / "model.safetensors"))[name]], spec))
        model = AutoModelForCausalLM.from_pretrained(res.output, dtype=torch.float32)
        assert model.config.tie_word_embeddings is False
        assert torch.equal(model.lm_head.weight.detach(), got["lm_head.weight"])
        assert torch.equal(model.get_input_embeddings().weight.detach(), got["model.embed_tokens.weight"])
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 9]])).logits
        assert logits.shape == (1, 3, 49152)
    # two tied parents stay tied (no lm_head written)
    res = mg.merge(base, [tuned], tmp_path / "tt", spec, progress=False, log=lambda msg: None)
    assert "lm_head.weight" not in load_file(str(res.output / "model.safetensors")) and res.record["untied"] is False


def test_missing_base_existing_output_and_truncated_input(tiny_pair, tmp_path):
    from edgerun.errors import EdgerunError, ModelFileError

    base, tuned, _ = tiny_pair
    with pytest.raises(EdgerunError):
        mg.merge(tmp_path / "no-such-model", [tuned], tmp_path / "x", mg.make_spec("ties"), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        mg.merge(base, [tuned], tmp_path / "exists", mg.make_spec("ties"), progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tuned, broken)
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupted"):
        mg.merge(base, [broken], tmp_path / "y", mg.make_spec("ties"), progress=False)
    assert not (tmp_path / "y").exists()


def test_context_and_tokenizer_from_the_long_context_parent(tiny_pair, tmp_path):
    base, tuned, _ = tiny_pair
    longer = tmp_path / "longer"
    shutil.copytree(tuned, longer)
    cfg = json.loads((longer / "config.json").read_text())
    (longer / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    res = mg.merge(base, [longer], tmp_path / "m", mg.make_spec("task-arithmetic"), progress=False, log=lambda m: None)
    assert json.loads((res.output / "config.json").read_text())["max_position_embeddings"] == 4096
    assert res.record["config_and_tokenizer_from"] == str(longer)
    res = mg.merge(base, [longer], tmp_path / "n", mg.make_spec("task-arithmetic"), tokenizer_from="base",
                   context_length=2048, progress=False, log=lambda m: None)
    assert json.loads((res.output / "config.json").read_text())["max_position_embeddings"] == 2048
    res = mg.merge(base, [longer], tmp_path / "o", mg.make_spec("task-arithmetic"), tokenizer_from=str(longer) + "/",
                   progress=False, log=lambda m: None)
    assert res.record["config_and_tokenizer_from"] == str(longer)
    with pytest.raises(UsageError, match="not one of the merged models"):
        mg.merge(base, [longer], tmp_path / "p", mg.make_spec("task-arithmetic"), tokenizer_from=str(tmp_path),
                 progress=False)


def test_cli_merge_and_errors(tiny_pair, tmp_path):
    base, tuned, _ = tiny_pair
    out = tmp_path / "cli"
    r = subprocess.run(edgerun_cmd("merge", str(base), str(tuned), "--method", "ties", "--density", "0.5",
                                   "-o", str(out)), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / mg.MERGE_META).read_text())["merge"]["density"] == 0.5
    r = subprocess.run(edgerun_cmd("merge", str(base), str(tuned), "--method", "dare", "--drop", "1",
                                   "-o", str(tmp_path / "bad")), capture_output=True, text=True, env=cli_env(),
                       timeout=300)
    assert r.returncode == 2 and "drop must be in [0, 1)" in r.stderr and "Traceback" not in r.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{tuned}]\n"
                      "parameters: {alpha: 0.0}\n")
    r = subprocess.run(edgerun_cmd("merge", "--recipe", str(recipe), "-o", str(tmp_path / "rec")),
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    merged, original = load_file(str(tmp_path / "rec" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in original)
    aim = tmp_path / "aim.yaml"
    aim.write_text(f"merge_method: aim-ties\nbase_model: {base}\nmodels: [{tuned}]\n"
                   "parameters: {calib_samples: 2, calib_len: 16}\n")
    r = subprocess.run(edgerun_cmd("merge", "--recipe", str(aim), "--seed", "4", "-o", str(tmp_path / "aim")),
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "aim" / mg.MERGE_META).read_text())["merge"]
    assert rec["seed"] == 4 and rec["calibration"]["windows"] == 2 and rec["calibration"]["tokens_per_window"] == 16


# --- two real checkpoints: SmolLM2-135M-Instruct and a short full fine-tune of it ------------------

@pytest.fixture(scope="module")
def smollm2_tuned(smollm2_source, tmp_path_factory):
    """SmolLM2 after 2 steps of the System-2 fine-tune (benchmarks/l2s_system2.py): a real second checkpoint."""
    out = tmp_path_factory.mktemp("l2s") / "system2-2steps"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "l2s_system2.py"), "--steps", "2", "--batch", "2",
                        "--lr", "1e-4", "--warmup", "1", "--out", str(out)], capture_output=True, text=True,
                       env=cli_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "edgerun_train.json").read_text())["steps"] == 2
    return out


def test_real_streaming_merge_exports_to_gguf_and_chats(smollm2_source, smollm2_tuned, tmp_path):
    from converters.export import export

    spec = mg.make_spec("ties")
    res = mg.merge(smollm2_source.path, [smollm2_tuned], tmp_path / "merged", spec, progress=False,
                   log=lambda m: None)
    got = load_file(str(res.output / "model.safetensors"))
    ref = _reference(smollm2_source.path, [smollm2_tuned], spec)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    base = load_file(str(smollm2_source.path / "model.safetensors"))
    w = "model.layers.10.mlp.down_proj.weight"
    changed = (got[w] != base[w]).double().mean().item()
    assert 0.15 < changed <= 0.2 + 1e-3           # TIES kept the top 20% of the (non-zero) task vector
    assert res.record["peak_rss_bytes"] > 0

    gguf = tmp_path / "merged-Q8_0.gguf"
    result = export(str(res.output), quant="Q8_0", out=gguf, verify=False, progress=False, log=lambda m: None)
    assert result.record["bpw"]["file_bpw"] > 8
    r = subprocess.run(edgerun_cmd("chat", str(gguf), "-p", "What is 2 + 3?", "--temperature", "0",
                                   "--max-tokens", "24"), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0


def test_export_merge_pass_manifest(smollm2_tuned, tmp_path):
    from converters.export import export

    out = tmp_path / "ta.gguf"
    result = export("smollm2-135m-instruct", quant="Q8_0", out=out, merge=str(smollm2_tuned),
                    merge_method="task-arithmetic", verify=False, progress=False, log=lambda m: None)
    step = result.record["passes"][0]
    assert step["name"] == "merge" and step["method"] == "task-arithmetic" and step["alpha"] == 0.7
    assert Path(step["checkpoint"]).is_dir() and out.is_file()
    from converters import passes

    carve_then_merge = [passes.make("carve", config="S2A2E8"),
                        passes.make("merge", src="smollm2-135m-instruct", merge_method="ties",
                                    models=[str(smollm2_tuned)])]
    with pytest.raises(UsageError, match="merge takes a dense float checkpoint, not a carved MoE"):
        export("smollm2-135m-instruct", out=tmp_path / "x.gguf", passes=carve_then_merge, verify=False,
               progress=False)
