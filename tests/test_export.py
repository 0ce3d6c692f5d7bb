"""edgerun export to GGUF: exact F32 writer, llama.cpp quantization, effective BPW, manifest, bad input."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters import gguf as gguf_writer
from edgerun.atomic import OutputExistsError
from converters.export import export
from edgerun import catalog
from edgerun.backends.base import SamplingParams
from edgerun.errors import EdgerunError, ModelFileError, UsageError

from conftest import cli_env, edgerun_cmd, make_tiny_checkpoint, write_tiny_gguf

PROMPT = "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"


def _max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (a.max() - a.min()))


def test_f32_gguf_matches_the_source_logits(smollm2_source, smollm2_f32_gguf):
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.backends.torch import TorchBackend

    torch_ref = TorchBackend(smollm2_source.path, n_ctx=256)
    engine = LlamaCppBackend(smollm2_f32_gguf, n_ctx=256, cache_type_k="f32", cache_type_v="f32")
    try:
        tokens = torch_ref.encode_prompt(PROMPT)
        assert engine.encode_prompt(PROMPT) == tokens
        a, b = torch_ref.logits(tokens), engine.logits(tokens)
        assert _max_rel_diff(a, b) < 1e-3
        assert (a.argmax(1) == b.argmax(1)).all()
    finally:
        engine.close()
        torch_ref.close()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_checkpoint_round_trips_exactly(arch, tmp_path, smollm2_source):
    # a random model with non-trivial norms: a missing Q/K permutation or Gemma's +1 would show
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.backends.torch import TorchBackend

    ckpt = make_tiny_checkpoint(tmp_path / arch, arch, smollm2_source.path)
    out = gguf_writer.write_f32(ckpt, tmp_path / f"{arch}.gguf")  # no sidecar: the BPE tokenizer path
    text = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find food."
    torch_ref = TorchBackend(ckpt, n_ctx=128)
    engine = LlamaCppBackend(out, n_ctx=128, cache_type_k="f32", cache_type_v="f32")
    try:
        tokens = torch_ref.tokenize(text)
        assert engine.tokenize(text) == tokens and len(tokens) > 16  # longer than Gemma's sliding window
        assert _max_rel_diff(torch_ref.logits(tokens), engine.logits(tokens)) < 1e-3
    finally:
        engine.close()
        torch_ref.close()


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
@pytest.mark.model_dependent
def test_quantized_exports_answer_a_factual_prompt(exported, quant):
    from edgerun.backends.llamacpp import LlamaCppBackend

    engine = LlamaCppBackend(exported(quant).output, n_ctx=256)
    try:
        reply = engine.complete(engine.encode_prompt(PROMPT), SamplingParams(temperature=0.0, max_tokens=24))
    finally:
        engine.close()
    assert "Berlin" in reply


def test_q8_0_linear_bpw_is_8_5_exactly(exported):
    bpw = exported("Q8_0").record["bpw"]
    assert bpw["linear_tensor_types"] == {"Q8_0": 1.0}
    assert bpw["linear_bpw"] == 8.5  # 34 bytes per block of 32 weights
    assert bpw["file_bpw"] == pytest.approx(bpw["file_bytes"] * 8 / bpw["n_params"])
    assert bpw["output_bpw"] is None  # tied embeddings stay tied


def test_q4_k_m_bpw_follows_the_measured_tensor_type_mix(exported):
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    bpw = exported("Q4_K_M").record["bpw"]
    mix = bpw["linear_tensor_types"]
    assert "Q5_0" in mix  # rows of 576 are not a multiple of 256: llama.cpp fell back from Q4_K
    bits = {t: GGML_QUANT_SIZES[GGMLQuantizationType[t]][1] * 8 / GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]
            for t in mix}
    assert bpw["linear_bpw"] == pytest.approx(sum(share * bits[t] for t, share in mix.items()), rel=1e-4)
    assert 4.5 < bpw["linear_bpw"] < 6.0


def test_manifest_records_source_passes_and_a_verifiable_sha256(exported):
    result = exported("Q8_0")
    record = json.loads(result.manifest.read_text())
    assert result.manifest.name == "smollm2-Q8_0.gguf.manifest.json"
    assert record["source"]["label"] == "Q4_1-dequantized smollm2-135m-instruct"
    assert record["source"]["origin_sha256"] == catalog.get(catalog.DEFAULT_MODEL).sha256
    assert [p["name"] for p in record["passes"]] == ["write-gguf-f32", "quantize"]
    assert record["output"]["sha256"] == catalog.file_sha256(result.output)
    assert record["output"]["size_bytes"] == result.output.stat().st_size
    for key in ("bpw", "tools", "export_seconds", "wall_seconds", "created_utc", "verification"):
        assert key in record
    assert record["tools"]["llama-cpp-python"] == "0.3.36"


def test_token_embedding_type_override_lowers_file_bpw(exported, tmp_path, smollm2_f32_gguf):
    result = export(catalog.DEFAULT_MODEL, quant="Q8_0", out=tmp_path / "q8-emb-q4.gguf", verify=False,
                    token_embedding_type="Q4_0", progress=False, log=lambda m: None)
    bpw, base = result.record["bpw"], exported("Q8_0").record["bpw"]
    assert base["embedding_bpw"] == 8.5 and bpw["embedding_bpw"] == 4.5
    embedding_share = 49152 * 576 / bpw["n_params"]  # the tied embedding is 21% of SmolLM2's weights
    assert base["file_bpw"] - bpw["file_bpw"] == pytest.approx(4.0 * embedding_share, rel=0.01)


def test_export_cli_verifies_with_perplexity_next_to_the_source(smollm2_f32_gguf, tmp_path):
    import subprocess

    out = tmp_path / "q8.gguf"
    r = subprocess.run(edgerun_cmd("export", catalog.DEFAULT_MODEL, "--quant", "Q8_0", "-o", str(out)),
                       capture_output=True, text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("perplexity on held-out wiki"))
    assert "Q4_1-dequantized smollm2-135m-instruct" in line
    ver = json.loads((tmp_path / "q8.gguf.manifest.json").read_text())["verification"]
    src, res = ver["source"]["perplexity"], ver["output"]["perplexity"]
    assert 1 < src < 100 and abs(res / src - 1) < 0.03  # Q8_0 stays within 3% of its F32 source
    assert "llama_model_loader" not in r.stderr  # llama.cpp's per-tensor log is not shown


# --- bad input --------------------------------------------------------------------------------

def test_unknown_quant_type_lists_the_valid_ones():
    with pytest.raises(UsageError, match="unknown quantization type 'Q4_K_X'; valid: F32, F16"):
        export(catalog.DEFAULT_MODEL, quant="Q4_K_X", progress=False)


def test_existing_output_is_refused_without_force(tmp_path):
    out = tmp_path / "taken.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists; pass --force"):
        export(catalog.DEFAULT_MODEL, quant="Q8_0", out=out, progress=False)
    assert out.read_bytes() == b"keep me"


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    p = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(UsageError, match="unsupported architecture gpt2; supported: llama, gemma3"):
        export(str(p), quant="Q8_0", progress=False)


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "edgerun_source.json"))
    return dst


def test_checkpoint_missing_a_tensor_is_refused(tmp_path, smollm2_source):
    from safetensors.numpy import save_file

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    from safetensors.numpy import load_file
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(ModelFileError, match="missing 1 tensors, e.g. model.layers.1.mlp.up_proj.weight"):
        gguf_writer.write_f32(ckpt, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_checkpoint_with_a_mismatched_shape_is_refused(tmp_path, smollm2_source):
    from safetensors.numpy import load_file, save_file

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:, :100].copy()
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"down_proj.weight has shape \(64, 100\), expected \(64, 128\)"):
        gguf_writer.write_f32(ckpt, tmp_path / "out.gguf")


def test_corrupted_safetensors_header_is_refused(tmp_path, smollm2_source):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:20] = b"{not json!!!"
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="not a valid safetensors file: corrupted header"):
        export(str(ckpt), quant="Q8_0", out=tmp_path / "x.gguf", progress=False)


def test_truncated_safetensors_is_refused(tmp_path, smollm2_source):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    p = ckpt / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match="truncated or corrupted"):
        export(str(ckpt), quant="Q8_0", out=tmp_path / "x.gguf", progress=False)


def test_pickled_weights_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelFileError, match="only pickled weights"):
        export(str(d), quant="Q8_0", progress=False)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_or_full_disk_write_leaves_nothing(tmp_path, smollm2_source, failure):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    out = tmp_path / "out" / "model.gguf"

    def boom(done, total):
        if done == 5:
            raise failure if isinstance(failure, OSError) else failure()

    expected = EdgerunError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as e:
        gguf_writer.write_f32(ckpt, out, progress=boom)
    if expected is EdgerunError:
        assert "no space left" in str(e.value)
    assert list(out.parent.iterdir()) == []  # no partial file beside the destination


def test_output_exists_error_from_the_writer(tmp_path, smollm2_source):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    out = tmp_path / "a.gguf"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        gguf_writer.write_f32(ckpt, out)


# --- registered passes: recipes, flags, order, manifest -------------------------------------------

@pytest.fixture
def scratch_home(tmp_path, monkeypatch):
    """A fresh $EDGERUN_HOME whose caches are empty, sharing the real one's models, sources and datasets."""
    real, home = catalog.home(), tmp_path / "home"
    home.mkdir()
    for d in ("models", "sources", "datasets"):
        if (real / d).is_dir():
            (home / d).symlink_to(real / d)
    monkeypatch.setenv("EDGERUN_HOME", str(home))
    return home


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_recipe_passes_run_in_order_and_are_recorded_in_order(tmp_path, scratch_home, smollm2_source):
    from converters import merge as mg
    from edgerun.formats import gguf as gguf_format

    base = make_tiny_checkpoint(tmp_path / "base", "llama", smollm2_source.path, seed=0)
    tuned = make_tiny_checkpoint(tmp_path / "tuned", "llama", smollm2_source.path, seed=1)
    recipe = _recipe(tmp_path, f"passes:\n  - merge:\n      merge_method: task_arithmetic\n      models: [{tuned}]\n"
                               "  - carve: {config: S1A1E4, calib_tokens: 512}\n")
    out = tmp_path / "moe.gguf"
    result = export(str(base), quant="F32", out=out, passes=recipe, verify=False, progress=False, log=lambda m: None)
    steps = result.record["passes"]
    assert [s["name"] for s in steps] == ["merge", "carve", "host-as-granitemoe", "write-gguf-f32"]
    merged, carved, host = (Path(s["checkpoint"]) for s in steps[:3])
    assert steps[0]["method"] == "task-arithmetic" and steps[0]["alpha"] == 0.7      # the declared default
    assert (merged / mg.MERGE_META).is_file() and merged.parent == scratch_home / "cache" / "merged"
    assert carved == scratch_home / "cache" / "carved" / f"{merged.name}-S1A1E4-t512-fitted"  # the carve ran on the merge
    assert steps[1]["config"] == "S1A1E4" and steps[1]["calibration"]["tokens"] == 512
    assert host == carved.with_name(carved.name + "-granite")
    assert json.loads(result.manifest.read_text())["passes"] == steps
    assert gguf_format.validate(out).architecture == "granitemoe"
    # an F32 export is written directly: no F32 GGUF intermediate is cached
    assert steps[3]["cached_at"] is None and not (scratch_home / "cache" / "f32").exists()


