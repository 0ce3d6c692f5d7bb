"""``edgerun export``: source -> passes -> writer -> manifest -> verification.

The passes (merge, carve, finetune, prune, ptq; :mod:`converters.passes`) come from flags or a
recipe, run in order, and each records itself in the manifest's ``passes`` list; the writer then
writes the last checkpoint:

- GGUF: the checkpoint is written once as an exact F32 GGUF (cached under ``$EDGERUN_HOME/cache/f32/``),
  then quantized by llama.cpp to the requested type; an F32 export is written directly, with no
  cached copy;
- ONNX: onnxruntime-genai's model builder, or edgerun's own graph for a carved MoE's host;
- HF: the last pass's checkpoint (a PTQ pass's GPTQ-layout checkpoint) is the output.

Verification loads the output in its engine and prints its perplexity on a held-out slice of the
wiki calibration text next to the source's (the source's F32 GGUF in llama.cpp, which matches the
source's torch logits to ~1e-6 of their range; written only when verifying), both measured in the
same run by the shared protocol (``profilers.accuracy.perplexity``, passed in as ``verify``:
converters do not import profilers).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from converters import gguf as gguf_writer
from converters import manifest as manifest_mod
from converters import passes as passes_mod
from converters.bpw import checkpoint_bpw, gguf_bpw, onnx_bpw
from converters.source import Source, open_source
from edgerun import catalog
from edgerun.atomic import atomic_file
from edgerun.backends import open_backend
from edgerun.errors import UsageError
from edgerun.formats.safetensors import read_config

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
    """A checkpoint (a Source, or a checkpoint directory) written as an F32 GGUF, cached per checkpoint.

    Cached as ``$EDGERUN_HOME/cache/f32/<checkpoint dir name>.gguf`` with a ``.source.json`` beside it
    naming the checkpoint it was written from; rewritten when that is another checkpoint (two directories
    of the same name never share a file, and a name keeps one file, so the cache does not grow with
    temporary checkpoints) or when any of the checkpoint's files (config, weights, tokenizer, chat
    template) is newer. ``label`` names the model in the GGUF (default: the source's label or the
    directory name).
    """
    path = source.path if isinstance(source, Source) else Path(source)
    name = label or (source.label if isinstance(source, Source) else path.name)
    out = catalog.home() / "cache" / "f32" / f"{path.name}.gguf"
    record = out.with_name(out.name + ".source.json")
    newest = max(f.stat().st_mtime for f in path.iterdir() if f.is_file())
    try:
        written_from = json.loads(record.read_text(encoding="utf-8")).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        written_from = None
    if not out.exists() or out.stat().st_mtime < newest or written_from != str(path.resolve()):
        gguf_writer.write_f32(path, out, name=name, force=True, progress=progress)
        with atomic_file(record, force=True) as tmp:
            tmp.write_text(json.dumps({"checkpoint": str(path.resolve())}), encoding="utf-8")
    return out


def carved_cache(source: Source, config: str, tokens: int, progress: bool, log: Callable[[str], None],
                 **params) -> Path:
    """The source carved with CMoE ``config`` on ``tokens`` calibration tokens, cached (the ``carve`` pass;
    ``params``: its other parameters, e.g. ``domains``, ``router``, ``atopk``)."""
    step = passes_mod.make("carve", config=config, calib_tokens=tokens, **params)
    ctx = passes_mod.Context(source=source, progress=progress, log=log, label=source.label)
    return step.apply(source.path, ctx, None)[0]


def granite_cache(carved: Path, progress: bool, log: Callable[[str], None]) -> Path:
    """A carved checkpoint hosted as Granite's shared-expert MoE with a fitted linear router, cached (``host``)."""
    ctx = passes_mod.Context(progress=progress, log=log)
    return passes_mod.make("host").apply(Path(carved), ctx, None)[0]


