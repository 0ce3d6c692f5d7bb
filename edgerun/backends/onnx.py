"""ONNX models through onnxruntime-genai: its C++ generation loop, KV cache and tokenizer.

A model directory is what ``edgerun export --to onnx`` (onnxruntime-genai's builder) writes:
``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json`` and the tokenizer files. The chat
template comes from ``chat_template.jinja`` or ``tokenizer_config.json`` in that directory.
Across turns the backend keeps its generator and reuses the KV cache of the longest prefix the new
prompt shares with what the generator holds (``rewind_to`` the prefix, append the rest), as the
llama.cpp backend does; a history cut at the head, ``/clear`` (:meth:`OnnxBackend.reset`), other
sampling settings or a prompt that outgrows the generator's capacity build a new generator. Greedy
replies are the same as a fresh generator's; a sampled reply continues the generator's random stream
(a seeded conversation replays exactly, but turn 2 is not the reply a fresh generator would sample).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime_genai as og
import psutil

from edgerun import isolate
from edgerun.backends.base import (Backend, GenerationStats, MemoryInfo, SamplingParams, physical_cores,
                                   reply_budget)
from edgerun.errors import BackendError, ModelFileError

DEFAULT_CTX = 4096


def validate_model_dir(path: Path) -> dict:
    """Check an onnxruntime-genai model directory before the runtime opens it; return its genai_config.

    Raises:
        ModelFileError: missing or malformed ``genai_config.json``, missing model or external data
            file, or an external data file shorter than the graph says.
    """
    if not path.is_dir():
        raise ModelFileError(f"{path} is not an ONNX model directory")
    cfg_path = path / "genai_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        decoder = cfg["model"]["decoder"]
        model_file = path / decoder["filename"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path} is not an onnxruntime-genai model ({cfg_path.name}: {e}); "
                             "export one with 'edgerun export --to onnx'") from None
    if not model_file.is_file():
        raise ModelFileError(f"{model_file} is missing")
    _check_external_data(model_file)
    return cfg


def _check_external_data(model_file: Path) -> None:
    """Every external-data extent named in the graph must fit its file (onnxruntime reads them blindly)."""
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError/ValueError on a corrupted protobuf
        raise ModelFileError(f"{model_file} is corrupted ({type(e).__name__}); export it again") from None
    sizes: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        location = info.get("location", "")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except (TypeError, ValueError):
            offset = length = -1
        if not isinstance(location, str) or not location or offset < 0 or length < 0:
            raise ModelFileError(f"{model_file} is corrupted (external data of tensor {init.name!r}: "
                                 f"location {location!r}, offset/length not non-negative integers); export it again")
        loc = model_file.parent / location
        if str(loc) not in sizes:
            if not loc.is_file():
                raise ModelFileError(f"{loc} (weights of {model_file.name}) is missing")
            sizes[str(loc)] = loc.stat().st_size
        end = offset + length
        if end > sizes[str(loc)]:
            raise ModelFileError(f"{loc} is truncated: {init.name!r} needs bytes up to {end}, "
                                 f"the file has {sizes[str(loc)]}")


class OnnxBackend(Backend):
    """An onnxruntime-genai model directory.

    Args:
        path: model directory.
        n_ctx: context window in tokens (default min(4096, the model's context_length)).
        threads: intra-op threads (default: physical cores).
        seed: default sampling seed.

    Raises:
        ModelFileError: not a valid model directory.
        BackendError: onnxruntime-genai refuses the model.
    """

    name = "onnx"

    def __init__(self, path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 seed: int | None = None, **_ignored):
        self.path = Path(path)
        self._text_tokenizer = None
        self._gen = None               # the generator kept across calls (its KV cache), see _generator_for
        self._gen_key: tuple = ()
        self._gen_capacity = 0         # tokens its KV cache holds (its max_length): what memory() reports
        self.genai_config = validate_model_dir(self.path)
        isolate.first_open("onnx", self.path)   # a graph that crashes onnxruntime: a one-line error
        self.threads = int(threads) if threads else physical_cores()
        self._og = og
        try:
            config = og.Config(str(self.path))
            config.clear_providers()
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as e:  # onnxruntime-genai raises RuntimeError/OrtException
            raise BackendError(f"onnxruntime-genai could not load {self.path}: {e}") from None
        m = self.genai_config["model"]
        self.n_ctx = int(n_ctx) if n_ctx else min(DEFAULT_CTX, int(m.get("context_length", DEFAULT_CTX)))
        self.seed = seed
        self._bos = m.get("bos_token_id")
        eos = m.get("eos_token_id")
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        tok_cfg = self._tokenizer_config()
        self._add_bos = bool(tok_cfg.get("add_bos_token", False))
        self._special = {"bos_token": _token_text(tok_cfg.get("bos_token")),
                         "eos_token": _token_text(tok_cfg.get("eos_token"))}
        self.last_stats = GenerationStats(context_size=self.n_ctx)

    def _tokenizer_config(self) -> dict:
        p = self.path / "tokenizer_config.json"
        try:
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        except (OSError, ValueError):
            return {}

    @property
    def chat_template(self) -> str | None:
        """The model directory's chat template (``chat_template.jinja`` or tokenizer_config.json)."""
        p = self.path / "chat_template.jinja"
        if p.is_file():
            return p.read_text(encoding="utf-8")
        t = self._tokenizer_config().get("chat_template")
        return t if isinstance(t, str) else None

    # --- tokens -------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        ids = [int(t) for t in self.tokenizer.encode(text)] if text else []
        if self._add_bos and self._bos is not None and (not ids or ids[0] != self._bos):
            ids.insert(0, int(self._bos))
        return ids

    def tokenize_markup(self, text: str) -> list[int]:
        """Chat-template markup: onnxruntime-genai's tokenizer, which parses special-token texts."""
        ids = [int(t) for t in self.tokenizer.encode(text)] if text else []
        if ids and self._bos is not None and ids[0] == self._bos and not text.startswith(self._special["bos_token"] or "\0"):
            ids = ids[1:]  # the runtime's tokenizer may add BOS itself
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Plain text, special-token texts not parsed: onnxruntime-genai's tokenizer always parses them, so
        this reads the directory's ``tokenizer.json`` with Hugging Face ``tokenizers`` (the same vocabulary
        and merges) with ``encode_special_tokens`` on."""
        if not text:
            return []
        if self._text_tokenizer is None:
            tokenizer_json = self.path / "tokenizer.json"
            if not tokenizer_json.is_file():
                return self.tokenize_markup(text)   # no tokenizer.json: the runtime's tokenizer is all there is
            from tokenizers import Tokenizer  # ships with transformers; only ONNX plain-text tokenization needs it

            self._text_tokenizer = Tokenizer.from_file(str(tokenizer_json))
            self._text_tokenizer.encode_special_tokens = True
        return list(self._text_tokenizer.encode(text, add_special_tokens=False).ids)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray(list(tokens), dtype=np.int32))

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special)

    # --- generation ---------------------------------------------------------------------------

    def _generator(self, max_length: int, sampling: SamplingParams):
        """A new onnxruntime-genai generator whose KV cache holds ``max_length`` tokens (allocated up front)."""
        og = self._og
        params = og.GeneratorParams(self.model)
        opts = dict(max_length=max_length, min_length=max_length if sampling.ignore_eos else 0)
        if sampling.temperature > 0:
            opts.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                        random_seed=sampling.seed if sampling.seed is not None else (self.seed or 0))
        else:
            opts.update(do_sample=False)
        params.set_search_options(**opts)
        return og.Generator(self.model, params)

    def _generator_for(self, prompt: list[int], max_new: int, sampling: SamplingParams) -> tuple[object, int]:
        """The generator for this call and how many leading prompt tokens its KV cache already holds.

        The kept generator is rewound to the longest prefix it shares with ``prompt`` (at least one prompt
        token is left to evaluate, for the next-token logits) when its sampling settings are the same and
        its capacity holds the prompt and the reply budget; otherwise a new one is built, with room for
        half as much again (at most the context) so that the next turns fit.
        """
        key = (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed, sampling.ignore_eos)
        need = len(prompt) + max_new
        gen = self._gen
        if gen is not None and key == self._gen_key and need <= self._gen_capacity:
            held = [int(t) for t in gen.get_sequence(0)]
            k = 0
            limit = min(len(held), len(prompt) - 1)
            while k < limit and held[k] == prompt[k]:
                k += 1
            if k > 0:
                try:
                    gen.rewind_to(k)
                    return gen, k
                except Exception:  # an engine that cannot rewind this generator: build a new one
                    pass
        self._gen = None  # free the old cache before allocating the new one
        capacity = min(self.n_ctx, max(need, need + need // 2, 512))
        self._gen, self._gen_key, self._gen_capacity = self._generator(capacity, sampling), key, capacity
        return self._gen, 0

    def reset(self) -> None:
        """Drop the kept generator and its KV cache: the next call prefills every prompt token."""
        self._gen, self._gen_key, self._gen_capacity = None, (), 0

    def _run(self, prompt_tokens: Sequence[int], sampling: SamplingParams, stream: bool) -> Iterator[str]:
        prompt = [int(t) for t in prompt_tokens]
        max_new = reply_budget(self.n_ctx, len(prompt), sampling.max_tokens)
        gen, cached = self._generator_for(prompt, max_new, sampling)
        stats = GenerationStats(prompt_tokens=len(prompt), prefill_tokens=len(prompt) - cached,
                                context_size=self.n_ctx)
        decoder = self.tokenizer.create_stream() if stream else None
        generated: list[int] = []
        finish = "interrupted"
        t0 = time.perf_counter()
        try:
            gen.append_tokens(np.asarray([prompt[cached:]], dtype=np.int32))
            stats.prefill_ms = (time.perf_counter() - t0) * 1e3
            while True:
                t1 = time.perf_counter()
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
                if generated:
                    stats.decode_ms += (time.perf_counter() - t1) * 1e3
                    stats.decode_steps += 1
                else:
                    stats.ttft_ms = (time.perf_counter() - t0) * 1e3
                if tok in self._eos and not sampling.ignore_eos:
                    finish = "stop"
                    break
                generated.append(tok)
                if decoder is not None:
                    piece = decoder.decode(tok)
                    if piece:
                        yield piece
                if len(generated) >= max_new:
                    finish = "length"
                    break
            if decoder is None:
                yield self.detokenize(generated)
        finally:
            stats.generated_tokens = len(generated)
            stats.finish_reason = finish
            stats.context_used = len(prompt) + len(generated)
            self.last_stats = stats

    def stream(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> Iterator[str]:
        return self._run(prompt_tokens, sampling, stream=True)

    def complete(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> str:
        return "".join(self._run(prompt_tokens, sampling, stream=False))

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position: float32 (len(tokens), vocab), from a fresh generator."""
        tokens = [int(t) for t in tokens]
        if not tokens or len(tokens) > self.n_ctx:
            raise BackendError(f"logits need 1..{self.n_ctx} tokens, got {len(tokens)}")
        gen = self._generator(len(tokens) + 1, SamplingParams(temperature=0.0))  # its own: the kept one stays
        gen.append_tokens(np.asarray([tokens], dtype=np.int32))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)
        return out.reshape(-1, out.shape[-1])[-len(tokens):]

    def memory(self) -> MemoryInfo:
        """Weights (the model files' bytes) and the KV cache the kept generator allocated: onnxruntime-genai
        sizes it up front for the generator's ``max_length`` (float32), which is the first request's prompt +
        reply budget and half as much again, at most the context; 0 before the first request."""
        weights = sum(f.stat().st_size for f in self.path.iterdir() if f.name.startswith("model.onnx"))
        d = self.genai_config["model"]["decoder"]
        per_token = 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_size"] * 4
        return MemoryInfo(model_bytes=int(weights), kv_cache_bytes=int(per_token * self._gen_capacity),
                          rss_bytes=psutil.Process().memory_info().rss)

    def close(self) -> None:
        self._gen = None
        self.model = None
        self.tokenizer = None


def _token_text(value) -> str:
    if isinstance(value, dict):
        return value.get("content", "") or ""
    return value or ""
