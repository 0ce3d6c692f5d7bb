"""MixPE emulation on SmolLM2-135M-Instruct: quality, operations, the simulator time/energy model, emulator speed.

Weights: 4-bit, groups of 64, RTN and GPTQ (16 x 512 wiki calibration tokens). For each: perplexity
(shared protocol, 2 x 512 held-out wiki tokens) of W4A16 and W4A8 emulation (batched-codes path)
next to the float32 source and the same weights dequantized in plain torch; for RTN also W4A16 with
fp16 and bf16 accumulation. Per-token operation counts; the MixPE simulator's time/energy model
(edgerun.backends.mixpe.model_design) on the model's linear layers at batch 1 and batch 64,
normalized to FP16 = 1.00, after reproducing the simulator's published OPT-6.7B row (its batch-64
workloads). Emulator speed: the batched-codes path against the bit-plane path (the oracle) in the
same run, interleaved, per token of a model forward of 1 token (the decode shape) and of 64 tokens:
median [IQR] n of wall and CPU ms/token and of the per-pair ratios. Machine load (os.getloadavg, as
uptime) recorded before and after: other work may share the 2 cores. Quality and speed can run as
separate processes (--part), each writing its JSON part; the last one (or --part report) merges.

Usage: python benchmarks/mixpe_table.py [--pairs N] [--part all|quality|speed|report]
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


def summary(xs: list[float]) -> dict:
    from profilers.report import quartiles

    q1, med, q3 = quartiles(xs)
    return {"median": med, "q1": q1, "q3": q3, "n": len(xs), "values": xs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5, help="interleaved codes/bit-plane pairs per speed cell")
    ap.add_argument("--part", choices=("all", "quality", "speed", "report"), default="all",
                    help="quality and speed run as separate processes (each writes its JSON part); report merges")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the speed part (1 is robust when other work oversubscribes the cores)")
    ap.add_argument("--checkpoint", default=None, help="speed part: an existing RTN 4-bit g64 checkpoint to reuse")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "quality"):
        quality()
    if args.part in ("all", "speed"):
        speed_part(args.pairs, args.threads, args.checkpoint)
    r = json.loads((RESULTS / "mixpe_table.quality.json").read_text())
    r["speed"] = json.loads((RESULTS / "mixpe_table.speed.json").read_text())
    (RESULTS / "mixpe_table.json").write_text(json.dumps(r, indent=2) + "\n")
    (RESULTS / "mixpe_table.md").write_text(_markdown(r))
    print(_markdown(r))
    return 0


def _write(name: str, data: dict) -> None:
    (RESULTS / f"mixpe_table.{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def quality() -> None:
    """Perplexities, op counts and the model (RTN, GPTQ), written after every measurement."""
    from converters.ptq import quantize_checkpoint
    from converters.source import open_source
    from edgerun.backends import mixpe
    from edgerun.backends.mixpe import MixPEBackend
    from edgerun.backends.torch import TorchBackend
    from profilers.accuracy import perplexity

    t_start = time.perf_counter()
    source = open_source("smollm2-135m-instruct", progress=False)

    def ppl(b, label):
        return perplexity(b, label, window=512, n_windows=2).perplexity

    fp32 = TorchBackend(source.path, n_ctx=520)
    prompt = fp32.encode_prompt(PROMPT)
    table = mixpe.load_cost_table()
    result = {"benchmark": "mixpe_table", "source": source.label, "date": time.strftime("%Y-%m-%d"),
              "load_average_before": load_average(), "fp32_perplexity": ppl(fp32, "fp32"),
              "fp32_decode_ms_per_token": decode_ms_per_token(fp32, prompt, 32), "methods": {},
              "simulator_rows": {m: mixpe.reproduce_simulator_row(m, table) for m in mixpe.SIMULATOR_MODELS},
              "calibration_row": mixpe.CALIBRATION_ROW}
    del fp32
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("rtn", "gptq"):
            ckpt = quantize_checkpoint(source.path, Path(tmp) / method, method=method, bits=4, group_size=64,
                                       n_samples=16)
            row = result["methods"][method] = {}
            row["dequantized_torch_perplexity"] = ppl(TorchBackend(ckpt, n_ctx=520), method)
            for mode in ("W4A16", "W4A8"):
                emu = MixPEBackend(ckpt, mode, n_ctx=520)
                row[f"{mode}_perplexity"] = ppl(emu, f"{method} {mode}")
                row[f"{mode}_accounting"] = emu.accounting()
                _write("quality", result)
                print(method, mode, row[f"{mode}_perplexity"], flush=True)
            if method == "rtn":
                for accum in ("fp16", "bf16"):
                    row[f"W4A16_{accum}_perplexity"] = ppl(MixPEBackend(ckpt, "W4A16", n_ctx=520, accum=accum),
                                                          f"{method} W4A16 {accum}")
                    _write("quality", result)
                    print(method, accum, row[f"W4A16_{accum}_perplexity"], flush=True)
    result["load_average_after"] = load_average()
    result["seconds"] = time.perf_counter() - t_start
    _write("quality", result)


def speed_part(pairs: int, threads: int | None = None, checkpoint: str | None = None) -> None:
    """The speed cells on RTN weights, written to mixpe_table.speed.json."""
    from converters.ptq import quantize_checkpoint
    from converters.source import open_source
    from edgerun.backends.torch import TorchBackend
    import torch

    if threads:
        torch.set_num_threads(threads)
    before, t0 = load_average(), time.perf_counter()
    source = open_source("smollm2-135m-instruct", progress=False)
    prompt = TorchBackend(source.path, n_ctx=64).encode_prompt(PROMPT)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint or quantize_checkpoint(source.path, Path(tmp) / "rtn", method="rtn", bits=4, group_size=64,
                                                 n_samples=16)
        out = speed(ckpt, prompt, (prompt * 4)[:64], pairs, threads)
    out.update(load_average_before=before, load_average_after=load_average(), seconds=time.perf_counter() - t0,
               torch_threads=threads or torch.get_num_threads())
    _write("speed", out)


def forward_ms_per_token(backend, ids: list[int], reps: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per token of ``reps`` forwards of ``ids`` through the model, no KV cache.

    CPU time is this thread's (time.thread_time): with one torch thread it is the work itself, robust to
    other processes sharing the cores, while wall time also holds the waits for a time slice.
    """
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(reps):
            backend.model(x)
        w1, c1 = time.perf_counter(), time.thread_time()
    n = reps * len(ids)
    return (w1 - w0) * 1e3 / n, (c1 - c0) * 1e3 / n


