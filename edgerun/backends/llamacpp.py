"""GGUF models through llama.cpp (llama-cpp-python): the production path.

Every file is validated by :mod:`edgerun.formats.gguf` before llama.cpp opens it. Threads default
to the physical cores (llama-cpp-python's own default is half the logical CPUs). Timings come
from llama.cpp's own perf counters (``llama_perf_context``), reset before every call; TTFT is wall
clock from the call to the first token.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import llama_cpp
import numpy as np
import psutil

from edgerun.backends.base import (Backend, GenerationStats, MemoryInfo, SamplingParams, cap_threads,
                                   log_softmax_at, physical_cores, reply_budget)
from edgerun.errors import BackendError, UsageError
from edgerun.formats import gguf as gguf_format
from edgerun.formats.ggml import GGML_TYPES
from edgerun.kv.types import KV_TYPES

DEFAULT_CTX = 4096

SEED_MAX = 2**32 - 2
"""The largest sampling seed that reproduces: llama.cpp reads 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as "random"."""


def check_seed(seed: int | None) -> None:
    """Refuse a seed llama.cpp would not reproduce (negative, or 0xFFFFFFFF and above).

    Raises:
        UsageError: the seed is outside 0..4294967294.
    """
    if seed is not None and not (isinstance(seed, int) and 0 <= seed <= SEED_MAX):
        raise UsageError(f"--seed must be in 0..{SEED_MAX}")


def check_kv_type(which: str, name: str, head_dim: int) -> None:
    """Refuse a KV cache type llama.cpp cannot run for a head dimension, naming the ones it can.

    A type is usable when it is one of :data:`KV_TYPES` and its block divides the head dimension
    (llama.cpp stores each head's row in whole blocks).

    Raises:
        UsageError: an unknown type, or one whose block does not divide ``head_dim``.
    """
    valid = [n for n, t in KV_TYPES.items() if not head_dim or head_dim % t.block == 0]
    ggml = {t.name.lower(): t for t in GGML_TYPES.values()}
    t = KV_TYPES.get(name) or ggml.get(str(name).lower())
    if t is not None and head_dim and head_dim % t.block:
        raise UsageError(f"KV type {name} has blocks of {t.block} values; the {which} head dimension is {head_dim}: "
                         f"use one of {', '.join(valid)}")
    if name not in KV_TYPES:
        raise UsageError(f"unknown {which} cache type '{name}'; use one of {', '.join(valid)}")


def _warn_if_amx_under_hypervisor(llama_cpp) -> None:
    """Warn once when llama.cpp was built with AMX kernels and runs in a VM.

    Some hypervisors advertise AMX but lose the tile configuration, and llama.cpp then dies with
    SIGILL at the first matrix multiply (seen on this project's CI machines). Building with
    ``-mno-amx-int8`` avoids it; see the README's install notes.
    """
    global _AMX_CHECKED
    if _AMX_CHECKED:
        return
    _AMX_CHECKED = True
    try:
        system = llama_cpp.llama_print_system_info().decode()
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except (OSError, UnicodeDecodeError, AttributeError):
        return
    if "AMX_INT8 = 1" in system and " hypervisor" in cpuinfo:
        print("warning: this llama.cpp build uses AMX inside a virtual machine; if it dies with "
              "'Illegal instruction', rebuild llama-cpp-python with CMAKE_ARGS=-DCMAKE_C_FLAGS=-mno-amx-int8 "
              "(see README, Install)", file=sys.stderr)


_AMX_CHECKED = False

# llama.cpp's log, kept instead of printed: its last warning/error lines explain a failed load.
# (ggml log levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line)
_LOG: deque[tuple[int, str]] = deque(maxlen=256)
_LOG_CALLBACK = None


def _capture_llama_log(llama_cpp) -> None:
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if int(level) != 1:  # debug lines (per-tensor, per-layer) would push out what explains a load
            _LOG.append((int(level), text.decode("utf-8", errors="replace").strip()))

    _LOG_CALLBACK = callback  # keep a reference: llama.cpp holds only the C pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def capture_log() -> deque[tuple[int, str]]:
    """llama.cpp's log from now on, (level, text) pairs of the last 256 lines, instead of printing it.

    The backend reads a failed load's reason from it; the benchmark harness reads buffer sizes.
    """
    _capture_llama_log(llama_cpp)
    return _LOG


def clear_cache(llm: "llama_cpp.Llama") -> None:
    """Empty a ``llama_cpp.Llama``'s KV cache and its token record, so its next call prefills every token."""
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)


def _first_llama_error() -> str:
    """The first error llama.cpp logged since the log was cleared, without its function prefix."""
    for level, text in _LOG:
        if level == 4 and text:
            return text.split("error loading model: ", 1)[-1]
    return "no reason given"


class LlamaCppBackend(Backend):
    """A GGUF model loaded in llama.cpp.

    Args:
        path: GGUF file (validated before llama.cpp sees it).
        n_ctx: context window in tokens; default min(4096, the model's training context).
        threads: decode threads; default the physical cores.
        batch_threads: prompt-evaluation threads; default ``threads``.
        n_batch: prompt tokens evaluated per llama_decode call.
        flash_attn: use flash attention (a quantized V cache turns it on by itself, with a notice).
        cache_type_k, cache_type_v: KV cache element types (``f16``, ``q8_0``, ``q4_0``, ...:
            :data:`edgerun.kv.types.KV_TYPES`) whose block divides the model's head dimension.
        seed: default sampling seed, 0..4294967294 (llama.cpp reads 0xFFFFFFFF as "random").
        info: the file's :func:`edgerun.formats.gguf.validate` result, if already validated.
        notify: called with one-line notices (flash attention turned on for a quantized V cache).

    Raises:
        UsageError: a seed outside 0..4294967294, an unknown KV type or one whose block does not divide
            the head dimension (the usable types named).
        ModelFileError: the file is missing, not GGUF, truncated or corrupted.
        BackendError: llama.cpp refuses the model (e.g. an architecture it does not know) or the
            context options.
    """

    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 batch_threads: int | None = None, n_batch: int = 512, flash_attn: bool = False,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", seed: int | None = None,
                 info: gguf_format.GGUFInfo | None = None, notify=None):
        self.path = Path(path)
        self.info = info if info is not None and info.path == self.path else gguf_format.validate(self.path)
        say = notify or (lambda m: None)
        check_seed(seed)
        k_dim, v_dim = self.head_dims()
        check_kv_type("K", cache_type_k, k_dim)
        check_kv_type("V", cache_type_v, v_dim)
        # llama.cpp needs flash attention for a quantized V cache: turned on, and said, rather than refused
        self.flash_attn_auto = KV_TYPES[cache_type_v].quantized and not flash_attn
        if self.flash_attn_auto:
            flash_attn = True
            say(f"flash attention on: llama.cpp needs it for the {cache_type_v} V cache")
        train_ctx = self.info.context_length or DEFAULT_CTX
        self.n_ctx = int(n_ctx) if n_ctx else min(DEFAULT_CTX, train_ctx)
        if self.n_ctx < 16:
            raise BackendError(f"context size {self.n_ctx} is too small (minimum 16 tokens)")
        # never more threads than CPUs this process may use (edgerun.load says so in a notice)
        self.threads = cap_threads(int(threads))[0] if threads else physical_cores()
        self.batch_threads = cap_threads(int(batch_threads))[0] if batch_threads else self.threads
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        self.flash_attn = bool(flash_attn)
        self.seed = seed
        # llama-cpp-python reads a seed of 0 as "random" at construction (per call, 0 is a seed like any other)
        extra = {"seed": seed} if seed else {}
        _warn_if_amx_under_hypervisor(llama_cpp)
        _capture_llama_log(llama_cpp)
        _LOG.clear()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=self.n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                n_threads=self.threads, n_threads_batch=self.batch_threads, flash_attn=flash_attn,
                type_k=KV_TYPES[cache_type_k].ggml_id, type_v=KV_TYPES[cache_type_v].ggml_id,
                verbose=False, **extra)
        except (ValueError, RuntimeError):
            raise BackendError(f"llama.cpp could not load {self.path} (architecture "
                               f"'{self.info.architecture}'): {_first_llama_error()}") from None
        # llama.cpp pads its KV cache to a multiple of 256 cells, but llama-cpp-python's token
        # buffers hold exactly n_ctx tokens: n_ctx as requested is the usable window.
        self._llama_cpp = llama_cpp
        self._add_bos = bool(self.info.metadata.get("tokenizer.ggml.add_bos_token", False))
        self._bos_id = self.info.metadata.get("tokenizer.ggml.bos_token_id")
        self._eos_id = self.info.metadata.get("tokenizer.ggml.eos_token_id")
        self.last_stats = GenerationStats(context_size=self.n_ctx)

    def head_dims(self) -> tuple[int, int]:
        """(K, V) head dimensions from the GGUF metadata: ``key_length`` / ``value_length``, else
        ``embedding_length // head_count``; 0 when the file does not say."""
        md, arch = self.info.metadata, self.info.architecture
        n_head = int(md.get(f"{arch}.attention.head_count", 0) or 0)
        n_embd = int(md.get(f"{arch}.embedding_length", 0) or 0)
        default = n_embd // n_head if n_head else 0
        return (int(md.get(f"{arch}.attention.key_length", default) or default),
                int(md.get(f"{arch}.attention.value_length", default) or default))

    # --- tokens -------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self._add_bos and self._bos_id is not None and (not tokens or tokens[0] != self._bos_id):
            tokens.insert(0, int(self._bos_id))
        return tokens

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def tokenize_markup(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> str | None:
        return self.info.chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        def text(i):
            return self.detokenize([int(i)]) if i is not None and i >= 0 else ""
        return {"bos_token": text(self._bos_id), "eos_token": text(self._eos_id)}

    # --- generation ---------------------------------------------------------------------------

    def _completion_args(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> dict:
        check_seed(sampling.seed)
        max_tokens = reply_budget(self.n_ctx, len(prompt_tokens), sampling.max_tokens)
        return dict(prompt=list(prompt_tokens), max_tokens=max_tokens, temperature=sampling.temperature,
                    top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p,
                    repeat_penalty=sampling.repeat_penalty, seed=sampling.seed, stop=[])

    def _reused_prefix(self, prompt_tokens: Sequence[int]) -> int:
        """Prompt tokens llama-cpp-python will take from the KV cache (its longest-prefix reuse)."""
        cached = self.llm.input_ids[: self.llm.n_tokens]
        n = 0
        for a, b in zip(cached, prompt_tokens):
            if a != b:
                break
            n += 1
        return min(n, len(prompt_tokens) - 1)

    def _start(self, prompt_tokens: Sequence[int]) -> GenerationStats:
        self._llama_cpp.llama_perf_context_reset(self.llm.ctx)
        reused = self._reused_prefix(prompt_tokens)
        return GenerationStats(prompt_tokens=len(prompt_tokens), prefill_tokens=len(prompt_tokens) - reused,
                               context_size=self.n_ctx)

    def _finish(self, stats: GenerationStats, generated: int, finish_reason: str) -> None:
        perf = self._llama_cpp.llama_perf_context(self.llm.ctx)
        # llama.cpp counts a 1-token evaluation as decode and clamps both counters to >= 1.
        stats.prefill_ms = perf.t_p_eval_ms if stats.prefill_tokens > 1 else 0.0
        stats.decode_ms = perf.t_eval_ms
        stats.decode_steps = perf.n_eval if perf.t_eval_ms > 0 else 0
        if stats.prefill_tokens == 1:
            stats.decode_steps = max(0, stats.decode_steps - 1)
        stats.generated_tokens = generated
        stats.finish_reason = finish_reason
        stats.context_used = self.llm.n_tokens
        self.last_stats = stats

    def stream(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> Iterator[str]:
        if sampling.ignore_eos:
            return self._stream_fixed_length(prompt_tokens, sampling)
        return self._stream_completion(prompt_tokens, sampling)

    def _stream_fixed_length(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> Iterator[str]:
        """Exactly ``max_tokens`` tokens through ``Llama.generate`` (which does not stop at end-of-generation)."""
        args = self._completion_args(prompt_tokens, sampling)
        stats = self._start(prompt_tokens)
        t0 = time.perf_counter()
        generated: list[int] = []
        pending = b""
        finish = "interrupted"
        try:
            if args["seed"] is not None:
                self.llm.set_seed(args["seed"])
            for tok in self.llm.generate(args["prompt"], top_k=args["top_k"], top_p=args["top_p"], min_p=args["min_p"],
                                         temp=args["temperature"], repeat_penalty=args["repeat_penalty"]):
                if not generated:
                    stats.ttft_ms = (time.perf_counter() - t0) * 1e3
                generated.append(tok)
                pending += self.llm.detokenize([tok], prev_tokens=args["prompt"] + generated[:-1], special=True)
                try:
                    text, pending = pending.decode("utf-8"), b""
                except UnicodeDecodeError:
                    text = ""
                if text:
                    yield text
                if len(generated) >= args["max_tokens"]:
                    finish = "length"
                    break
        finally:
            self._finish(stats, len(generated), finish)

    def _stream_completion(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> Iterator[str]:
        args = self._completion_args(prompt_tokens, sampling)
        stats = self._start(prompt_tokens)
        t0 = time.perf_counter()
        finish, n_prompt = "interrupted", len(prompt_tokens)
        try:
            for chunk in self.llm.create_completion(stream=True, **args):
                choice = chunk["choices"][0]
                if not stats.ttft_ms:
                    stats.ttft_ms = (time.perf_counter() - t0) * 1e3
                if choice["text"]:
                    yield choice["text"]
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        finally:
            generated = self.llm.n_tokens - n_prompt + (1 if finish == "length" or finish == "interrupted" else 0)
            self._finish(stats, max(0, generated), finish)

    def complete(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> str:
        args = self._completion_args(prompt_tokens, sampling)
        stats = self._start(prompt_tokens)
        out = self.llm.create_completion(stream=False, **args)
        stats.ttft_ms = self._llama_cpp.llama_perf_context(self.llm.ctx).t_p_eval_ms
        choice = out["choices"][0]
        self._finish(stats, out["usage"]["completion_tokens"], choice["finish_reason"] or "stop")
        return choice["text"]

    # --- logits and memory --------------------------------------------------------------------

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position, float32 (len(tokens), n_vocab), from a fresh KV cache.

        Raises:
            BackendError: more tokens than the context holds, or llama_decode fails.
        """
        out = np.empty((len(tokens), self.llm.n_vocab()), dtype=np.float32)
        for start, chunk in self._logit_chunks(tokens):
            out[start:start + len(chunk)] = chunk
        return out

    def token_logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """log p(tokens[i] | tokens[:i]) for i >= 1: float64 (len(tokens) - 1,), one batch of logits at a time."""
        tokens = [int(t) for t in tokens]
        out = np.empty(len(tokens) - 1, dtype=np.float64)
        for start, chunk in self._logit_chunks(tokens):
            stop = min(start + len(chunk), len(tokens) - 1)
            if stop > start:
                out[start:stop] = log_softmax_at(chunk[: stop - start], tokens[start + 1:stop + 1])
        return out

    def continuation_logprobs(self, context: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log p of each continuation's tokens after ``context``; the context is evaluated once.

        Returns:
            one float64 array per continuation, of its length.
        """
        ctx = [int(t) for t in context]
        if not ctx:
            raise BackendError("continuation scoring needs a non-empty context")
        out = []
        with self._fresh_cache():
            last = None
            for start, chunk in self._decode_chunks(ctx, 0, last_only=True):
                last = chunk[-1]
            mem = self._llama_cpp.llama_get_memory(self.llm.ctx)
            for cont in continuations:
                cont = [int(t) for t in cont]
                if len(ctx) + len(cont) > self.n_ctx:
                    raise BackendError(f"context plus continuation exceed the context of {self.n_ctx} tokens")
                self._llama_cpp.llama_memory_seq_rm(mem, 0, len(ctx), -1)
                lp = np.empty(len(cont), dtype=np.float64)
                lp[0] = log_softmax_at(last[None, :], cont[:1])[0]
                if len(cont) > 1:
                    for start, chunk in self._decode_chunks(cont[:-1], len(ctx)):
                        lp[1 + start:1 + start + len(chunk)] = log_softmax_at(chunk, cont[1 + start:1 + start + len(chunk)])
                out.append(lp)
        return out

    def reset(self) -> None:
        """Empty llama.cpp's KV cache and llama-cpp-python's token record: no prefix is reused next call."""
        clear_cache(self.llm)

    @contextlib.contextmanager
    def _fresh_cache(self):
        """An empty KV cache for low-level evaluation, emptied again afterwards (chat history is re-prefilled)."""
        clear_cache(self.llm)
        try:
            yield
        finally:
            clear_cache(self.llm)

    def _logit_chunks(self, tokens: Sequence[int]):
        """Evaluate ``tokens`` from an empty KV cache in batches; yield (start, float32 logits of the batch)."""
        tokens = [int(t) for t in tokens]
        if not tokens or len(tokens) > self.n_ctx:
            raise BackendError(f"logits need 1..{self.n_ctx} tokens, got {len(tokens)}")
        with self._fresh_cache():
            yield from self._decode_chunks(tokens, 0)

    def _decode_chunks(self, tokens: list[int], pos0: int, last_only: bool = False):
        """llama_decode ``tokens`` at positions ``pos0..`` in batches; yield (start, float32 logits of the batch).

        With ``last_only`` only the final token of the final batch asks for logits (one row is yielded then).
        """
        lc, llm = self._llama_cpp, self.llm
        n_vocab, n_batch = llm.n_vocab(), llm.n_batch
        batch = lc.llama_batch_init(n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), n_batch):
                chunk = tokens[start:start + n_batch]
                final = start + len(chunk) == len(tokens)
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = pos0 + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 0 if last_only and not (final and i == len(chunk) - 1) else 1
                if lc.llama_decode(llm.ctx, batch) != 0:
                    raise BackendError("llama_decode failed while computing logits")
                rows = (1 if final else 0) if last_only else len(chunk)
                if rows:
                    ptr = lc.llama_get_logits(llm.ctx)
                    yield start, np.ctypeslib.as_array(ptr, shape=(rows * n_vocab,)).reshape(rows, n_vocab).copy()
        finally:
            lc.llama_batch_free(batch)

    def kv_bytes_per_token(self) -> float:
        """KV cache bytes per context token: 2 (K and V) x layers x KV heads x head dim x element bytes.

        Sliding-window layers (Gemma 3) are counted as full layers, an upper bound.
        """
        md, arch = self.info.metadata, self.info.architecture
        n_layer = int(md.get(f"{arch}.block_count", 0))
        n_head = int(md.get(f"{arch}.attention.head_count", 1) or 1)
        n_head_kv = int(md.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
        n_embd = int(md.get(f"{arch}.embedding_length", 0))
        k_dim = int(md.get(f"{arch}.attention.key_length", n_embd // n_head))
        v_dim = int(md.get(f"{arch}.attention.value_length", n_embd // n_head))
        return n_layer * n_head_kv * (k_dim * KV_TYPES[self.cache_type_k].bytes_per_value
                                      + v_dim * KV_TYPES[self.cache_type_v].bytes_per_value)

    def memory(self) -> MemoryInfo:
        return MemoryInfo(model_bytes=int(self._llama_cpp.llama_model_size(self.llm.model)),
                          kv_cache_bytes=int(self.kv_bytes_per_token() * self._llama_cpp.llama_n_ctx(self.llm.ctx)),
                          rss_bytes=psutil.Process().memory_info().rss)

    def engine_settings(self) -> dict:
        """threads, batch threads, context, KV cache types and flash attention as loaded (``flash_attn_auto``:
        turned on by itself for a quantized V cache)."""
        settings = {"threads": self.threads, "batch_threads": self.batch_threads, "n_ctx": self.n_ctx,
                    "cache_type_k": self.cache_type_k, "cache_type_v": self.cache_type_v, "flash_attn": self.flash_attn}
        if self.flash_attn_auto:
            settings["flash_attn_auto"] = True
        return settings

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None
