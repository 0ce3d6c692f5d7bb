"""Torch-side PTQ on SmolLM2-135M-Instruct: RTN vs GPTQ vs AWQ at 4 and 3 bits (groups of 64).

For each: held-out wiki perplexity by the shared protocol (8 x 512 tokens, torch backend on the
dequantized checkpoint), linear BPW of the written GPTQ-layout checkpoint, quantization wall time,
and the relative output error of block 3's down_proj on real calibration activations (tokens that
start a calibration window, the attention-sink position, reported apart from the others).
The float32 source (Q4_1-dequantized SmolLM2) is measured in the same run.

Usage: python benchmarks/ptq_table.py [--samples 16] [--windows 8]
Writes benchmarks/results/ptq_table.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def layer_errors(source_path, bits: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import converters.ptq as ptq
    from edgerun.calibration import block_inputs, calibration_windows, run_block
    from converters.ptq.methods import METHODS

    tok = AutoTokenizer.from_pretrained(source_path)
    model = AutoModelForCausalLM.from_pretrained(source_path, dtype=torch.float32)
    seq = 512
    hiddens, kwargs = block_inputs(model, calibration_windows(tok, 8, seq))
    for layer in model.model.layers[:3]:
        hiddens = run_block(layer, hiddens, kwargs)
    x = ptq._record_inputs(model.model.layers[3], hiddens, kwargs)["mlp.down_proj"]
    w = model.model.layers[3].mlp.down_proj.weight.detach().float()
    first = torch.zeros(x.shape[0], dtype=torch.bool)
    first[::seq] = True
    ref = x @ w.T
    out = {}
    for m in ("rtn", "gptq", "awq"):
        ql, s = METHODS[m](w, x, bits, 64)
        xs = x if s is None else x / s[None, :]
        err = (xs @ ql.dequantize().T - ref).pow(2)
        out[m] = {"typical_tokens": (err[~first].mean() / ref[~first].pow(2).mean()).item(),
                  "window_first_tokens": (err[first].mean() / ref[first].pow(2).mean()).item()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from converters.ptq import quantize_checkpoint
    from converters.source import open_source
    from edgerun.backends.torch import TorchBackend
    from profilers.accuracy import perplexity
    from converters.bpw import checkpoint_bpw

    source = open_source("smollm2-135m-instruct", progress=False)

    def ppl(path):
        b = TorchBackend(path, n_ctx=520)
        try:
            return (perplexity(b, str(path), n_windows=args.windows).perplexity,
                    perplexity(b, str(path), dataset="tiny", n_windows=2).perplexity)
        finally:
            b.close()

    src_ppl, src_tiny = ppl(source.path)
    print(f"source {source.label}: perplexity {src_ppl:.3f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (4, 3):
            errors = layer_errors(source.path, bits)
            for method in ("rtn", "gptq", "awq"):
                out = Path(tmp) / f"{method}-{bits}"
                t0 = time.perf_counter()
                quantize_checkpoint(source.path, out, method=method, bits=bits, group_size=64, n_samples=args.samples)
                seconds = time.perf_counter() - t0
                p, p_tiny = ppl(out)
                bpw = checkpoint_bpw(out)
                rows.append({"method": method, "bits": bits, "group_size": 64, "perplexity": p,
                             "perplexity_tiny": p_tiny, "perplexity_tiny_vs_source": p_tiny / src_tiny - 1,
                             "perplexity_vs_source": p / src_ppl - 1, "linear_bpw": bpw.linear_bpw,
                             "file_bpw": bpw.file_bpw, "seconds": seconds, "block3_down_proj_error": errors[method]})
                print(f"{method} w{bits}g64: ppl {p:.3f} ({(p / src_ppl - 1) * 100:+.1f}%), linear BPW {bpw.linear_bpw:.3f}, "
                      f"{seconds:.0f} s, layer error {errors[method]}", flush=True)
    result = {"benchmark": "ptq_table", "source": source.label, "source_perplexity": src_ppl,
              "source_perplexity_tiny": src_tiny,
              "calibration": {"dataset": "wiki", "split": "calibration", "windows": args.samples, "tokens": 512},
              "protocol": {"dataset": "wiki", "split": "heldout", "window": 512, "windows": args.windows},
              "rows": rows, "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ptq_table.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Torch-side PTQ: SmolLM2-135M-Instruct", "",
          f"{result['date']}. Source {source.label} (float32): perplexity {src_ppl:.3f} on held-out wiki "
          f"({args.windows} x 512 tokens, torch) and {src_tiny:.3f} on held-out tiny stories (2 x 512). "
          f"Calibration: {args.samples} x 512 tokens of the wiki calibration split.",
          "", "| method | bits | linear BPW | wiki perplexity | vs source | tiny perplexity | vs source | time s | "
          "block-3 down_proj rel. error (typical / window-first tokens) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["block3_down_proj_error"]
        md.append(f"| {r['method']} | {r['bits']} | {r['linear_bpw']:.3f} | {r['perplexity']:.3f} | "
                  f"{r['perplexity_vs_source'] * 100:+.1f}% | {r['perplexity_tiny']:.3f} | "
                  f"{r['perplexity_tiny_vs_source'] * 100:+.1f}% | {r['seconds']:.0f} | "
                  f"{e['typical_tokens']:.2e} / {e['window_first_tokens']:.2e} |")
    md.append("")
    (args.out / "ptq_table.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
