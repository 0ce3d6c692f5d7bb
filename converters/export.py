"""``edgerun export``: source -> (passes) -> writer -> manifest -> verification.

GGUF flow: the source checkpoint is written once as an exact F32 GGUF (cached under
``$EDGERUN_HOME/cache/f32/``), then quantized by llama.cpp to the requested type. Verification loads
the output in llama.cpp and prints its perplexity on a held-out slice of the wiki calibration text
next to the source's (the cached F32 GGUF in llama.cpp, which matches the source's torch logits to
~1e-6 of their range), both measured in the same run by the shared protocol
(``profilers.accuracy``, passed in as ``verify``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from converters import gguf as gguf_writer
from converters import manifest as manifest_mod
from converters.bpw import checkpoint_bpw, gguf_bpw, onnx_bpw
from converters.source import TOKENIZER_FILES, Source, open_source
from edgerun import catalog
from edgerun.backends import open_backend
from edgerun.errors import UsageError
from edgerun.formats.safetensors import read_config
from edgerun.moe.store import MOE_KEY, is_carved

FORMATS = ("gguf", "onnx", "hf")
VERIFY_WINDOWS = 4
VERIFY_WINDOW = 512


@dataclass
class ExportResult:
    """What an export wrote and measured.

    Attributes:
        output: the exported file or directory.
        manifest: path of its manifest.
        record: the manifest's content.
    """

    output: Path
    manifest: Path
    record: dict = field(default_factory=dict)


def default_output(source: Source, src_name: str, to: str, quant: str) -> Path:
    """``./<model>-<QUANT>.gguf``, ``./<model>-onnx-<quant>/`` or ``./<model>-<ptq>-w<bits>g<group>/``."""
    base = src_name if src_name in catalog.CATALOG else source.path.name
    base = Path(base).name.removesuffix(".gguf")
    name = {"gguf": f"{base}-{quant}.gguf", "onnx": f"{base}-onnx-{quant}", "hf": f"{base}-{quant}"}[to]
    return Path.cwd() / name


def f32_cache(source: Source | Path, progress: Callable | None = None, label: str | None = None) -> Path:
    """A checkpoint (a Source, or a checkpoint directory) written as an F32 GGUF, cached per checkpoint."""
    path = source.path if isinstance(source, Source) else Path(source)
    name = label or (source.label if isinstance(source, Source) else path.name)
    out = catalog.home() / "cache" / "f32" / f"{path.name}.gguf"
    if not out.exists() or out.stat().st_mtime < (path / "config.json").stat().st_mtime:
        gguf_writer.write_f32(path, out, name=name, force=True, progress=progress)
    return out


def carved_cache(source: Source, config: str, tokens: int, progress: bool, log: Callable[[str], None]) -> Path:
    """The source carved with CMoE ``config`` on ``tokens`` calibration tokens, cached under $EDGERUN_HOME."""
    from converters.carve import carve_checkpoint
    from edgerun.moe import config as moe_config

    cfg = moe_config.parse(config, int(read_config(source.path)["intermediate_size"]))
    out = catalog.home() / "cache" / "carved" / f"{source.path.name}-{cfg.name}-t{tokens}"
    if not (out / "config.json").is_file():
        log(f"carving {source.label} into {cfg.name} (CMoE, {tokens} calibration tokens)")
        carve_checkpoint(source.path, out, cfg.name, tokens=tokens, force=True,
                         progress=_bar(f"carving {cfg.name}", progress))
    return out


def finetuned_cache(carved: Path, minutes: float, progress: bool, log: Callable[[str], None]) -> Path:
    """The carved checkpoint after CMoE's light fine-tune (gate scale, bias balancing, LoRA), cached."""
    from converters.cmoe_finetune import finetune

    out = carved.with_name(f"{carved.name}-ft{minutes:g}m")
    if not (out / "config.json").is_file():
        log(f"fine-tuning {carved.name} for {minutes:g} minutes (gate scales, bias load balancing, LoRA r=8)")
        _, report = finetune(carved, out, minutes=minutes, force=True)
        log(f"fine-tune: {report.steps} steps, loss {report.loss_first:.3f} -> {report.loss_last:.3f} nats/token, "
            f"load imbalance {report.imbalance_first:.2f} -> {report.imbalance_last:.2f}")
    return out


