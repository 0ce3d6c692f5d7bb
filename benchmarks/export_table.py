"""Export table for SmolLM2-135M-Instruct: every GGUF type and the ONNX fp32/int8/int4 variants.

For each output: effective BPW measured from the written file (file BPW and linear BPW), the
tensor-type mix of the linear layers, file size, export time, and perplexity on held-out wiki text
by the shared protocol (``profilers.accuracy``: 8 windows of 512 tokens), next to the source's
perplexity measured in the same run. The source is the Q4_1 GGUF dequantized to float32, so no
format above ~5 bits can beat it. Also the F32 writer's exactness: max |logit difference| between
the F32 GGUF in llama.cpp (F32 KV cache) and the float32 source in transformers, over its range.

Usage: python benchmarks/export_table.py [--windows 8] [--out benchmarks/results]
Writes export_table.json and export_table.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
              "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q2_K"]
ONNX_VARIANTS = [("fp32", "builder"), ("int8", "dynamic"), ("int8", "builder"), ("int4", "builder"), ("int4", "hqq")]
PROMPT = "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"


def f32_parity(source, f32) -> dict:
    from edgerun.backends.llamacpp import LlamaCppBackend
    from edgerun.backends.torch import TorchBackend

    ref = TorchBackend(source.path, n_ctx=256)
    eng = LlamaCppBackend(f32, n_ctx=256, cache_type_k="f32", cache_type_v="f32")
    tokens = ref.encode_prompt(PROMPT)
    a, b = ref.logits(tokens), eng.logits(tokens)
    eng.close()
    diff = float(abs(a - b).max())
    rng = float(a.max() - a.min())
    return {"tokens": len(tokens), "max_abs_diff": diff, "logit_range": rng, "relative": diff / rng,
            "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--only", nargs="*", choices=["gguf", "onnx"], help="run only these formats")
    args = ap.parse_args(argv)

    from converters.export import export, f32_cache
    from converters.source import open_source
    from edgerun.backends import open_backend
    from profilers.accuracy import perplexity

    source = open_source(args.model, progress=False)
    f32 = f32_cache(source)
    ctx = 512 + 8

    def ppl(path, engine, label, **opts):
        b = open_backend(engine, path, n_ctx=ctx, **opts)
        try:
            return perplexity(b, label, window=512, n_windows=args.windows).perplexity
        finally:
            b.close()

    rows = []
    src_ppl = ppl(f32, "llama.cpp", source.label, cache_type_k="f32", cache_type_v="f32")
    parity = f32_parity(source, f32)
    print(f"source {source.label}: perplexity {src_ppl:.3f}; F32 parity {parity['relative']:.2e}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [("gguf", t, "default") for t in GGUF_TYPES] + [("onnx", p, a) for p, a in ONNX_VARIANTS]
        if args.only:
            jobs = [j for j in jobs if j[0] in args.only]
        for fmt, quant, algo in jobs:
            default = {"int8": "dynamic"}.get(quant, "builder")
            name = f"{quant}" if fmt == "gguf" else f"onnx-{quant}" + ("" if algo == default else f"-{algo}")
            out = Path(tmp) / (f"{name}.gguf" if fmt == "gguf" else name)
            t0 = time.perf_counter()
            result = export(args.model, to=fmt, quant=quant, out=out, verify=False, progress=False,
                            log=lambda m: None, onnx_algo=algo)
            seconds = time.perf_counter() - t0
            bpw = result.record["bpw"]
            p = ppl(out, "llama.cpp" if fmt == "gguf" else "onnx", name)
            rows.append({"format": fmt, "type": quant, "algo": algo, "name": name, "size_bytes": bpw["file_bytes"],
                         "file_bpw": bpw["file_bpw"], "linear_bpw": bpw["linear_bpw"],
                         "embedding_bpw": bpw["embedding_bpw"], "linear_tensor_types": bpw["linear_tensor_types"],
                         "perplexity": p, "perplexity_vs_source": p / src_ppl - 1, "export_seconds": seconds})
            print(f"{name:14s} file BPW {bpw['file_bpw']:6.3f} linear BPW {bpw['linear_bpw']:6.3f} "
                  f"ppl {p:8.3f} ({(p / src_ppl - 1) * 100:+6.2f}%) {seconds:5.1f} s", flush=True)
            if out.is_dir():
                import shutil
                shutil.rmtree(out)
            else:
                out.unlink()
    result = {"benchmark": "export_table", "model": args.model, "source": source.label, "source_perplexity": src_ppl,
              "protocol": {"dataset": "wiki", "split": "heldout", "window": 512, "windows": args.windows},
              "f32_parity": parity, "rows": rows, "date": time.strftime("%Y-%m-%d"),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_table.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Export table: {args.model}", "",
          f"{result['date']}. Source: {source.label} (float32), perplexity {src_ppl:.3f} on held-out wiki "
          f"({args.windows} windows x 512 tokens, llama.cpp F32). F32 writer exactness: max |logit diff| "
          f"{parity['max_abs_diff']:.2e} over a logit range of {parity['logit_range']:.1f} "
          f"({parity['relative']:.1e} relative), argmax agreement {parity['argmax_agreement']:.0%}.", "",
          "| output | size MiB | file BPW | linear BPW | embedding BPW | linear tensor types | perplexity | vs source | export s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in r["linear_tensor_types"].items())
        emb = f"{r['embedding_bpw']:.2f}" if r["embedding_bpw"] else "-"
        md.append(f"| {r['name']} | {r['size_bytes'] / 2**20:.1f} | {r['file_bpw']:.3f} | {r['linear_bpw']:.3f} | {emb} | "
                  f"{mix} | {r['perplexity']:.3f} | {r['perplexity_vs_source'] * 100:+.2f}% | {r['export_seconds']:.1f} |")
    md.append("")
    (args.out / "export_table.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
