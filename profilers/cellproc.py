"""One benchmark cell in its own process: load the engine once, then run cold repetitions on command.

Why a process per cell: peak memory is then the cell's own (``VmHWM`` of a process that loaded one
model), not the history of a sweep process that loaded forty, and the parent can interleave two
cells' repetitions (A B B A ...) while only one of them runs at a time.

Protocol: the parent writes one JSON command per line on the child's stdin and reads one JSON reply
per line from the child's reply pipe (the child's own stdout and stderr stay free for engine chatter):

- ``{"op": "open", "cell": {...}, "path": "...", "ctx": N, "idle": {...}, "device": {...}}`` ->
  ``{"ok": true, "pid", "load_s", "rss_after_load_bytes", "peak_rss_after_load_bytes", "engine_buffers"}``
- ``{"op": "run", "cold": true}`` -> one repetition's metrics, its second-turn TTFT included (see
  :func:`Worker.run`)
- ``{"op": "close"}`` -> ``{"ok": true, "peak_rss_bytes", "rss_bytes"}``, then the child exits.

An error in a command is replied as ``{"ok": false, "error": "..."}``; a child that dies (a signal,
e.g. the OOM killer's SIGKILL) is seen by the parent as a closed pipe and recorded with its cause.

Cold repetitions: before each timed repetition the engine's KV cache is emptied
(:meth:`edgerun.backends.base.Backend.reset`); the prompt tokens the engine actually evaluated come
from llama.cpp's own counter (``llama_perf_context().n_p_eval``) on both llama.cpp engines, and
from the backend's record on onnxruntime-genai (which has no counter and never reuses a prefix).
A repetition that evaluated fewer tokens than the prompt reused a prefix: it is returned with
``reused_prefix_tokens > 0`` and the parent rejects it.

CPU: each repetition reports the CPU time this process got (user + system, all threads) against
wall time, the CPU time every other process used meanwhile and the machine's steal time (both from
``/proc/stat``), so the parent can tell a repetition that shared the cores: llama.cpp's threads spin
while they wait, so a loss shows in the other processes' time rather than in this one's CPU share.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import llama_cpp

from edgerun.backends import open_backend
from edgerun.backends import llamacpp as llamacpp_backend
from edgerun.backends.base import GenerationStats, SamplingParams, physical_cores
from edgerun.data import text
from edgerun.kv.types import KV_TYPES
from edgerun.procmem import peak_rss_bytes, rss_bytes
from profilers import latency, power

_BUFFER_LINE = re.compile(r":\s*(.+?)\s+buffer size\s*=\s*([\d.]+) MiB")


def cpu_times() -> tuple[float, float] | None:
    """Machine-wide (busy, steal) CPU seconds so far, all CPUs, from ``/proc/stat``; None where unreadable.

    Busy is user + nice + system + irq + softirq time of every process; steal is time the hypervisor ran
    another guest while this VM wanted the CPU.
    """
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / tick, steal / tick


def engine_buffers(log_lines: list[str]) -> dict[str, float]:
    """llama.cpp's buffer sizes (MiB) from its load log: ``{"CPU_Mapped model": 91.5, "CPU KV": 30.0, ...}``."""
    out: dict[str, float] = {}
    for line in log_lines:
        m = _BUFFER_LINE.search(line)
        if m:
            name = " ".join(m.group(1).split())
            out[name] = out.get(name, 0.0) + float(m.group(2))
    return out


