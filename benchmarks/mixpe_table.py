"""MixPE emulation on SmolLM2-135M-Instruct: quality, operations, the simulator time/energy model, emulator speed.

Weights: 4-bit, groups of 64, RTN and GPTQ (16 x 512 wiki calibration tokens). For each: perplexity
(shared protocol, 2 x 512 held-out wiki tokens) of W4A16 and W4A8 emulation (batched-codes path)
next to the float32 source and the same weights dequantized in plain torch; for RTN also W4A16 with
fp16 and bf16 accumulation. Per-token operation counts; the MixPE simulator's time/energy model
(edgerun.backends.mixpe.model_design) on the model's linear layers at batch 1 and batch 64,
normalized to FP16 = 1.00, after reproducing the simulator's published OPT-6.7B row (its batch-64
workloads). Emulator speed: the batched-codes path against the bit-plane path (the oracle) in the
same run, interleaved, per token at 1 token per forward (greedy decode after an 8-token prompt) and at 64 tokens per forward
(a 64-token prefill): median [IQR] n of ms/token and of the per-pair ratio. Machine load (uptime)
recorded before and after: other work may share the 2 cores.

Usage: python benchmarks/mixpe_table.py [--pairs N]
Writes benchmarks/results/mixpe_table.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "<|im_start|>user\nTell me about the history of Rome.<|im_end|>\n<|im_start|>assistant\n"


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (os.getloadavg, what uptime prints)."""
    return [round(v, 2) for v in os.getloadavg()]


def decode_ms_per_token(backend, prompt, tokens: int) -> float:
    """Engine ms per generated token of a cold greedy decode (the prompt prefilled first, not counted)."""
    from edgerun.backends.base import SamplingParams

    backend.reset()
    "".join(backend.stream(prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)))
    s = backend.last_stats
    return s.decode_ms / max(s.decode_steps, 1)


def prefill_ms_per_token(backend, prompt64) -> float:
    """Engine ms per token of one cold 64-token forward (a prefill of 64 tokens, one token sampled)."""
    from edgerun.backends.base import SamplingParams

    backend.reset()
    "".join(backend.stream(prompt64, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)))
    s = backend.last_stats
    assert s.prefill_tokens == len(prompt64), "prefill reused a cache"
    return s.prefill_ms / s.prefill_tokens


