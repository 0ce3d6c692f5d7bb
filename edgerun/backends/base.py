"""The small interface every engine implements: load, tokenize, stream or complete, logits, memory.

A backend runs one model; it never writes model files (that is ``converters/``) and never
measures beyond what its engine reports (that is ``profilers/``). Sessions and profilers only use
what is declared here, so the llama.cpp, ONNX and torch engines are interchangeable.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import psutil

from edgerun.errors import BackendError, UsageError


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults are llama.cpp's.

    Attributes:
        max_tokens: upper bound on generated tokens; None generates until an end-of-generation
            token or until the context is full.
        temperature: 0 is greedy (deterministic).
        top_p, top_k, min_p: nucleus, top-k and min-p truncation.
        repeat_penalty: 1.0 disables it.
        seed: sampling seed for temperature > 0; None draws one.
        ignore_eos: keep generating past end-of-generation tokens until ``max_tokens`` (benchmarks
            use it so every run decodes the same number of tokens).
    """

    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class GenerationStats:
    """Timing and token counts of one generation.

    Attributes:
        prompt_tokens: tokens in the prompt.
        prefill_tokens: prompt tokens evaluated by this call (the rest was reused from the KV cache
            of the previous turn).
        generated_tokens: tokens sampled, excluding the end-of-generation token.
        ttft_ms: time to first token in ms (wall clock from the call to the first token).
        prefill_ms: engine time evaluating the prompt, ms.
        decode_ms: engine time evaluating generated tokens, ms.
        decode_steps: number of single-token evaluations timed in ``decode_ms``.
        finish_reason: ``"stop"`` (end-of-generation token), ``"length"`` (max_tokens or context
            full) or ``"interrupted"`` (the caller stopped reading, e.g. Ctrl-C).
        context_used: tokens in the context after this reply.
        context_size: the context window in tokens.
        kv_cache_bytes: bytes the KV cache holds after the reply when the engine can tell (torch:
            the packed quantized cache's real bytes, or the unquantized cache's), else 0.
        kv_layout: name of the KV precision layout in use (torch with a layout), else "".
        kv_working_bytes: bytes a packed KV cache holds on top of ``kv_cache_bytes`` as its dequantized
            working copy (torch with a layout, ``kv_working_copy``), else 0.
    """

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    ttft_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    decode_steps: int = 0
    finish_reason: str = ""
    context_used: int = 0
    context_size: int = 0
    kv_cache_bytes: int = 0
    kv_layout: str = ""
    kv_working_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prompt evaluation speed in tokens/s, or None when nothing was timed."""
        return self.prefill_tokens / (self.prefill_ms / 1e3) if self.prefill_ms > 0 and self.prefill_tokens else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generation speed in tokens/s over single-token evaluations, or None when nothing was timed."""
        return self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 and self.decode_steps else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass
class MemoryInfo:
    """Memory a loaded model uses, in bytes.

    Attributes:
        model_bytes: bytes of the weights as loaded by the engine.
        kv_cache_bytes: bytes allocated for the KV cache at the current context size.
        rss_bytes: resident set size of this process now.
        kv_working_bytes: bytes held on top of ``kv_cache_bytes`` by a packed KV cache's dequantized
            working copy (torch with a layout), else 0.
    """

    model_bytes: int
    kv_cache_bytes: int
    rss_bytes: int
    kv_working_bytes: int = 0