class RawLlama:
    """The peer baseline: raw ``llama_cpp.Llama`` behind just enough of the backend interface to be timed alike.

    Same threads, context, batch and KV settings as edgerun's llama.cpp path; greedy decoding.
    """

    name = "llama-cpp-python"

    def __init__(self, path: Path, n_ctx: int, threads: int, kv: str):
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=KV_TYPES[kv].quantized,
                                   type_k=KV_TYPES[kv].ggml_id, type_v=KV_TYPES[kv].ggml_id, verbose=False)
        self.n_ctx = n_ctx
        self.last_stats = GenerationStats()
        self._reset_next = True

    def tokenize(self, text_: str) -> list[int]:
        """Token ids of plain text (no BOS), llama-cpp-python's own tokenizer."""
        return self.llm.tokenize(text_.encode(), add_bos=False)

    def reset(self) -> None:
        """Empty the KV cache (llama-cpp-python then prefills every prompt token)."""
        llamacpp_backend.clear_cache(self.llm)

    def stream(self, prompt_tokens, sampling):
        """Yield ``sampling.max_tokens`` greedy pieces; ``last_stats`` from llama.cpp's perf counters."""
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        n = 0
        # reset=True (the default): generate() reuses the longest cached prefix, as llama-cpp-python's own
        # completion does; after reset() nothing is cached, so a cold run evaluates every prompt token
        for tok in self.llm.generate(list(prompt_tokens), temp=0.0, top_k=40, top_p=0.95, min_p=0.05,
                                     repeat_penalty=1.0):
            n += 1
            yield self.llm.detokenize([tok]).decode("utf-8", errors="ignore")
            if n >= sampling.max_tokens:
                break
        p = llama_cpp.llama_perf_context(self.llm.ctx)
        self.last_stats = GenerationStats(prompt_tokens=len(prompt_tokens), prefill_tokens=p.n_p_eval,
                                          generated_tokens=n, prefill_ms=p.t_p_eval_ms, decode_ms=p.t_eval_ms,
                                          decode_steps=p.n_eval, finish_reason="length")

    def memory(self):
        """None: the peer reports no model or KV bytes of its own (the cell's buffers come from the log)."""
        return None

    def close(self):
        """Free the llama.cpp model and context."""
        self.llm.close()