@pytest.mark.parametrize("text, message", [
    ("passes:\n  - carve: {config: S1A1E4}\n  - crave: {config: S1A1E4}\n",
     r"r\.yaml, line 3: unknown pass 'crave'; known: merge, carve, finetune, host, prune, wanda, recover, ptq$"),
    ("passes:\n  - carve:\n      config: S1A1E4\n      tokens: 512\n",
     r"r\.yaml, line 4: unknown field 'passes\[0\]\.carve\.tokens'; known: config, calib_tokens, dataset, router, atopk, domains, domain_weight$"),
    ("passes:\n  - finetune:\n      minutes: soon\n",
     r"r\.yaml, line 3: field 'passes\[0\]\.finetune\.minutes' must be a number, got 'soon'$"),
    ("passes:\n  - finetune: {lora: 1}\n", r"r\.yaml, line 2: field 'passes\[0\]\.finetune\.lora' must be true or false"),
    ("passes:\n  - ptq: {bits: 5}\n", r"r\.yaml, line 2: field 'passes\[0\]\.ptq\.bits' must be one of 2, 3, 4, 8, got 5$"),
    ("passes:\n  - carve: {config: S1A1}\n", r"r\.yaml, line 2: field 'passes\[0\]\.carve\.config' must be a CMoE"),
    ("passes:\n  - merge: {merge_method: ties, models: [m], parameters: {densty: 0.3}}\n",
     r"r\.yaml, line 2: unknown field 'passes\[0\]\.merge\.parameters\.densty'; known: alpha, density, sign_rule, lambda$"),
    ("passes:\n  - {carve: {config: S1A1E4}, ptq: {}}\n", r"r\.yaml, line 2: field 'passes\[0\]' must be one pass"),
    ("passes: []\n", r"r\.yaml, line 1: field 'passes' must be a non-empty list"),
    ("steps:\n  - carve: {config: S1A1E4}\n", r"r\.yaml, line 1: unknown field 'steps'; known: passes$"),
])
def test_bad_recipe_is_a_one_line_error_naming_the_line(tmp_path, text, message):
    from converters import passes

    with pytest.raises(UsageError, match=message) as e:
        passes.load(_recipe(tmp_path, text), src="smollm2-135m-instruct")
    assert "\n" not in str(e.value)