def summary(xs: list[float]) -> dict:
    from profilers.report import quartiles

    q1, med, q3 = quartiles(xs)
    return {"median": med, "q1": q1, "q3": q3, "n": len(xs), "values": xs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3, help="interleaved codes/bit-plane pairs per speed cell")
    args = ap.parse_args()

    from converters.ptq import quantize_checkpoint
    from converters.source import open_source
    from edgerun.backends import mixpe
    from edgerun.backends.mixpe import MixPEBackend
    from edgerun.backends.torch import TorchBackend
    from profilers.accuracy import perplexity

    load_before = load_average()
    t_start = time.perf_counter()
    source = open_source("smollm2-135m-instruct", progress=False)

    def ppl(b, label):
        return perplexity(b, label, window=512, n_windows=2).perplexity

    fp32 = TorchBackend(source.path, n_ctx=520)
    prompt = fp32.encode_prompt(PROMPT)
    prompt64 = (prompt * 4)[:64]
    table = mixpe.load_cost_table()
    result = {"benchmark": "mixpe_table", "source": source.label, "fp32_perplexity": ppl(fp32, "fp32"),
              "fp32_decode_ms_per_token": decode_ms_per_token(fp32, prompt, 32), "methods": {},
              "simulator_rows": {m: mixpe.reproduce_simulator_row(m, table) for m in mixpe.SIMULATOR_MODELS},
              "calibration_row": mixpe.CALIBRATION_ROW, "date": time.strftime("%Y-%m-%d"),
              "torch_threads": __import__("torch").get_num_threads(), "load_average_before": load_before}
    del fp32
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
                row[f"{mode}_accounting"] = emu.accounting()
            if method == "rtn":
                for accum in ("fp16", "bf16"):
                    row[f"W4A16_{accum}_perplexity"] = ppl(MixPEBackend(ckpt, "W4A16", n_ctx=520, accum=accum),
                                                          f"{method} W4A16 {accum}")
                row["speed"] = speed(ckpt, prompt, prompt64, args.pairs)
            result["methods"][method] = row
            print(method, {k: v for k, v in row.items() if not k.endswith("accounting")}, flush=True)
    result["load_average_after"] = load_average()
    result["seconds"] = time.perf_counter() - t_start
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mixpe_table.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "mixpe_table.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def speed(ckpt, prompt, prompt64, pairs: int) -> dict:
    """Batched codes vs bit-planes, interleaved A B B A ..., per mode: ms/token at 1 and 64 tokens per forward."""
    from edgerun.backends.mixpe import MixPEBackend

    out = {}
    for mode in ("W4A8", "W4A16"):
        backends = {g: MixPEBackend(ckpt, mode, n_ctx=256, gemm=g) for g in ("codes", "bitplane")}
        cells = {}
        for label, fn in (("decode", lambda b, g: decode_ms_per_token(b, prompt[:8], 16 if g == "codes" else 3)),
                          ("forward64", lambda b, g: prefill_ms_per_token(b, prompt64))):
            fn(backends["codes"], "codes")                                   # warm-up
            ms = {"codes": [], "bitplane": []}
            for i in range(pairs):
                order = ("codes", "bitplane") if i % 2 == 0 else ("bitplane", "codes")
                for g in order:
                    ms[g].append(fn(backends[g], g))
            ratios = [b / c for b, c in zip(ms["bitplane"], ms["codes"])]
            cells[label] = {"codes_ms_per_token": summary(ms["codes"]), "bitplane_ms_per_token": summary(ms["bitplane"]),
                            "speedup": summary(ratios)}
            print(mode, label, {k: round(v["median"], 2) for k, v in cells[label].items()}, flush=True)
        out[mode] = cells
        del backends
    return out


def _fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}, {s['q3']:.{digits}f}] n={s['n']}"


