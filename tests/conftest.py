"""Shared fixtures. The real default model is pulled once into EDGERUN_HOME (default: the user cache).

Set EDGERUN_HOME to share the cache between CI steps; nothing here downloads twice.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgerun import catalog

# Fixtures that pull the real model, load an engine on it, dequantize/convert/carve/export/quantize it,
# or train: any test using one of them (directly or through another fixture) is marked `slow`, so
# `pytest -m "not slow"` is the fast tier. Defined here and in the test modules named in the comments.
# Tests that reach the real model without a fixture (the `edgerun` CLI on the catalog model, a direct
# `edgerun.load()` of the default model), and tests taking more than ~3 s on their own, carry
# `@pytest.mark.slow` themselves.
SLOW_FIXTURES = frozenset({
    # here: the real model, an engine on it, and its conversions
    "default_model_path", "llama_backend", "greedy_session",
    "smollm2_source", "smollm2_f32_gguf", "exported", "onnx_exported",
    "swept",                                   # test_bench: a sweep over GGUF and ONNX exports
    "tiny_llama", "tiny_hosts",                # test_carve: a carve and its Granite hosts
    "terminal",                                # test_cli: `edgerun chat` on the real model in a pty
    "tiny", "smollm2_torch",                   # test_kv: tiny checkpoint (real tokenizer), torch engine
    "tiny_pair", "smollm2_tuned",              # test_merge: tiny checkpoints, a 2-step fine-tune
    "w4_checkpoint",                           # test_mixpe: PTQ of the real model
    "tiny_moe",                                # test_premoe: carve + Granite host
    "real_layer_activations",                  # test_ptq: the real model's calibration activations
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path of the default chat model (SmolLM2-135M-Instruct Q4_1), pulled on first use."""
    return catalog.pull(catalog.DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def llama_backend(default_model_path):
    """One llama.cpp instance of the default model shared by the chat tests (2048-token context)."""
    from edgerun.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(default_model_path, n_ctx=2048, seed=0)
    yield backend
    backend.close()


@pytest.fixture
def greedy_session(llama_backend):
    """A fresh greedy (temperature 0) chat session on the shared default-model backend."""
    from edgerun import templates
    from edgerun.backends.base import SamplingParams
    from edgerun.session import Session

    special = llama_backend.special_tokens
    template = templates.choose(llama_backend.info.chat_template, None, "default",
                                special["bos_token"], special["eos_token"])
    return Session(llama_backend, template, sampling=SamplingParams(temperature=0.0, max_tokens=48, seed=0))


def cli_env(**extra) -> dict:
    """Environment for running the ``edgerun`` CLI in a subprocess (same cache as the tests)."""
    env = dict(os.environ)
    env["EDGERUN_HOME"] = str(catalog.home())
    env.update(extra)
    return env


def edgerun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgerun.cli", *args]


def write_tiny_gguf(path: Path, chat_template: str | None = None, arch: str = "llama",
                    n_tensors: int = 2) -> Path:
    """A small, valid GGUF file: metadata of a Llama-like model and ``n_tensors`` F32 tensors of 32x4."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_head_count(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for i in range(n_tensors):
        w.add_tensor(f"t{i}.weight", np.arange(128, dtype=np.float32).reshape(4, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_wheel(directory: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel carrying ``members`` (path -> bytes), servable to ``pip download --find-links``."""
    dist = package.replace("-", "_")
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        info = f"{dist}-{version}.dist-info"
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture(scope="session")
def smollm2_source(default_model_path):
    """The default model dequantized into a float32 HF checkpoint (cached under EDGERUN_HOME)."""
    from converters.source import open_source

    return open_source(catalog.DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def smollm2_f32_gguf(smollm2_source) -> Path:
    """The source written as an F32 GGUF by edgerun's writer (cached under EDGERUN_HOME)."""
    from converters.export import f32_cache

    return f32_cache(smollm2_source)


@pytest.fixture(scope="session")
def exported(smollm2_f32_gguf, tmp_path_factory):
    """Exports of the default model by quant type, made once per session: ``exported("Q8_0")``."""
    from converters.export import export

    out_dir = tmp_path_factory.mktemp("exports")
    made = {}

    def get(quant: str):
        if quant not in made:
            made[quant] = export(catalog.DEFAULT_MODEL, quant=quant, out=out_dir / f"smollm2-{quant}.gguf",
                                 verify=False, progress=False, log=lambda m: None)
        return made[quant]

    return get


def make_tiny_checkpoint(directory: Path, arch: str, tokenizer_dir: Path, seed: int = 0,
                         intermediate_size: int = 128) -> Path:
    """A tiny random Llama or Gemma 3 checkpoint (hidden 64, 2 layers) using the tokenizer in ``tokenizer_dir``."""
    import torch
    from transformers import (AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
                  num_attention_heads=4,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0, **common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_key_value_heads=1, head_dim=32, sliding_window=16,
                                                   query_pre_attn_scalar=32, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # make norms non-trivial so a missing +1 or permutation shows
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def onnx_exported(smollm2_f32_gguf, tmp_path_factory):
    """ONNX exports of the default model by precision, made once per session: ``onnx_exported("int4")``."""
    from converters.export import export

    out_dir = tmp_path_factory.mktemp("onnx")
    made = {}

    def get(precision: str):
        if precision not in made:
            made[precision] = export(catalog.DEFAULT_MODEL, to="onnx", quant=precision, out=out_dir / precision,
                                     verify=False, progress=False, log=lambda m: None)
        return made[precision]

    return get
