"""Ctrl-C during a long prefill in the interactive chat: how long until the prompt is back.

A person types a long message (about 1,800 tokens) into ``edgerun chat --ctx-size 2048`` on a
pseudo-terminal and presses Ctrl-C 1.5 s into the prefill. Measured per run: the latency from the
Ctrl-C (SIGINT through the terminal, as a keyboard sends it) to the ``>>>`` prompt coming back, ms;
then the same message is sent again and allowed to finish (``--max-tokens 1``), and ``/stats`` gives
its prompt length: one copy of the message (the interrupted one left
no trace in the history), of which the part the interrupted prefill had evaluated comes from the KV
cache (the cache keeps evaluated tokens; a next prompt reuses them only where it matches them exactly);
then ``/clear`` and the message once more: the prefill speed of the whole message from a cold cache,
tokens/s.

Two configurations run as interleaved pairs (A B, B A, ...): the chat's interactive default,
``--batch-size 64``, against ``--batch-size 512`` (llama.cpp's default, the baseline). The aim (bug
report in issue #15): the prompt back within 0.5 s, at the same prefill speed.

Usage: python benchmarks/ctrl_c_latency.py [--pairs 5] [--model NAME_OR_PATH]
Writes benchmarks/results/ctrl_c_latency.json and .md. Linux only (pty).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from profilers.report import quartiles

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = b">>> "


class Chat:
    """``edgerun chat`` on a pseudo-terminal: send lines, read until a pattern, Ctrl-C like a keyboard."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        exe = shutil.which("edgerun") or sys.executable
        cmd = [exe] if exe.endswith("edgerun") else [exe, "-m", "edgerun.cli"]
        self.proc = subprocess.Popen(cmd + ["chat"] + args, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.buf = b""

    def read_until(self, pattern: bytes, timeout: float = 300.0) -> float:
        """Read output until ``pattern`` appears after what was consumed; return the perf_counter time it did."""
        end = time.monotonic() + timeout
        while pattern not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"no {pattern!r} in chat output: {self.buf[-400:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.buf += os.read(self.master, 65536)
                except OSError:
                    pass
        t = time.perf_counter()
        i = self.buf.index(pattern) + len(pattern)
        seen, self.buf = self.buf[:i], self.buf[i:]
        self.last = seen
        return t

    def send(self, text: str) -> None:
        data = text.encode() + b"\n"
        while data:  # the terminal's input buffer is small: write in pieces
            n = os.write(self.master, data[:1024])
            data = data[n:]

    def ctrl_c(self) -> float:
        """Send SIGINT to the chat's foreground process group, as the terminal does on Ctrl-C."""
        t = time.perf_counter()
        os.killpg(self.proc.pid, signal.SIGINT)
        return t

    def close(self) -> None:
        try:
            self.send("/exit")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        os.close(self.master)


def long_message(n_words: int) -> str:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    return " ".join(words[i % len(words)] + str(i % 7) for i in range(n_words)) + " Summarise this."


def one_run(model: str | None, batch: int, message: str, delay_s: float) -> dict:
    chat = Chat(([model] if model else []) + ["--ctx-size", "2048", "--batch-size", str(batch),
                                              "--max-tokens", "1", "--temperature", "0"])
    try:
        chat.read_until(PROMPT)
        chat.send(message)
        time.sleep(delay_s)
        t_int = chat.ctrl_c()
        t_back = chat.read_until(PROMPT)
        interrupted = b"[interrupted]" in chat.last
        chat.send(message)
        chat.read_until(PROMPT)
        chat.send("/stats")
        chat.read_until(PROMPT)
        stats = chat.last.decode(errors="replace")
        for line in ("/clear", message, "/stats"):   # a cold prefill of the whole message: its speed
            chat.send(line)
            chat.read_until(PROMPT)
        cold = chat.last.decode(errors="replace")
    finally:
        chat.close()
    pattern = r"prefill (\d+) tokens(?: \((\d+) of (\d+) from the KV cache\))?, ([\d.]+) tokens/s"
    m, c = re.search(pattern, stats), re.search(pattern, cold)
    return {"batch": batch, "latency_ms": (t_back - t_int) * 1e3, "interrupted": interrupted,
            "stats": stats.strip()[-600:],
            "prefill_tokens": int(m.group(1)) if m else None,
            "reused_tokens": int(m.group(2) or 0) if m else None,
            "cold_prefill_tokens": int(c.group(1)) if c else None,
            "prefill_tokens_per_s": float(c.group(4)) if c else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--words", type=int, default=700, help="message length in words (~1,800 tokens at 700)")
    ap.add_argument("--delay", type=float, default=1.5, help="Ctrl-C this many s after sending the message")
    args = ap.parse_args()
    message = long_message(args.words)
    runs = []
    for i in range(args.pairs):
        order = (64, 512) if i % 2 == 0 else (512, 64)
        for batch in order:
            r = one_run(args.model, batch, message, args.delay)
            r["pair"] = i
            runs.append(r)
            print(f"pair {i} batch {batch}: Ctrl-C -> prompt {r['latency_ms']:.0f} ms, prefill "
                  f"{r['prefill_tokens_per_s']} tokens/s ({r['prefill_tokens']} tokens, {r['reused_tokens']} from cache)", flush=True)
    summary = {}
    for batch in (64, 512):
        rs = [r for r in runs if r["batch"] == batch]
        lat = [r["latency_ms"] for r in rs]
        pf = [r["prefill_tokens_per_s"] for r in rs if r["prefill_tokens_per_s"]]
        summary[batch] = {"latency_ms": quartiles(lat), "prefill_tokens_per_s": quartiles(pf) if pf else None,
                          "n": len(rs), "all_interrupted": all(r["interrupted"] for r in rs),
                          "next_turn_prompt_tokens": sorted({r["prefill_tokens"] + r["reused_tokens"]
                                                             for r in rs if r["prefill_tokens"] is not None}),
                          "next_turn_tokens_from_cache": [r["reused_tokens"] for r in rs]}
    ratios = []
    for i in range(args.pairs):
        a = next(r for r in runs if r["pair"] == i and r["batch"] == 64)
        b = next(r for r in runs if r["pair"] == i and r["batch"] == 512)
        if a["prefill_tokens_per_s"] and b["prefill_tokens_per_s"]:
            ratios.append(a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"])
    out = {"machine": platform.node(), "cpus": os.cpu_count(), "pairs": args.pairs, "words": args.words,
           "delay_s": args.delay, "summary": summary,
           "prefill_speed_ratio_64_over_512": quartiles(ratios) if ratios else None, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ctrl_c_latency.json").write_text(json.dumps(out, indent=1))

    def fmt(q):
        return "n/a" if not q else f"{q[1]:.0f} [{q[0]:.0f}-{q[2]:.0f}]"

    lines = ["# Ctrl-C during a long prefill (interactive chat, pseudo-terminal)", "",
             f"Message ~{args.words} words, `--ctx-size 2048`, Ctrl-C {args.delay} s after sending; {args.pairs} "
             "interleaved pairs; median [IQR].", "",
             "| --batch-size | Ctrl-C -> prompt back, ms | cold prefill, tokens/s | n | next turn's prompt, tokens | of which from the KV cache |",
             "|---|---|---|---|---|---|"]
    for batch in (64, 512):
        s = summary[batch]
        lines.append(f"| {batch}{' (chat default)' if batch == 64 else ' (llama.cpp default)'} | {fmt(s['latency_ms'])} | "
                     f"{fmt(s['prefill_tokens_per_s'])} | {s['n']} | {', '.join(map(str, s['next_turn_prompt_tokens']))} | "
                     f"{', '.join(map(str, s['next_turn_tokens_from_cache']))} |")
    r = out["prefill_speed_ratio_64_over_512"]
    if r:
        lines += ["", f"Prefill speed ratio 64/512 per pair: median {r[1]:.3f} [{r[0]:.3f}-{r[2]:.3f}], "
                      f"n={len(ratios)}."]
    (RESULTS / "ctrl_c_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
