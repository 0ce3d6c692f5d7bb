"""ONNX export (onnxruntime-genai builder, quantize_dynamic) and the ONNX backend, on the real default model."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from edgerun.backends.base import SamplingParams
from edgerun.errors import ModelFileError, UsageError

from conftest import cli_env, edgerun_cmd

PROMPT = "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"


def test_fp32_onnx_matches_torch_logits(onnx_exported, smollm2_source):
    from edgerun.backends.onnx import OnnxBackend
    from edgerun.backends.torch import TorchBackend

    torch_ref = TorchBackend(smollm2_source.path, n_ctx=256)
    engine = OnnxBackend(onnx_exported("fp32").output, n_ctx=256)
    tokens = torch_ref.encode_prompt(PROMPT)
    assert engine.encode_prompt(PROMPT) == tokens
    a, b = torch_ref.logits(tokens), engine.logits(tokens)
    assert np.abs(a - b).max() / (a.max() - a.min()) < 1e-3
    assert (a.argmax(1) == b.argmax(1)).all()


@pytest.mark.parametrize("precision", ["int4", "int8"])
@pytest.mark.model_dependent
def test_quantized_onnx_answers_and_detokenizes_cleanly(onnx_exported, precision):
    from edgerun.backends.onnx import OnnxBackend

    engine = OnnxBackend(onnx_exported(precision).output, n_ctx=256)
    tokens = engine.encode_prompt(PROMPT)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    streamed = "".join(engine.stream(tokens, params))
    assert "Berlin" in streamed
    assert "Ġ" not in streamed and "Ċ" not in streamed  # no byte-level BPE markers leak into text
    assert engine.complete(tokens, params) == streamed  # the non-streaming path agrees
    assert engine.last_stats.generated_tokens > 3


def test_onnx_bpw_from_initializers(onnx_exported):
    int4 = onnx_exported("int4").record["bpw"]
    assert int4["linear_tensor_types"] == {"int4-b32": 1.0}
    assert int4["linear_bpw"] == pytest.approx(5.0)  # 4 bits + one fp32 scale per 32 weights
    fp32 = onnx_exported("fp32").record["bpw"]
    assert fp32["linear_bpw"] == pytest.approx(32.0)
    assert fp32["n_params"] == 134_515_008  # tied embedding counted once, as in the source


@pytest.mark.model_dependent
def test_chat_cli_runs_an_onnx_directory(onnx_exported):
    r = subprocess.run(edgerun_cmd("chat", str(onnx_exported("int4").output), "-p", "What is the capital of Japan?",
                                   "--temperature", "0", "--max-tokens", "24"),
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Tokyo" in r.stdout


def test_truncated_external_data_is_refused(onnx_exported, tmp_path):
    import shutil

    src = onnx_exported("int4").output
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    from edgerun.backends.onnx import OnnxBackend

    with pytest.raises(ModelFileError, match="model.onnx.data is truncated"):
        OnnxBackend(broken)


def test_directory_without_genai_config_is_refused(tmp_path):
    from edgerun.backends.onnx import OnnxBackend

    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelFileError, match="not an onnxruntime-genai model"):
        OnnxBackend(tmp_path)


def test_bad_onnx_options_are_refused():
    from converters.export import export

    with pytest.raises(UsageError, match="unknown ONNX precision 'int3'; valid: fp32, int8, int4"):
        export("smollm2-135m-instruct", to="onnx", quant="int3", progress=False)
    with pytest.raises(UsageError, match="unsupported int4 block size 48"):
        export("smollm2-135m-instruct", to="onnx", quant="int4", block_size=48, progress=False)


def test_gemma3_onnx_export_is_refused_with_a_clear_error(tmp_path, smollm2_source):
    """The builder mis-reads transformers 5's Gemma 3 config (measured: fp32 graph at 2x the perplexity):
    refused before anything is written, pointing at GGUF."""
    from conftest import make_tiny_checkpoint
    from converters.onnx import write_onnx

    ckpt = make_tiny_checkpoint(tmp_path / "gemma3", "gemma3", smollm2_source.path)
    with pytest.raises(UsageError, match="ONNX export of Gemma 3 is not supported yet.*--to gguf"):
        write_onnx(ckpt, tmp_path / "onnx", precision="fp32")
    assert not (tmp_path / "onnx").exists()


def test_onnx_kv_bytes_are_what_the_generator_allocated(onnx_exported):
    """Not context x bytes per token: the kept generator's capacity (onnxruntime-genai's max_length)."""
    from edgerun.backends.base import SamplingParams
    from edgerun.backends.onnx import OnnxBackend

    b = OnnxBackend(onnx_exported("int4").output, n_ctx=4096)
    try:
        assert b.memory().kv_cache_bytes == 0
        prompt = b.tokenize("The capital of France is")
        b.complete(prompt, SamplingParams(temperature=0.0, max_tokens=8))
        per_token = 2 * 30 * 3 * 64 * 4                      # SmolLM2: layers x KV heads x head dim, float32
        assert b.memory().kv_cache_bytes == per_token * 512  # the smallest capacity, far below 4096
        b.complete(prompt, SamplingParams(temperature=0.0, max_tokens=1000))
        assert b.memory().kv_cache_bytes == per_token * ((len(prompt) + 1000) * 3 // 2)
        b.reset()
        assert b.memory().kv_cache_bytes == 0
    finally:
        b.close()


def test_onnx_reuses_the_kv_cache_across_turns_with_the_same_replies(onnx_exported):
    """Turn 2 prefills only the new tokens and replies as a fresh generator does; a history cut at the head
    and /clear prefill everything again."""
    import edgerun

    path = onnx_exported("int4").output
    s = edgerun.load(str(path), temperature=0.0, max_tokens=24, n_ctx=1024)
    fresh = edgerun.load(str(path), temperature=0.0, max_tokens=24, n_ctx=1024)
    try:
        first = s.chat("What is the capital of France?", stream=False)
        assert s.stats.prefill_tokens == s.stats.prompt_tokens
        second = "".join(s.chat("And of Italy?"))
        st = s.stats
        assert 0 < st.prefill_tokens < st.prompt_tokens // 2, st
        fresh.messages = list(s.messages[:-2])
        again = fresh.chat("And of Italy?", stream=False)
        assert fresh.stats.prefill_tokens == fresh.stats.prompt_tokens == st.prompt_tokens
        assert again == second and first
        s.clear()
        s.chat("Hello", stream=False)
        assert s.stats.prefill_tokens == s.stats.prompt_tokens
    finally:
        s.backend.close()
        fresh.backend.close()