def granite_cache(carved: Path, progress: bool, log: Callable[[str], None]) -> Path:
    """A carved checkpoint hosted as Granite's shared-expert MoE with a fitted linear router, cached."""
    from converters.moe_export import to_granite

    out = carved.with_name(carved.name + "-granite")
    if not (out / "config.json").is_file():
        log("fitting linear routers to CMoE's choices (Granite shared-expert MoE host)")
        to_granite(carved, out, force=True, progress=_bar("routers", progress))
    return out


def merged_cache(source: Source, src: str, merge_arg: str, method: str | None, progress: bool,
                 log: Callable[[str], None]) -> tuple[Path, dict]:
    """The source merged per ``merge_arg`` (a YAML recipe, or one model with ``method``), cached by content.

    The cache key hashes the recipe (method, hyper-parameters, models) and each input's files (size
    and modification time of its safetensors, config and tokenizer files), so a changed input is
    merged again.
    """
    import hashlib
    import json

    from converters import merge as mg

    if Path(merge_arg).suffix.lower() in (".yaml", ".yml"):
        if method:
            raise UsageError("--merge-method applies to --merge MODEL; a recipe names its merge_method")
        recipe = mg.load_recipe(merge_arg, base=src)
    else:
        recipe = mg.Recipe(base=src, models=(merge_arg,), spec=mg.make_spec(method or "task-arithmetic"))
    models = [open_source(m, progress=progress) for m in recipe.models]
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for s in [source] + models
             for f in sorted(s.path.glob("*.safetensors")) + [s.path / n for n in ("config.json", *TOKENIZER_FILES)]
             if f.is_file()]
    key = hashlib.sha256(json.dumps([recipe.as_dict(), [str(m.path) for m in models], stamp],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = catalog.home() / "cache" / "merged" / f"{source.path.name}-{recipe.spec.method}-{key}"
    if not (out / mg.MERGE_META).is_file():
        log(f"merging {', '.join(recipe.models)} into {source.label} ({recipe.spec.method})")
        tok = recipe.tokenizer_from
        if tok not in (None, "auto", "base"):
            tok = str(open_source(tok, progress=False).path)
        mg.merge(source.path, [m.path for m in models], out, recipe.spec, force=True, tokenizer_from=tok,
                 context_length=recipe.context_length, progress=progress, log=log)
    record = json.loads((out / mg.MERGE_META).read_text(encoding="utf-8"))
    return out, {"name": "merge", **record["merge"], "models": [m.as_dict() for m in models],
                 "config_and_tokenizer_from": record["config_and_tokenizer_from"],
                 "merge_seconds": record["seconds"], "checkpoint": str(out)}


def _prune_host(host: Path, spec: str, patterns, log) -> tuple[Path, dict]:
    """PEP on the engine host: the task's pattern (given or calibrated and cached), then the pruned host (cached)."""
    from converters.prune import parse_spec, prune_host
    from edgerun.moe import tcess
    from edgerun.moe.calibrate import task_pattern

    task, a, b = parse_spec(spec)
    pattern, path = task_pattern(host, task, patterns)
    cfg = read_config(host)
    tcess.check_model(pattern, {"layers": cfg["num_hidden_layers"], "experts": cfg["num_local_experts"],
                                "top_k": cfg["num_experts_per_tok"]})
    keep = pattern.keep(b)
    out = host.with_name(f"{host.name}-{task}-{a}of{b}-{pattern.score}")
    if not (out / "config.json").is_file():
        log(f"pruning to the top {b} experts of task '{task}' per layer, routing top-{a} ({pattern.score} TCESS)")
        prune_host(host, out, keep, a, {"task": task, "pattern": str(path), "score": pattern.score}, force=True)
    return out, {"name": "prune-experts", "method": "premoe-pep", "task": task, "a": a, "b": b,
                 "pattern": str(path), "score": pattern.score, "pattern_tokens": pattern.tokens, "keep": keep}


def export(src: str, to: str = "gguf", quant: str | None = None, out: str | Path | None = None, force: bool = False,
           token_embedding_type: str | None = None, output_tensor_type: str | None = None, verify: Callable | None = None,
           threads: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
           block_size: int = 32, onnx_algo: str = "default", ptq: str | None = None, bits: int = 4,
           group_size: int = 64, calib_samples: int = 16, carve: str | None = None,
           carve_tokens: int = 16384, prune_experts: str | None = None,
           patterns: str | Path | None = None, finetune_minutes: float | None = None,
           merge: str | None = None, merge_method: str | None = None) -> ExportResult:
    """Export ``src`` (catalog name, ``.gguf`` path or HF checkpoint directory) to ``to`` at ``quant``.

    Args:
        src: the source model.
        to: output format, ``"gguf"`` or ``"onnx"``.
        quant: GGUF type (default ``Q8_0``; see :data:`converters.gguf.OUTPUT_TYPES`) or ONNX precision
            (``fp32``, ``int8``, ``int4``; default ``int4``).
        out: output path (default: a name saying model, format and type, in the current directory).
        force: overwrite an existing output.
        token_embedding_type, output_tensor_type: per-tensor ggml types for the embedding / output head.
        verify: the quality protocol's perplexity function (``profilers.accuracy.perplexity``, passed in
            because converters do not import profilers): load the output and print its perplexity next
            to the source's. None skips verification.
        threads: CPU threads for quantization and verification.
        progress: show progress bars.
        log: where one-line progress messages go.
        block_size: ONNX int4 block size (32, 64, 128).
        onnx_algo: ONNX weight algorithm: int4 ``builder`` (default), ``rtn``, ``hqq``, ``gptq``; int8
            ``dynamic`` (default) or ``builder``.
        ptq: torch-side PTQ method (``rtn``, ``gptq``, ``awq``) for ``to="hf"``: a GPTQ-layout checkpoint.
        bits, group_size: PTQ weight bits (2, 3, 4, 8) and input columns per scale.
        calib_samples: PTQ calibration windows of 512 tokens from the wiki calibration split.
        carve: a CMoE configuration (``SxAyEz``): carve the source into an MoE first; the GGUF/ONNX
            output hosts it as Granite's shared-expert MoE with fitted linear routers.
        carve_tokens: CMoE calibration tokens.
        finetune_minutes: with ``carve``, CMoE's optional fine-tune (gate scale, bias load balancing,
            LoRA; :mod:`converters.cmoe_finetune`) bounded to this many minutes.
        prune_experts: ``TASK:a/b`` (PreMoe PEP): keep the task's top-b routed experts per layer, route
            top-a. Needs an MoE (``carve`` or a carved source).
        patterns: directory of expert patterns (``edgerun experts calibrate``); without it a built-in
            task's pattern is calibrated on the model and cached.
        merge: a merge pass first (:mod:`converters.merge`): a mergekit-style YAML recipe whose base is
            ``src``, or one model to merge into ``src`` with ``merge_method`` and its default
            hyper-parameters. The merged checkpoint is cached under ``$EDGERUN_HOME/cache/merged/``.
        merge_method: with a model as ``merge``: task-arithmetic (default), ties, dare, dare-ties,
            aim-ties, svd.

    Raises:
        UsageError: unknown format or type, output exists without ``force``, unsupported architecture.
        ModelFileError, UnknownModelError, DownloadError: bad or missing source.
        BackendError: llama.cpp fails.
    """
    t0 = time.perf_counter()
    to = to.lower()
    if to not in FORMATS:
        raise UsageError(f"unknown export format '{to}'; supported: {', '.join(FORMATS)}")
    if to == "hf":
        if ptq is None:
            raise UsageError("--to hf writes a PTQ checkpoint: give --ptq rtn|gptq|awq")
        quant = f"{ptq}-w{bits}g{group_size}"
    elif ptq is not None:
        raise UsageError("--ptq writes a Hugging Face checkpoint: use it with --to hf")
    if finetune_minutes is not None and (finetune_minutes <= 0 or not carve):
        raise UsageError("--finetune MINUTES needs a positive bound and --carve SxAyEz")
    if prune_experts:
        from converters.prune import parse_spec

        parse_spec(prune_experts)
    if merge_method and not merge:
        raise UsageError("--merge-method needs --merge MODEL")
    if merge and (carve or prune_experts):
        raise UsageError("--merge does not combine with --carve or --prune-experts yet: merge first "
                         "(edgerun merge), then export the merged checkpoint with them")
    if to == "gguf":
        quant = gguf_writer.check_type(quant or "Q8_0")
        gguf_writer.check_tensor_type(token_embedding_type, "--token-embedding-type")
        gguf_writer.check_tensor_type(output_tensor_type, "--output-tensor-type")
    elif to == "onnx":
        from converters.onnx import check_options

        if token_embedding_type or output_tensor_type:
            raise UsageError("--token-embedding-type and --output-tensor-type apply to GGUF exports only")
        quant, block_size, onnx_algo = check_options(quant or "int4", block_size, onnx_algo)
    if out is not None and Path(out).exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    source = open_source(src, progress=progress)
    out = Path(out) if out else default_output(source, str(src), to, quant)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    log(f"source: {source.label} ({source.architecture}) at {source.path}")

    model_path, label, passes = source.path, source.label, []
    if merge:
        model_path, step = merged_cache(source, str(src), merge, merge_method, progress, log)
        passes.append(step)
        label = f"{source.label} merged {step['method']}"
    elif carve or is_carved(read_config(source.path)):
        if to == "hf":
            raise UsageError("--to hf with --ptq takes a dense source; carve and PTQ do not combine yet")
        carved = carved_cache(source, carve, carve_tokens, progress, log) if carve else source.path
        meta = read_config(carved)[MOE_KEY]
        passes.append({"name": "carve", "method": "cmoe", "config": meta["name"], "calibration": meta["calibration"],
                       "carve_seconds": meta.get("carve_seconds"), "checkpoint": str(carved)})
        if finetune_minutes:
            carved = finetuned_cache(carved, finetune_minutes, progress, log)
            ft = read_config(carved)[MOE_KEY]["finetune"]
            passes.append({"name": "cmoe-finetune", **{k: ft[k] for k in ("steps", "tokens", "seconds", "loss_first",
                                                                          "loss_last", "lora", "lr", "bias_step")},
                           "checkpoint": str(carved)})
        model_path = granite_cache(carved, progress, log)
        host = read_config(model_path)[MOE_KEY]
        passes.append({"name": "host-as-granitemoe", "router": "linear, fitted to CMoE's top-k",
                       "router_temperature": host["router_temperature"],
                       "router_agreement_mean": host["router_agreement_mean"],
                       "router_agreement_by_layer": host["router_agreement"], "checkpoint": str(model_path)})
        label = f"{source.label} carved {meta['name']}"
        log(f"router agreement with CMoE's top-{meta['active']} on held-out tokens: "
            f"{host['router_agreement_mean']:.1%} (mean over layers)")
        if prune_experts:
            model_path, step = _prune_host(model_path, prune_experts, patterns, log)
            passes.append(step)
            label += f" pruned {step['task']}:{step['a']}/{step['b']}"
    elif prune_experts:
        raise UsageError("--prune-experts needs a mixture of experts: add --carve SxAyEz or give a carved model")
    dense_f32 = f32_cache(source, progress=_bar("writing F32 GGUF", progress))
    f32 = dense_f32 if model_path == source.path else f32_cache(model_path, _bar("writing F32 GGUF", progress), label)
    if to == "gguf":
        passes.append({"name": "write-gguf-f32", "writer": "gguf-py GGUFWriter", "cached_at": str(f32)})
        if quant == "F32":
            gguf_writer.write_f32(model_path, out, name=label, force=force)
        else:
            log(f"quantizing to {quant} with llama.cpp")
            gguf_writer.quantize(f32, out, quant, token_embedding_type, output_tensor_type, threads=threads,
                                 force=force)
            passes.append({"name": "quantize", "tool": "llama_cpp.llama_model_quantize", "type": quant,
                           "token_embedding_type": token_embedding_type, "output_tensor_type": output_tensor_type})
    elif to == "hf":
        from converters.ptq import quantize_checkpoint

        log(f"quantizing linear layers with {ptq.upper()} to {bits} bits, groups of {group_size} "
            f"(calibration: {calib_samples} x 512 tokens of the wiki calibration split)")
        quantize_checkpoint(model_path, out, method=ptq, bits=bits, group_size=group_size,
                            n_samples=calib_samples, seq_len=512, force=force,
                            progress=_bar(f"{ptq} layers", progress))
        passes.append({"name": "ptq", "method": ptq, "bits": bits, "group_size": group_size, "layout": "gptq",
                       "calibration": {"dataset": "wiki", "split": "calibration", "windows": calib_samples,
                                       "tokens_per_window": 512}})
    else:
        from converters.onnx import write_onnx

        log(f"writing ONNX {quant}" + (f" (block {block_size}, {onnx_algo})" if quant != "fp32" else ""))
        write_onnx(model_path, out, precision=quant, block_size=block_size, algo=onnx_algo, force=force)
        own = read_config(model_path).get("model_type") == "granitemoeshared"   # our own graph (write_onnx)
        if own and onnx_algo == "builder" and quant != "fp32":
            onnx_algo = "rtn"  # the builder does not know the MoE host: its graph is quantized afterwards
        passes.append({"name": "write-onnx", "precision": quant,
                       "tool": "torch.onnx.export (dynamo)" if own else "onnxruntime-genai model builder"})
        if quant == "int8" and onnx_algo == "dynamic":
            passes.append({"name": "quantize", "tool": "onnxruntime.quantization.quantize_dynamic",
                           "weight_type": "QInt8", "activations": "dynamic per-tensor uint8"})
        elif quant in ("int4", "int8"):
            passes.append({"name": "quantize", "bits": 4 if quant == "int4" else 8, "block_size": block_size,
                           "algorithm": onnx_algo,
                           "tool": "onnxruntime-genai model builder" if onnx_algo == "builder"
                           else "onnxruntime.quantization.MatMulNBitsQuantizer"})
    export_seconds = time.perf_counter() - t0

    bpw = {"gguf": gguf_bpw, "onnx": onnx_bpw, "hf": checkpoint_bpw}[to](out)
    record = {
        "format": to,
        "type": quant,
        "source": source.as_dict(),
        "passes": passes,
        "output": _output_record(out),
        "bpw": bpw.as_dict(),
        "export_seconds": round(export_seconds, 2),
    }
    log(f"wrote {out} ({bpw.file_bytes / 2**20:.1f} MiB): file BPW {bpw.file_bpw:.3f}, "
        f"linear BPW {bpw.linear_bpw:.3f}")
    if verify:
        record["verification"] = verify_export(out, to, dense_f32, source, verify, threads=threads,
                                               progress=progress, log=log)
    else:
        record["verification"] = {"skipped": True}
    record["wall_seconds"] = round(time.perf_counter() - t0, 2)
    path = manifest_mod.write(out, record)
    return ExportResult(output=out, manifest=path, record=record)


def _output_record(out: Path) -> dict:
    if out.is_file():
        return {"path": str(out.resolve()), "sha256": catalog.file_sha256(out), "size_bytes": out.stat().st_size}
    files = {f.name: {"sha256": catalog.file_sha256(f), "size_bytes": f.stat().st_size}
             for f in sorted(out.iterdir()) if f.is_file() and f.name != "manifest.json"}
    return {"path": str(out.resolve()), "files": files, "size_bytes": sum(v["size_bytes"] for v in files.values())}


def verify_export(out: Path, to: str, f32: Path, source: Source, perplexity: Callable, threads: int | None = None,
                  progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Load ``out`` in its engine and measure its perplexity next to the source's (F32 GGUF), same run.

    ``perplexity(backend, label, window=, n_windows=, progress=)`` is the quality protocol's function
    (``profilers.accuracy.perplexity``) returning a result with ``as_dict()``.
    """

    ctx = VERIFY_WINDOW + 8
    results = {}
    engines = {"gguf": "llama.cpp", "onnx": "onnx", "hf": "torch"}
    for role, path, label, engine, kv in (("source", f32, f"{source.label} (F32)", "llama.cpp", "f32"),
                                          ("output", out, out.name, engines[to], "f16")):
        options = {"cache_type_k": kv, "cache_type_v": kv} if engine == "llama.cpp" else {}
        backend = open_backend(engine, path, n_ctx=ctx, threads=threads, **options)
        try:
            r = perplexity(backend, label, window=VERIFY_WINDOW, n_windows=VERIFY_WINDOWS, progress=progress)
        finally:
            backend.close()
        results[role] = r.as_dict()
    s, o = results["source"]["perplexity"], results["output"]["perplexity"]
    log(f"perplexity on held-out wiki ({VERIFY_WINDOWS} x {VERIFY_WINDOW} tokens): source {s:.3f} "
        f"[{source.label}], output {o:.3f} ({(o / s - 1) * 100:+.2f}%)")
    return results


def _bar(desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    state = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="tensor", leave=False)
        state["bar"].update(done - state["bar"].n)
        if done == total:
            state["bar"].close()

    return update