def test_declared_defaults_apply(tmp_path):
    from converters import passes

    chain = passes.load(_recipe(tmp_path, "passes:\n  - merge: {merge_method: ties, models: [m]}\n"
                                          "  - carve: {config: s2a2e8}\n  - finetune\n  - ptq: {method: rtn}\n"),
                        src="smollm2-135m-instruct")
    assert [p.name for p in chain] == ["merge", "carve", "finetune", "ptq"]
    spec = chain[0].recipe.spec
    assert (spec.method, spec.alpha, spec.density, spec.seed) == ("ties", 1.0, 0.2, 0)
    assert chain[1].values == {"config": "s2a2e8", "calib_tokens": 16384, "dataset": "wiki", "router": "fitted",
                              "atopk": 10, "domains": None, "domain_weight": 0.5}
    assert chain[2].values == {"minutes": 3.0, "steps": None, "lora": True, "dataset": "wiki"}
    assert chain[3].values == {"method": "rtn", "bits": 4, "group_size": 64, "calib_tokens": 8192}
    assert chain[3].tag() == "rtn-w4g64"


def test_flags_build_the_same_chain_as_a_recipe(tmp_path):
    from converters import passes

    flags = passes.from_flags("smollm2-135m-instruct", carve="S2A2E8", calib_tokens=2048, finetune_minutes=2,
                              prune_experts="math:2/4")
    recipe = passes.load(_recipe(tmp_path, "passes:\n  - carve: {config: S2A2E8, calib_tokens: 2048}\n"
                                           "  - finetune: {minutes: 2}\n  - prune: {task: math, keep: 2/4}\n"))
    assert [p.as_dict() for p in flags] == [p.as_dict() for p in recipe]
    assert flags[0].origin == "--carve" and recipe[0].origin.endswith("r.yaml, line 2 (passes[0].carve)")
    # the old spellings: --carve-tokens, and --calib-samples in PTQ windows of 512 tokens
    old = passes.from_flags("m", carve="S2A2E8", carve_tokens=2048)
    assert old[0].values["calib_tokens"] == 2048
    assert passes.from_flags("m", ptq="gptq", calib_samples=3)[0].values["calib_tokens"] == 3 * 512
    with pytest.raises(UsageError, match="--finetune: minutes must be positive"):
        passes.from_flags("m", carve="S2A2E8", finetune_minutes=0)