def gemm_ms_per_token(backend, tokens: int, reps: int) -> float:
    """CPU ms per token of the MixPE linear layers alone: block 0's seven layers run ``reps`` times on
    random activations of ``tokens`` rows, times the number of blocks (every block has the same shapes)."""
    import torch

    from edgerun.backends.mixpe import MixPELinear

    layers = [m for n, m in backend.model.named_modules() if isinstance(m, MixPELinear) and ".layers.0." in n]
    blocks = backend.model.config.num_hidden_layers
    xs = [torch.randn(1, tokens, m.shape[0], generator=torch.Generator().manual_seed(i)) for i, m in enumerate(layers)]
    with torch.no_grad():
        c0 = time.thread_time()
        for _ in range(reps):
            for m, x in zip(layers, xs):
                m(x)
        c1 = time.thread_time()
    return (c1 - c0) * 1e3 * blocks / (reps * tokens)


def speed(ckpt, prompt, prompt64, pairs: int, threads: int | None = None) -> dict:
    """Batched codes vs bit-planes, interleaved A B B A ..., per mode: ms/token at 1 and 64 tokens per forward."""
    from edgerun.backends.mixpe import MixPEBackend

    extra = {"threads": threads} if threads else {}
    out = {}
    for mode in ("W4A8", "W4A16"):
        backends = {g: MixPEBackend(ckpt, mode, n_ctx=256, gemm=g, **extra) for g in ("codes", "bitplane")}
        cells = {}
        for label, ids in (("decode", prompt[:1]), ("forward64", prompt64)):
            reps = {"codes": 20 if len(ids) == 1 else 3, "bitplane": 2 if len(ids) == 1 else 1}
            forward_ms_per_token(backends["codes"], ids, 2)                   # warm-up
            wall = {"codes": [], "bitplane": []}
            cpu = {"codes": [], "bitplane": []}
            for i in range(pairs):
                order = ("codes", "bitplane") if i % 2 == 0 else ("bitplane", "codes")
                for g in order:
                    w, c = forward_ms_per_token(backends[g], ids, reps[g])
                    wall[g].append(w)
                    cpu[g].append(c)
            gemm = {"codes": [], "bitplane": []}
            for i in range(pairs):                                           # the linear layers alone
                for g in (("codes", "bitplane") if i % 2 == 0 else ("bitplane", "codes")):
                    gemm[g].append(gemm_ms_per_token(backends[g], len(ids), reps[g]))
            cells[label] = {"codes_ms_per_token": summary(wall["codes"]), "bitplane_ms_per_token": summary(wall["bitplane"]),
                            "codes_gemm_cpu_ms_per_token": summary(gemm["codes"]),
                            "bitplane_gemm_cpu_ms_per_token": summary(gemm["bitplane"]),
                            "gemm_cpu_speedup": summary([b / c for b, c in zip(gemm["bitplane"], gemm["codes"])]),
                            "codes_rest_cpu_ms_per_token": summary([m - g for m, g in zip(cpu["codes"], gemm["codes"])]),
                            "speedup": summary([b / c for b, c in zip(wall["bitplane"], wall["codes"])]),
                            "codes_cpu_ms_per_token": summary(cpu["codes"]),
                            "bitplane_cpu_ms_per_token": summary(cpu["bitplane"]),
                            "cpu_speedup": summary([b / c for b, c in zip(cpu["bitplane"], cpu["codes"])])}
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
             f"Emulation on the batched-codes path. Machine load average (1/5/15 min, 2 cores; other engineers' work ran "
             f"concurrently): quality part {r['load_average_before']} before, {r.get('load_average_after')} after "
             f"({r.get('seconds', 0) / 60:.0f} min); speed part {r['speed']['load_average_before']} before, "
             f"{r['speed']['load_average_after']} after ({r['speed']['seconds'] / 60:.0f} min, torch threads "
             f"{r['speed']['torch_threads']}). The parts ran as separate processes; the fp32 decode figure is from the "
             f"quality part, under that load.", "",
             "## Quality", "",
             "| weights | dequantized (torch) | W4A16 emulated (fp32 accumulation) | W4A8 emulated |", "|---|---|---|---|"]
    for m, v in r["methods"].items():
        cells = [f"{v[k]:.3f}" if k in v else "not run" for k in
                 ("dequantized_torch_perplexity", "W4A16_perplexity", "W4A8_perplexity")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "W4A16_bf16_perplexity" in rtn:
        lines += ["", f"W4A16 accumulation precision (RTN): fp32 {rtn['W4A16_perplexity']:.3f}, fp16 "
                  f"{rtn['W4A16_fp16_perplexity']:.3f}, bf16 (bf16 activations) {rtn['W4A16_bf16_perplexity']:.3f}."]
    lines += ["",
              "## Emulator speed: batched codes vs bit-planes (same run, interleaved pairs, RTN)", "",
              "Per token, median [IQR] n over interleaved repetitions; speedup = bit-plane / codes per pair. One model "
              "forward without KV cache of 1 token (the decode shape) or of 64 tokens. Wall ms holds the waits for a "
              "time slice when other processes share the cores; CPU ms (this thread's, torch threads "
              f"{r['speed']['torch_threads']}) is the work itself.", "",
              "| mode | tokens per forward | codes wall ms | bit-plane wall ms | wall speedup | codes CPU ms | "
              "bit-plane CPU ms | CPU speedup |", "|---|---|---|---|---|---|---|---|"]
    sp = r["speed"]
    for mode in ("W4A8", "W4A16"):
        for label, name in (("decode", "1"), ("forward64", "64")):
            c = sp[mode][label]
            lines.append(f"| {mode} | {name} | {_fmt(c['codes_ms_per_token'])} | {_fmt(c['bitplane_ms_per_token'], 0)} | "
                         f"{_fmt(c['speedup'])}x | {_fmt(c['codes_cpu_ms_per_token'])} | "
                         f"{_fmt(c['bitplane_cpu_ms_per_token'], 0)} | {_fmt(c['cpu_speedup'])}x |")
    if "gemm_cpu_speedup" in sp["W4A8"]["decode"]:
        lines += ["", "The MixPE GEMMs alone (block 0's seven linear layers on random activations, x 30 blocks; CPU ms "
                  "per token, same interleaving) and what the rest of the model costs on the codes path (attention, "
                  "norms, embeddings and the float32 lm_head: the same on both paths, so it caps the whole-model "
                  "speedup at (bit-plane GEMMs + rest) / rest):", "",
                  "| mode | tokens per forward | codes GEMM CPU ms | bit-plane GEMM CPU ms | GEMM speedup | rest of the "
                  "model (codes) CPU ms | whole-model ceiling |", "|---|---|---|---|---|---|---|"]
        for mode in ("W4A8", "W4A16"):
            for label, name in (("decode", "1"), ("forward64", "64")):
                c = sp[mode][label]
                rest = c["codes_rest_cpu_ms_per_token"]["median"]
                ceiling = (c["bitplane_gemm_cpu_ms_per_token"]["median"] + rest) / max(rest, 1e-9)
                lines.append(f"| {mode} | {name} | {_fmt(c['codes_gemm_cpu_ms_per_token'])} | "
                             f"{_fmt(c['bitplane_gemm_cpu_ms_per_token'], 0)} | {_fmt(c['gemm_cpu_speedup'])}x | "
                             f"{_fmt(c['codes_rest_cpu_ms_per_token'])} | {ceiling:.0f}x |")
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