def export(src: str, to: str = "gguf", quant: str | None = None, out: str | Path | None = None, force: bool = False,
           passes: list[passes_mod.Pass] | str | Path | None = None, token_embedding_type: str | None = None,
           output_tensor_type: str | None = None, block_size: int = 32, onnx_algo: str = "default",
           verify: Callable | None = None, threads: int | None = None, progress: bool = True,
           log: Callable[[str], None] = print, **flags) -> ExportResult:
    """Export ``src`` (catalog name, ``.gguf`` path or HF checkpoint directory) to ``to`` at ``quant``, after passes.

    Args:
        src: the source model.
        to: output format: ``gguf``, ``onnx``, or ``hf`` (the last pass's checkpoint, e.g. PTQ's).
        quant: GGUF type (default ``Q8_0``; see :data:`converters.gguf.OUTPUT_TYPES`) or ONNX precision
            (``fp32``, ``int8``, ``int4``; default ``int4``); for ``hf`` it is named after the last pass.
        out: output path (default: a name saying model, format and type, in the current directory).
        force: overwrite an existing output.
        passes: the passes to run first: a list of :class:`converters.passes.Pass`, or a recipe file
            (``passes: [{merge: {...}}, {carve: {config: S2A2E8}}, ...]`` or a mergekit merge recipe;
            :func:`converters.passes.load`). None: the passes ``flags`` ask for.
        token_embedding_type, output_tensor_type: per-tensor ggml types for the embedding / output head.
        block_size: ONNX int4 block size (32, 64, 128).
        onnx_algo: ONNX weight algorithm: int4 ``builder`` (default), ``rtn``, ``hqq``, ``gptq``; int8
            ``dynamic`` (default) or ``builder``.
        verify: the quality protocol's perplexity function (``profilers.accuracy.perplexity``, passed in
            because converters do not import profilers): load the output and print its perplexity next
            to the source's. None skips verification.
        threads: CPU threads for quantization and verification.
        progress: show progress bars.
        log: where one-line progress messages go.
        **flags: export's pass flags, :func:`converters.passes.from_flags`: ``merge``, ``merge_method``,
            ``prune`` (Wanda), ``carve``, ``finetune_minutes``, ``prune_experts``, ``patterns``, ``ptq``, ``bits``,
            ``group_size``, ``calib_tokens`` (and the old ``carve_tokens``, ``calib_samples``).

    Returns:
        :class:`ExportResult`; its manifest lists the passes in order, then the writer's steps.

    Raises:
        UsageError: unknown format or type, passes in an order that does not work, passes given both
            as a recipe and as flags, output exists without ``force``, unsupported architecture.
        YamlError: a bad recipe (file, field and line named).
        ModelFileError, UnknownModelError, DownloadError: bad or missing source.
        BackendError: llama.cpp fails.
    """
    t0 = time.perf_counter()
    to = to.lower()
    if to not in FORMATS:
        raise UsageError(f"unknown export format '{to}'; supported: {', '.join(FORMATS)}")
    chain = _chain(str(src), passes, flags)
    if to == "hf":
        if not chain:
            raise UsageError("--to hf writes the checkpoint a pass makes: give --ptq rtn|gptq|awq (or other "
                             "passes, or a recipe)")
        quant = chain[-1].tag()
    elif chain and chain[-1].gives == "gptq":
        raise UsageError("--ptq writes a Hugging Face checkpoint: use it with --to hf")
    if to == "gguf":
        quant = gguf_writer.check_type(quant or "Q8_0")
        gguf_writer.check_tensor_type(token_embedding_type, "--token-embedding-type")
        gguf_writer.check_tensor_type(output_tensor_type, "--output-tensor-type")
    elif to == "onnx":
        from converters.onnx import check_options   # onnxruntime: ONNX exports only

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

    kind = passes_mod.kind_of(source.path)
    steps, _ = passes_mod.plan(chain, kind, writer=to)
    ctx = passes_mod.Context(src=str(src), source=source, progress=progress, log=log, label=source.label)
    records = []
    if kind == "carved":                 # how the source was made, as an export that carved it records it
        records.append(passes_mod.carve_record(source.path))
        ctx.label += f" carved {records[0]['config']}"
    model_path, done = passes_mod.run(steps, source.path, ctx, out=out if to == "hf" else None)
    records += done
    label = ctx.label
    if to == "gguf":
        if quant == "F32":
            gguf_writer.write_f32(model_path, out, name=label, force=force,
                                  progress=passes_mod.bar("writing F32 GGUF", progress))
            records.append({"name": "write-gguf-f32", "writer": "gguf-py GGUFWriter", "cached_at": None})
        else:
            f32 = f32_cache(model_path, passes_mod.bar("writing F32 GGUF", progress), label)
            records.append({"name": "write-gguf-f32", "writer": "gguf-py GGUFWriter", "cached_at": str(f32)})
            log(f"quantizing to {quant} with llama.cpp")
            gguf_writer.quantize(f32, out, quant, token_embedding_type, output_tensor_type, threads=threads,
                                 force=force)
            records.append({"name": "quantize", "tool": "llama_cpp.llama_model_quantize", "type": quant,
                            "token_embedding_type": token_embedding_type, "output_tensor_type": output_tensor_type})
    elif to == "onnx":
        from converters.onnx import write_onnx   # onnxruntime: ONNX exports only

        log(f"writing ONNX {quant}" + (f" (block {block_size}, {onnx_algo})" if quant != "fp32" else ""))
        write_onnx(model_path, out, precision=quant, block_size=block_size, algo=onnx_algo, force=force)
        own = read_config(model_path).get("model_type") == "granitemoeshared"   # our own graph (write_onnx)
        if own and onnx_algo == "builder" and quant != "fp32":
            onnx_algo = "rtn"  # the builder does not know the MoE host: its graph is quantized afterwards
        records.append({"name": "write-onnx", "precision": quant,
                        "tool": "torch.onnx.export (dynamo)" if own else "onnxruntime-genai model builder"})
        if quant == "int8" and onnx_algo == "dynamic":
            records.append({"name": "quantize", "tool": "onnxruntime.quantization.quantize_dynamic",
                            "weight_type": "QInt8", "activations": "dynamic per-tensor uint8"})
        elif quant in ("int4", "int8"):
            records.append({"name": "quantize", "bits": 4 if quant == "int4" else 8, "block_size": block_size,
                            "algorithm": onnx_algo,
                            "tool": "onnxruntime-genai model builder" if onnx_algo == "builder"
                            else "onnxruntime.quantization.MatMulNBitsQuantizer"})
    # the output is in place; until its manifest is too, an interrupt or error removes it: an export
    # is the output with its manifest, or nothing at the destination
    with _removed_on_failure(out):
        export_seconds = time.perf_counter() - t0

        bpw = {"gguf": gguf_bpw, "onnx": onnx_bpw, "hf": checkpoint_bpw}[to](out)
        record = {
            "format": to,
            "type": quant,
            "source": source.as_dict(),
            "passes": records,
            "output": _output_record(out),
            "bpw": bpw.as_dict(),
            "export_seconds": round(export_seconds, 2),
        }
        if to == "gguf":   # what the file really holds: tied embeddings, per-tensor types, fallbacks, vocab padding
            record.update(gguf_writer.type_record(out, quant))
            record["vocab_padding"] = gguf_writer.vocab_padding(model_path)
            if record["warning"]:
                log(f"warning: {record['warning']}")
        log(f"wrote {out} ({bpw.file_bytes / 2**20:.1f} MiB): file BPW {bpw.file_bpw:.3f}, "
            f"linear BPW {bpw.linear_bpw:.3f}")
        if verify:
            source_f32 = f32_cache(source, progress=passes_mod.bar("writing F32 GGUF", progress))
            record["verification"] = verify_export(out, to, source_f32, source, verify, threads=threads,
                                                   progress=progress, log=log)
        else:
            record["verification"] = {"skipped": True}
        record["wall_seconds"] = round(time.perf_counter() - t0, 2)
        path = manifest_mod.write(out, record)
    return ExportResult(output=out, manifest=path, record=record)