class Worker:
    """The child side: one engine on one model, timed repetition by repetition."""

    def __init__(self):
        self.backend = None
        self.prompt: list[int] = []
        self.cell: dict = {}

    def open(self, cell: dict, path: str, ctx: int, idle: dict | None = None, device: dict | None = None) -> dict:
        """Load the cell's engine and cut its prompt of ``cell["prompt_tokens"]`` held-out wiki tokens.

        Returns ``pid``, ``load_s`` (s), ``rss_after_load_bytes``, ``peak_rss_after_load_bytes`` and
        ``engine_buffers`` (llama.cpp's buffer sizes, MiB).

        Raises:
            ModelFileError, BackendError: the engine refuses the model (replied to the parent as an error).
            ValueError: the held-out text is shorter than the prompt asked for.
        """
        self.cell, self.device = cell, device or {}
        self.idle = power.EnergyReading(**idle) if idle else power.EnergyReading(available=False, reason="not measured")
        threads = cell["threads"] or physical_cores()
        self.threads = threads
        log = llamacpp_backend.capture_log()
        log.clear()
        t0 = time.perf_counter()
        if cell["backend"] == "llama-cpp-python":
            self.backend = RawLlama(Path(path), ctx, threads, cell["kv_cache_type"])
        elif cell["format"] == "onnx":
            self.backend = open_backend("onnx", path, n_ctx=ctx, threads=threads)
        else:
            kv = cell["kv_cache_type"]
            self.backend = open_backend("llama.cpp", path, n_ctx=ctx, threads=threads, cache_type_k=kv,
                                        cache_type_v=kv, flash_attn=KV_TYPES[kv].quantized)
        load_s = time.perf_counter() - t0
        ids = self.backend.tokenize(text("wiki", "heldout"))
        if len(ids) < cell["prompt_tokens"]:
            raise ValueError(f"the held-out wiki text has {len(ids)} tokens, fewer than the {cell['prompt_tokens']} "
                             "prompt tokens asked for")
        self.prompt = ids[:cell["prompt_tokens"]]
        self.params = SamplingParams(temperature=0.0, max_tokens=cell["gen_tokens"], ignore_eos=True)
        return {"ok": True, "pid": os.getpid(), "load_s": load_s, "rss_after_load_bytes": rss_bytes(),
                "peak_rss_after_load_bytes": peak_rss_bytes(),
                "engine_buffers": engine_buffers([t for _, t in log])}

    def _llama_ctx(self):
        llm = getattr(self.backend, "llm", None)
        return llm.ctx if llm is not None else None

    def _evaluated(self) -> int:
        """Prompt tokens the engine evaluated in the last call: llama.cpp's ``n_p_eval`` counter, else the
        backend's record (onnxruntime-genai has no counter and evaluates every prompt token)."""
        ctx = self._llama_ctx()
        return int(llama_cpp.llama_perf_context(ctx).n_p_eval if ctx is not None
                   else self.backend.last_stats.prefill_tokens)

    def run(self, cold: bool = True, second_turn_tokens: int = 32) -> dict:
        """One repetition: reset the cache (``cold``), generate, and time it; then the second-turn TTFT.

        Returns the latency record's fields plus ``evaluated_prompt_tokens`` (engine counter),
        ``reused_prefix_tokens``, ``cpu_s`` (this process, s), ``wall_s``, ``cpu_share`` (cpu_s / (wall_s x
        threads)), ``other_cpu_s`` (CPU seconds every other process used meanwhile), ``steal_s``
        (machine), energy fields, ``rss_bytes``, and :meth:`second_turn`'s fields.
        """
        if cold:
            self.backend.reset()
        meter = power.EnergyMeter(tdp_watts=self.device.get("tdp_watts"))
        cpu0, machine0, t0 = power.cpu_seconds(), cpu_times(), time.perf_counter()
        with meter:
            rec = latency.measure(self.backend, self.prompt, self.cell["gen_tokens"], sampling=self.params)
        wall = time.perf_counter() - t0
        cpu = power.cpu_seconds() - cpu0
        machine1 = cpu_times()
        evaluated = self._evaluated()
        m = rec.as_dict()
        m["evaluated_prompt_tokens"] = int(evaluated)
        m["reused_prefix_tokens"] = len(self.prompt) - int(evaluated)
        # prefill speed over the tokens actually evaluated, wall clock to the first token
        m["prefill_tokens_per_s"] = evaluated / (rec.ttft_ms / 1e3) if rec.ttft_ms > 0 else 0.0
        m.update(cpu_s=cpu, wall_s=wall, cpu_share=cpu / (wall * self.threads) if wall > 0 else 0.0,
                 other_cpu_s=max(0.0, machine1[0] - machine0[0] - cpu) if machine0 and machine1 else None,
                 steal_s=machine1[1] - machine0[1] if machine0 and machine1 else None,
                 rss_bytes=rss_bytes())
        mem = self.backend.memory()
        if mem is not None:
            m["kv_cache_bytes"] = mem.kv_cache_bytes
        m.update(power.above_idle(meter.reading, self.idle))
        if self.device.get("tdp_watts"):
            util = cpu / wall / max(1, self.device.get("threads", 1)) if wall > 0 else 0.0
            m.update(power.estimate_from_tdp(self.device["tdp_watts"], self.device.get("idle_watts") or 0.0, util,
                                             wall))
        m.update(self.second_turn(second_turn_tokens))
        return {"ok": True, "metrics": m}

    def second_turn(self, new_tokens: int = 32) -> dict:
        """TTFT (ms) of the prompt when all but its last ``new_tokens`` tokens are already in the KV cache.

        The chat path's prompt reuse (the previous turns cached, the new turn prefilled), a metric of
        its own, never mixed with the cold figures. ``second_turn_ttft_ms`` is None, with a note, when the
        engine evaluated more than the new tokens (it reused no prefix) or the prompt is too short.
        """
        new_tokens = max(1, min(new_tokens, len(self.prompt) - 1))
        if len(self.prompt) < 2:
            return {"second_turn_ttft_ms": None, "second_turn_note": "a one-token prompt has no prefix"}
        self.backend.reset()
        latency.measure(self.backend, self.prompt[:-new_tokens], 1, sampling=self.params)
        rec = latency.measure(self.backend, self.prompt, 1, sampling=self.params)
        evaluated = self._evaluated()
        out = {"second_turn_ttft_ms": rec.ttft_ms, "second_turn_new_tokens": new_tokens,
               "second_turn_evaluated_tokens": evaluated}
        if evaluated > new_tokens:
            out["second_turn_ttft_ms"] = None
            out["second_turn_note"] = f"no prefix reuse: evaluated {evaluated} of {len(self.prompt)} prompt tokens"
        return out

    def close(self) -> dict:
        """Free the engine; returns this process's ``peak_rss_bytes`` (VmHWM) and current ``rss_bytes``."""
        if self.backend is not None:
            self.backend.close()
        return {"ok": True, "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes()}


def main() -> int:
    """The child's loop: JSON commands on stdin, JSON replies on the file descriptor ``EDGERUN_CELL_FD``."""
    reply = os.fdopen(int(os.environ["EDGERUN_CELL_FD"]), "w", buffering=1)
    worker = Worker()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            out = getattr(worker, op)(**cmd)
        except Exception as e:  # reported to the parent, which records it for the cell
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(out, default=str) + "\n")
        if op == "close":
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Worker", "RawLlama", "engine_buffers", "cpu_times"]
