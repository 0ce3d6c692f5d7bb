"""MixPE emulation on SmolLM2-135M-Instruct: quality, operations, modelled energy/time, emulation speed.

Weights: 4-bit, groups of 64, RTN and GPTQ (16 x 512 wiki calibration tokens). For each: perplexity
(shared protocol, 2 x 512 held-out wiki tokens) of W4A16 and W4A8 emulation next to the float32
source and to the same weights dequantized in plain torch; per-token operation counts and modelled
energy and time for MixPE, the dequantize-in-the-loop W4A16 baseline and FP16, normalized to
FP16 = 1.00, next to the MixPE simulator's released figures; decode tokens/s of the emulator vs plain
torch fp32 on the same model (32 greedy tokens).

Usage: python benchmarks/mixpe_table.py
Writes benchmarks/results/mixpe_table.json and .md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"time": {"W4A8": 0.12, "W4A16": 0.31}, "energy_llm": {"W4A8": 0.14, "W4A16": 0.22}}


def decode_speed(backend, prompt) -> float:
    from edgerun.backends.base import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    "".join(backend.stream(prompt, params))
    return backend.last_stats.decode_tokens_per_s


def main() -> int:
    from converters.ptq import quantize_checkpoint
    from converters.source import open_source
    from edgerun.backends.mixpe import MixPEBackend
    from edgerun.backends.torch import TorchBackend
    from profilers.accuracy import perplexity

    source = open_source("smollm2-135m-instruct", progress=False)

    def ppl(b, label):
        return perplexity(b, label, window=512, n_windows=2).perplexity

    fp32 = TorchBackend(source.path, n_ctx=520)
    prompt = fp32.encode_prompt("<|im_start|>user\nTell me about the history of Rome.<|im_end|>\n<|im_start|>assistant\n")
    result = {"benchmark": "mixpe_table", "source": source.label, "fp32_perplexity": ppl(fp32, "fp32"),
              "fp32_decode_tokens_per_s": decode_speed(fp32, prompt), "methods": {}, "paper": PAPER,
              "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("rtn", "gptq"):
            ckpt = quantize_checkpoint(source.path, Path(tmp) / method, method=method, bits=4, group_size=64,
                                       n_samples=16)
            row = {"dequantized_torch_perplexity": ppl(TorchBackend(ckpt, n_ctx=520), method)}
            for mode in ("W4A16", "W4A8"):
                emu = MixPEBackend(ckpt, mode, n_ctx=520)
                t0 = time.perf_counter()
                row[f"{mode}_perplexity"] = ppl(emu, f"{method} {mode}")
                row[f"{mode}_perplexity_seconds"] = time.perf_counter() - t0
                row[f"{mode}_decode_tokens_per_s"] = decode_speed(emu, prompt)
                row[f"{mode}_accounting"] = emu.accounting()
            result["methods"][method] = row
            print(method, {k: v for k, v in row.items() if not k.endswith("accounting")}, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mixpe_table.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "mixpe_table.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r: dict) -> str:
    lines = ["# MixPE emulation on SmolLM2-135M-Instruct", "",
             f"{r['date']}. Source {r['source']}: fp32 perplexity {r['fp32_perplexity']:.3f} (2 x 512 held-out wiki "
             f"tokens), fp32 torch decode {r['fp32_decode_tokens_per_s']:.1f} tokens/s. 4-bit weights, groups of 64.", "",
             "| weights | dequantized (torch) | W4A16 emulated | W4A8 emulated | W4A16 decode tok/s | W4A8 decode tok/s |",
             "|---|---|---|---|---|---|"]
    for m, v in r["methods"].items():
        lines.append(f"| {m} | {v['dequantized_torch_perplexity']:.3f} | {v['W4A16_perplexity']:.3f} | "
                     f"{v['W4A8_perplexity']:.3f} | {v['W4A16_decode_tokens_per_s']:.2f} | {v['W4A8_decode_tokens_per_s']:.2f} |")
    acc = next(iter(r["methods"].values()))
    lines += ["", "Per token (every linear layer of the model; the counts depend on shapes and codes, RTN shown):", "",
              "| scheme | MACs | shift-adds | dequant ops | row-sum adds | weight MiB moved | modelled energy vs FP16 | "
              "modelled time vs FP16 (array) | paper time / LLM energy |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in ("W4A8", "W4A16"):
        a = acc[f"{mode}_accounting"]
        for scheme in ("mixpe", "dequant-loop", "fp16"):
            if scheme != "mixpe" and mode == "W4A8":
                continue
            v = a[scheme]
            o = v["ops_per_token"]
            paper = f"{r['paper']['time'][mode]:.2f} / {r['paper']['energy_llm'][mode]:.2f}" if scheme == "mixpe" else "-"
            name = f"MixPE {mode}" if scheme == "mixpe" else {"dequant-loop": "dequantize-in-the-loop W4A16",
                                                                "fp16": "FP16 GEMM"}[scheme]
            lines.append(f"| {name} | {o['macs']:.4g} | {o['shift_adds']:.4g} | {o['dequant_ops']:.4g} | "
                         f"{o['row_sum_adds']:.4g} | {o['weight_bytes'] / 2**20:.1f} | {v['energy_vs_fp16']:.3f} | "
                         f"{v['time_vs_fp16']:.3f} ({v['array']}) | {paper} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