@contextlib.contextmanager
def _removed_on_failure(out: Path):
    """Remove ``out`` (file or directory) and its manifest if the block does not complete (Ctrl-C included)."""
    try:
        yield
    except BaseException:
        manifest = manifest_mod.manifest_path(out)
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            out.unlink(missing_ok=True)
        manifest.unlink(missing_ok=True)
        raise


def _chain(src: str, passes, flags: dict) -> list[passes_mod.Pass]:
    """The passes of an export: from a recipe file, a list, or the flags (not both)."""
    if passes is None:
        return passes_mod.from_flags(src, **flags)
    given = sorted(k for k, v in flags.items() if v is not None)
    if given:
        raise UsageError(f"give the passes either as a recipe or as flags, not both (got a recipe and {given[0]})")
    if isinstance(passes, (str, Path)):
        return passes_mod.load(passes, src)
    return list(passes)


def _output_record(out: Path) -> dict:
    """The output's path, sha256 and size (per file for a directory, manifest excluded)."""
    if out.is_file():
        return {"path": str(out.resolve()), "sha256": catalog.file_sha256(out), "size_bytes": out.stat().st_size}
    files = {f.name: {"sha256": catalog.file_sha256(f), "size_bytes": f.stat().st_size}
             for f in sorted(out.iterdir()) if f.is_file() and f.name != "manifest.json"}
    return {"path": str(out.resolve()), "files": files, "size_bytes": sum(v["size_bytes"] for v in files.values())}


def verify_export(out: Path, to: str, f32: Path, source: Source, perplexity: Callable, threads: int | None = None,
                  progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Load ``out`` in its engine and measure its perplexity next to the source's (F32 GGUF), same run.

    ``perplexity(backend, label, window=, n_windows=, progress=)`` is the quality protocol's function
    (``profilers.accuracy.perplexity``) returning a result with ``as_dict()``; it runs on
    :data:`VERIFY_WINDOWS` held-out windows of :data:`VERIFY_WINDOW` tokens.

    Args:
        out: the export. to: its format (``gguf``, ``onnx``, ``hf``; engine llama.cpp, onnx, torch).
        f32: the source's F32 GGUF (run in llama.cpp with an F32 KV cache). source: the source.

    Returns:
        ``{"source": ..., "output": ...}``, each the perplexity result's ``as_dict()``.

    Raises:
        BackendError: an engine cannot load a model.
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