def _markdown(r: dict) -> str:
    rtn = r["methods"]["rtn"]
    lines = ["# MixPE emulation on SmolLM2-135M-Instruct", "",
             f"{r['date']}. Source {r['source']}: fp32 perplexity {r['fp32_perplexity']:.3f} (2 x 512 held-out wiki "
             f"tokens), fp32 torch decode {r['fp32_decode_ms_per_token']:.1f} ms/token. 4-bit weights, groups of 64. "
             f"Emulation on the batched-codes path. Machine load average (1/5/15 min) {r['load_average_before']} before, "
             f"{r['load_average_after']} after (2 cores; other engineers' work ran concurrently); "
             f"torch threads {r['torch_threads']}; whole run {r['seconds'] / 60:.1f} min.", "",
             "## Quality", "",
             "| weights | dequantized (torch) | W4A16 emulated (fp32 accumulation) | W4A8 emulated |", "|---|---|---|---|"]
    for m, v in r["methods"].items():
        lines.append(f"| {m} | {v['dequantized_torch_perplexity']:.3f} | {v['W4A16_perplexity']:.3f} | "
                     f"{v['W4A8_perplexity']:.3f} |")
    lines += ["", f"W4A16 accumulation precision (RTN): fp32 {rtn['W4A16_perplexity']:.3f}, fp16 "
              f"{rtn['W4A16_fp16_perplexity']:.3f}, bf16 (bf16 activations) {rtn['W4A16_bf16_perplexity']:.3f}.", "",
              "## Emulator speed: batched codes vs bit-planes (same run, interleaved pairs, RTN)", "",
              "ms per token, median [IQR] n; speedup = bit-plane / codes per pair. 1 token per forward: greedy "
              "decode after an 8-token prompt (16 tokens codes, 3 tokens bit-plane per repetition); 64 tokens per forward: one 64-token prefill.", "",
              "| mode | tokens per forward | codes ms/token | bit-plane ms/token | speedup |", "|---|---|---|---|---|"]
    for mode, cells in rtn["speed"].items():
        for label, name in (("decode", "1"), ("forward64", "64")):
            c = cells[label]
            lines.append(f"| {mode} | {name} | {_fmt(c['codes_ms_per_token'])} | {_fmt(c['bitplane_ms_per_token'], 0)} | "
                         f"{_fmt(c['speedup'])}x |")
    cal = r["calibration_row"]
    lines += ["", "## Time and energy model", "",
              "The MixPE simulator's model (edgerun.backends.mixpe.model_design): per GEMM, cycles = max(compute, DRAM "
              "traffic at 1024 bits/cycle), compute with the simulator's per-PE throughput factor; energy = PE leakage "
              "over all cycles + PE dynamic over compute cycles + SRAM + DRAM + static. First its reproduction of the "
              "simulator's published results (results/mixpe_res.csv @ 7e0d42c, **batch 64**, the simulator's "
              f"workloads), calibrated on {cal}:", "",
              "| simulator workload (batch 64) | W4A8 time: model / published | W4A16 time: model / published | "
              "W4A8 energy | W4A16 energy |", "|---|---|---|---|---|"]
    for m, row in r["simulator_rows"].items():
        tag = " (calibration row)" if m == cal else " (check)"
        lines.append(f"| {m}{tag} | {row['W4A8']['time'][0]:.3f} / {row['W4A8']['time'][1]:.2f} | "
                     f"{row['W4A16']['time'][0]:.3f} / {row['W4A16']['time'][1]:.2f} | "
                     f"{row['W4A8']['energy'][0]:.3f} / {row['W4A8']['energy'][1]:.2f} | "
                     f"{row['W4A16']['energy'][0]:.3f} / {row['W4A16']['energy'][1]:.2f} |")
    lines += ["", "The same model on SmolLM2-135M's 210 linear layers (one decode step; batch = sequences decoded together; "
              "FP16 = 1.00 on the same batch):", "",
              "| design | batch | cycles | memory-bound GEMMs | time vs FP16 | energy vs FP16 | array |",
              "|---|---|---|---|---|---|---|"]
    for mode in ("W4A8", "W4A16"):
        models = rtn[f"{mode}_accounting"]["mixpe"]["model"]
        for b in ("batch_1", "batch_64"):
            v = models[b]
            lines.append(f"| MixPE {mode} | {b[6:]} | {v['mixpe']['cycles']:.4g} | {v['mixpe']['memory_bound_gemms']} of "
                         f"{v['mixpe']['gemms']} | {v['time_vs_fp16']:.3f} | {v['energy_vs_fp16']:.3f} | {v['mixpe']['array']} |")
    for b in ("batch_1", "batch_64"):
        f = rtn["W4A8_accounting"]["mixpe"]["model"][b]["fp16"]
        lines.append(f"| FP16 | {b[6:]} | {f['cycles']:.4g} | {f['memory_bound_gemms']} of {f['gemms']} | 1.000 | 1.000 | "
                     f"{f['array']} |")
    lines += ["", "Per token (every linear layer of the model; the counts depend on shapes and codes, RTN shown):", "",
              "| scheme | MACs | shift-adds | dequant ops | row-sum adds | weight MiB moved |", "|---|---|---|---|---|---|"]
    acc = rtn["W4A8_accounting"]
    for scheme, name in (("mixpe", "MixPE W4A8 / W4A16"), ("dequant-loop", "dequantize-in-the-loop W4A16"),
                         ("fp16", "FP16 GEMM")):
        o = acc[scheme]["ops_per_token"]
        lines.append(f"| {name} | {o['macs']:.4g} | {o['shift_adds']:.4g} | {o['dequant_ops']:.4g} | "
                     f"{o['row_sum_adds']:.4g} | {o['weight_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