def test_cli_accepts_the_old_calibration_spellings():
    from edgerun.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["export", "m", "--carve-tokens", "2048"]).calib_tokens == 2048
    assert parse(["export", "m", "--calib-tokens", "1024"]).calib_tokens == 1024
    assert parse(["export", "m", "--calib-samples", "3"]).calib_samples == 3
    assert parse(["carve", "m", "--config", "S2A2E8", "--tokens", "512"]).calib_tokens == 512
    assert parse(["carve", "m", "--config", "S2A2E8"]).calib_tokens == 16384
    assert parse(["experts", "calibrate", "m", "--tokens", "100"]).calib_tokens == 100
    assert parse(["kv", "tune", "m", "-o", "x"]).calib_tokens == 1024


def test_pass_order_is_checked_before_anything_runs(tmp_path, smollm2_source):
    from converters import passes

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    out = tmp_path / "x.gguf"
    with pytest.raises(UsageError, match="--finetune: finetune takes a carved MoE .*, not a dense float checkpoint; "
                                         "add --carve"):
        export(str(ckpt), out=out, finetune_minutes=1, progress=False)
    with pytest.raises(UsageError, match=r"--prune-experts: prune takes the engine host of a carved MoE"):
        export(str(ckpt), out=out, prune_experts="math:2/4", progress=False)
    recipe = _recipe(tmp_path, "passes:\n  - carve: {config: S1A1E4}\n  - ptq: {method: rtn}\n")
    with pytest.raises(UsageError, match=r"r\.yaml, line 3 \(passes\[1\]\.ptq\): ptq takes a dense float checkpoint"):
        export(str(ckpt), to="hf", out=tmp_path / "q", passes=recipe, progress=False)
    with pytest.raises(UsageError, match="--ptq writes a Hugging Face checkpoint"):
        export(str(ckpt), out=out, ptq="rtn", progress=False)
    with pytest.raises(UsageError, match="either as a recipe or as flags, not both"):
        export(str(ckpt), out=out, passes=recipe, carve="S1A1E4", progress=False)
    assert not out.exists() and not (tmp_path / "q").exists()
    assert passes.plan(passes.from_flags("m", carve="S1A1E4"), "dense", writer="hf")[1] == "carved"


