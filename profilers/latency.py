"""Latency of one generation on any backend: TTFT, prefill and decode tokens/s, inter-token latency.

Measured around the backend's streaming path (it is not changed): wall-clock time of every streamed
piece from the call. TTFT (ms) = first piece; decode tokens/s = (generated tokens - 1) / (time of
the last piece - time of the first); inter-token latency p50/p95 (ms) over the gaps between pieces
(a piece is one token except where a multi-byte character is held back until complete). The
engine's own prefill/decode timings (``backend.last_stats``) are recorded next to them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from edgerun.backends.base import SamplingParams


@dataclass
class LatencyRecord:
    """Timings of one generation.

    Attributes:
        prompt_tokens, generated_tokens: token counts.
        ttft_ms: wall-clock time to the first token.
        prefill_tokens_per_s: prompt tokens / TTFT (wall clock, includes sampling the first token).
        decode_tokens_per_s: (generated - 1) / time from first to last token (wall clock).
        itl_p50_ms, itl_p95_ms: inter-token latency percentiles.
        engine_prefill_tokens_per_s, engine_decode_tokens_per_s: the engine's own counters (None if it has none).
        total_ms: whole call.
        text: the generated text.
    """

    prompt_tokens: int
    generated_tokens: int
    ttft_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    engine_prefill_tokens_per_s: float | None
    engine_decode_tokens_per_s: float | None
    total_ms: float
    text: str = ""

    def as_dict(self, with_text: bool = False) -> dict:
        d = asdict(self)
        if not with_text:
            d.pop("text")
        return d


def measure(backend, prompt_tokens: Sequence[int], max_tokens: int, ignore_eos: bool = True,
            sampling: SamplingParams | None = None) -> LatencyRecord:
    """Generate ``max_tokens`` tokens (greedy by default) from ``prompt_tokens`` and time them.

    Args:
        backend: any :class:`edgerun.backends.base.Backend`.
        prompt_tokens: the prompt, token ids.
        max_tokens: tokens to generate.
        ignore_eos: keep generating past end-of-generation tokens, so every run has the same length.
        sampling: sampling parameters (default greedy).
    """
    params = sampling or SamplingParams(temperature=0.0)
    params = SamplingParams(**{**asdict(params), "max_tokens": max_tokens, "ignore_eos": ignore_eos})
    stamps: list[float] = []
    pieces: list[str] = []
    t0 = time.perf_counter()
    for piece in backend.stream(list(prompt_tokens), params):
        stamps.append(time.perf_counter())
        pieces.append(piece)
    t_end = time.perf_counter()
    stats = backend.last_stats
    n = stats.generated_tokens
    ttft = (stamps[0] - t0) * 1e3 if stamps else (t_end - t0) * 1e3
    gaps = np.diff(stamps) * 1e3 if len(stamps) > 1 else np.array([])
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return LatencyRecord(
        prompt_tokens=len(prompt_tokens), generated_tokens=n, ttft_ms=ttft,
        prefill_tokens_per_s=len(prompt_tokens) / (ttft / 1e3) if ttft > 0 else 0.0,
        decode_tokens_per_s=decode,
        itl_p50_ms=float(np.percentile(gaps, 50)) if len(gaps) else None,
        itl_p95_ms=float(np.percentile(gaps, 95)) if len(gaps) else None,
        engine_prefill_tokens_per_s=stats.prefill_tokens_per_s, engine_decode_tokens_per_s=stats.decode_tokens_per_s,
        total_ms=(t_end - t0) * 1e3, text="".join(pieces))