class Backend(ABC):
    """One loaded model in one engine: the contract the session, the planner, the CLI and the profilers use.

    Implementations set ``name`` (engine name), ``path`` (the model file or directory), ``n_ctx``
    (context window in tokens), ``threads`` (CPU threads for decoding) and ``last_stats`` after each
    :meth:`stream` or :meth:`complete`. Features an engine lacks have defaults here: no layer-wise KV
    layouts (:meth:`set_kv_layout` refuses one), no engine counters (:meth:`accounting` is empty).
    """

    name: str = ""
    path: Path
    n_ctx: int = 0
    threads: int = 0
    kv_layout = None
    last_stats: GenerationStats

    @abstractmethod
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a formatted prompt: special-token texts are parsed, BOS added if the model wants it."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text (no BOS, special-token texts not parsed)."""

    def tokenize_markup(self, text: str) -> list[int]:
        """Token ids of chat-template markup: special-token texts parsed as control tokens, no BOS added.

        The default is :meth:`encode_prompt` without the BOS it may add; engines override it.
        """
        ids = self.encode_prompt(text)
        bos = self.encode_prompt("")
        return ids[len(bos):] if bos and ids[:len(bos)] == bos and not text.startswith(self.special_tokens.get(
            "bos_token") or "\0") else ids

    def encode_chat(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """Token ids of a prompt given as ``(text, is_markup)`` pieces (:meth:`ChatTemplate.render_parts`).

        Markup is tokenized with special-token texts as control tokens; message contents as plain text,
        so text from a user never becomes a control token. BOS is added once at the start when the model
        wants it (as :meth:`encode_prompt` does).
        """
        ids: list[int] = []
        for text, markup in parts:
            ids += self.tokenize_markup(text) if markup else self.tokenize(text)
        bos = self.encode_prompt("")
        if bos and ids[:len(bos)] != bos:
            ids = bos + ids
        return ids

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of token ids (special tokens rendered as text)."""

    @abstractmethod
    def stream(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> Iterator[str]:
        """Yield text pieces as tokens are decoded; ``last_stats`` is set when the iterator ends or is closed."""

    @abstractmethod
    def complete(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> str:
        """Generate and return the whole reply (the engine's non-streaming path)."""

    @abstractmethod
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position: float32 array of shape (len(tokens), vocab size)."""

    def token_logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """log p(tokens[i] | tokens[:i]) for i = 1..n-1: float64 array of shape (len(tokens) - 1,).

        The default computes all logits at once; engines override it to bound memory by the vocabulary.
        """
        tokens = [int(t) for t in tokens]
        return log_softmax_at(self.logits(tokens)[:-1], tokens[1:])

    def continuation_logprobs(self, context: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log p of each continuation's tokens after ``context``: one float64 array per continuation.

        The default evaluates context + continuation for each; engines may reuse the context's KV cache.
        """
        ctx = [int(t) for t in context]
        out = []
        for cont in continuations:
            cont = [int(t) for t in cont]
            out.append(self.token_logprobs(ctx + cont)[len(ctx) - 1:])
        return out

    @abstractmethod
    def memory(self) -> MemoryInfo:
        """Bytes used by weights, KV cache and the whole process."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, str]:
        """Texts of the model's special tokens, keys ``bos_token`` and ``eos_token`` (empty if none)."""

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (Jinja text), or None when it has none."""
        return None

    def close(self) -> None:
        """Free the engine's resources."""

    def reset(self) -> None:
        """Empty the KV cache: the next call evaluates every prompt token (a cold start).

        Benchmarks call it before every timed repetition; the chat path never does (it reuses the
        previous turn's prefix). The default is for engines that keep no cache across calls.
        """

    def set_kv_layout(self, layout) -> bool:
        """Use a layer-wise KV precision layout (:class:`edgerun.kv.layout.Layout`) from the next call on.

        Returns True when a cached conversation was dropped (the next call prefills it again under the
        layout), False otherwise. The default engine has no layer-wise layouts.

        Raises:
            UsageError: this engine runs no layer-wise KV layouts (``None`` is accepted and does nothing).
        """
        if layout is None:
            return False
        raise UsageError(f"the {self.name} engine runs no layer-wise KV layouts; use --backend torch "
                         "(llama.cpp maps one layout file to a uniform KV type at load)")

    def accounting(self) -> dict:
        """Engine-specific counters of everything run so far (e.g. MixPE op counts and modelled energy); {} if none."""
        return {}

    def engine_settings(self) -> dict:
        """Settings fixed at load that a plan reports: ``threads``, ``n_ctx`` and engine-specific ones."""
        return {"threads": self.threads, "n_ctx": self.n_ctx}


def reply_budget(n_ctx: int, n_prompt: int, max_tokens: int | None) -> int:
    """Tokens a reply may take: ``max_tokens`` capped by the room left in the context.

    Raises:
        BackendError: the prompt alone fills the context.
    """
    room = n_ctx - n_prompt
    if room < 1:
        raise BackendError(f"the prompt ({n_prompt} tokens) does not fit the context of {n_ctx} tokens; "
                           "raise --ctx-size")
    return room if max_tokens is None else min(max_tokens, room)


def log_softmax_at(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for each row, computed in float64.

    Args:
        logits: (n, vocab) float array.
        targets: n token ids.

    Returns:
        float64 array of shape (n,).
    """
    targets = np.asarray(targets)
    out = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), 64):  # 64 rows at a time: a 262k vocabulary stays ~130 MB in float64
        x = np.asarray(logits[i:i + 64], dtype=np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
        out[i:i + 64] = x[np.arange(len(x)), targets[i:i + 64]] - lse
    return out


def available_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cap_threads(threads: int | None) -> tuple[int | None, str]:
    """``threads`` capped at the CPUs available to this process, and a one-line note when it was capped.

    More threads than CPUs make llama.cpp's spinning threads fight for the cores (64 threads on a 2-CPU
    machine decode some 20 times slower than 1). None (the engine's default) is returned unchanged.
    """
    if threads is None:
        return None, ""
    cpus = available_cpus()
    if int(threads) <= cpus:
        return int(threads), ""
    return cpus, f"threads capped at {cpus}: this process may use {cpus} CPUs"


def physical_cores() -> int:
    """Physical CPU cores available to this process (the default thread count for inference).

    llama-cpp-python defaults to half the logical CPUs, which is 1 on a 2-vCPU machine; compute
    kernels gain nothing from SMT siblings but lose a lot from idle physical cores.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or allowed
    logical = psutil.cpu_count(logical=True) or allowed
    # Threads per core from the machine, applied to the CPUs this process may use.
    per_core = max(1, logical // physical)
    return max(1, allowed // per_core)