def test_cli_export_bad_recipe_prints_one_line(tmp_path):
    import subprocess

    recipe = _recipe(tmp_path, "passes:\n  - carve: {config: S1A1E4, tokens: 512}\n")
    r = subprocess.run(edgerun_cmd("export", catalog.DEFAULT_MODEL, "--recipe", str(recipe), "-o",
                                   str(tmp_path / "x.gguf")), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: {recipe}, line 2: unknown field 'passes[0].carve.tokens'; "
                                                 "known: config, calib_tokens, dataset, router, atopk, domains, domain_weight")


def _pad_vocab(src: Path, dst: Path, extra: int) -> Path:
    """A copy of checkpoint ``src`` with ``extra`` zero embedding rows (and lm_head rows if untied), as
    ``resize_token_embeddings(pad_to_multiple_of=...)`` leaves it; the tokenizer is unchanged."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("edgerun_source.json"))
    for f in dst.glob("*.safetensors"):
        weights = load_file(f)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in weights:
                w = weights[name]
                weights[name] = np.concatenate([w, np.zeros((extra, w.shape[1]), dtype=w.dtype)])
        save_file(weights, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] += extra
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_padded_vocabulary_exports_with_placeholder_tokens_and_answers_like_the_unpadded_model(
        tmp_path, smollm2_source, smollm2_f32_gguf):
    from edgerun.backends.llamacpp import LlamaCppBackend

    ckpt = _pad_vocab(smollm2_source.path, tmp_path / "padded", 64)       # 49,216 rows, 49,152 tokens
    result = export(str(ckpt), quant="F32", out=tmp_path / "padded.gguf", verify=False, progress=False,
                    log=lambda m: None)
    assert result.record["vocab_padding"] == {"tokenizer_tokens": 49152, "embedding_rows": 49216,
                                              "placeholder_tokens": 64, "placeholder": "[PAD<id>]",
                                              "token_type": "UNUSED"}
    ref = LlamaCppBackend(smollm2_f32_gguf, n_ctx=128, cache_type_k="f32", cache_type_v="f32")
    padded = LlamaCppBackend(result.output, n_ctx=128, cache_type_k="f32", cache_type_v="f32")
    try:
        assert padded.llm.n_vocab() == 49216 and ref.llm.n_vocab() == 49152
        tokens = ref.encode_prompt(PROMPT)
        assert padded.encode_prompt(PROMPT) == tokens
        a, b = ref.logits(tokens)[-1], padded.logits(tokens)[-1]
        assert _max_rel_diff(a, b[:49152]) < 1e-5
        assert a.argmax() == b.argmax()
        assert padded.detokenize([49152]) == ""                          # unused: never rendered
    finally:
        padded.close()
        ref.close()
    from gguf import GGUFReader, TokenType

    fields = GGUFReader(result.output).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(types) == 49216
    assert tokens[49152] == "[PAD49152]" and tokens[-1] == "[PAD49215]"
    assert set(types[49152:]) == {int(TokenType.UNUSED)} and TokenType.UNUSED not in types[:49152]
    assert gguf_writer.vocab_padding(smollm2_source.path) is None     # the unpadded source needs none


def test_padded_vocabulary_of_a_plain_bpe_checkpoint_is_padded_too(tmp_path, smollm2_source):
    from edgerun.backends.llamacpp import LlamaCppBackend

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    padded = _pad_vocab(ckpt, tmp_path / "tiny-padded", 64)
    assert gguf_writer.vocab_padding(padded)["placeholder_tokens"] == 64
    a_path = gguf_writer.write_f32(ckpt, tmp_path / "a.gguf")
    b_path = gguf_writer.write_f32(padded, tmp_path / "b.gguf")
    a = LlamaCppBackend(a_path, n_ctx=64, cache_type_k="f32", cache_type_v="f32")
    b = LlamaCppBackend(b_path, n_ctx=64, cache_type_k="f32", cache_type_v="f32")
    try:
        tokens = a.tokenize("The quick brown fox")
        assert b.tokenize("The quick brown fox") == tokens and b.llm.n_vocab() == 49216
        assert _max_rel_diff(a.logits(tokens), b.logits(tokens)[:, :49152]) < 1e-5
    finally:
        a.close()
        b.close()


def test_fewer_embedding_rows_than_tokens_is_refused(tmp_path, smollm2_source):
    from safetensors.numpy import load_file, save_file

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", smollm2_source.path)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:49088].copy()
    save_file(weights, ckpt / "model.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = 49088
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="tokenizer has 49152 tokens but the embedding only 49088 rows"):
        gguf_writer.write_f32(ckpt, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_q2_k_manifest_records_fallbacks_and_warns(tmp_path, smollm2_f32_gguf):
    lines = []
    result = export(catalog.DEFAULT_MODEL, quant="Q2_K", out=tmp_path / "q2k.gguf", verify=False, progress=False,
                    log=lines.append)
    record = json.loads(result.manifest.read_text())
    assert record["tied_embeddings"] is True
    assert record["vocab_padding"] is None
    assert len(record["tensor_types"]) == 30 * 9 + 2 and "output.weight" not in record["tensor_types"]
    fb = record["fallbacks"]
    # SmolLM2: every projection but ffn_down (rows of 1536) has rows of 576, not a multiple of 256
    assert fb["count"] == 30 * 6 and fb["share"] == pytest.approx(0.75)
    assert all(".ffn_down." not in name for name in fb["tensors"])
    assert all(record["tensor_types"][name] not in fb["requested_family"] for name in fb["tensors"])
    assert set(fb["types"]) <= {"Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}
    assert record["warning"].startswith("Q2_K requested: 75% of linear weights are ")
    assert record["warning"].endswith("(rows of 576 are not a multiple of 256)")
    assert f"warning: {record['warning']}" in lines


def test_q8_0_manifest_records_no_fallbacks(exported):
    record = json.loads(exported("Q8_0").manifest.read_text())
    assert record["tied_embeddings"] is True
    assert record["fallbacks"]["count"] == 0 and record["fallbacks"]["tensors"] == []
    assert record["warning"] is None
    assert set(record["tensor_types"].values()) == {"Q8_0", "F32"}   # norms stay F32
