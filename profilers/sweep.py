"""``edgerun bench --sweep FILE``: the cross product of models x variants x backends x threads x KV types x lengths.

A sweep file (YAML) names what to cross; every cell is exported once (cached under
``$EDGERUN_HOME/cache/exports``, excluded from the timings), then run with warm-up and repetitions.
Each run appends one JSON line to ``DIR/runs.jsonl``: the cell, every metric, machine info and tool
versions. Combinations that do not apply (llama.cpp KV types on ONNX, the raw llama-cpp-python peer
on ONNX) are recorded as ``not applicable`` without running; a cell that fails is recorded with its
error and the sweep goes on. A sweep is resumable: cells already in ``runs.jsonl`` are skipped, so an
interrupted sweep continues where it stopped. Quality (perplexity, task accuracy) is measured once
per model variant and written as a ``quality`` record.

Backends:
- ``edgerun``: edgerun's own path (llama.cpp for GGUF, onnxruntime-genai for ONNX);
- ``llama-cpp-python``: the peer baseline, raw ``llama_cpp.Llama`` on the same GGUF, same threads,
  context, batch and KV settings, timed the same way, so edgerun's numbers always stand next to the
  engine's own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import llama_cpp
from tqdm import tqdm

from converters import gguf as gguf_writer
from converters import manifest as manifest_mod
from converters.onnx import PRECISIONS
from edgerun import catalog
from edgerun.backends import open_backend
from edgerun.backends.base import GenerationStats, SamplingParams, physical_cores
from edgerun.data import TASKS, text
from edgerun.device import cpu_model
from edgerun.errors import UsageError
from edgerun.formats import yamlfile as yf
from edgerun.kv.types import KV_TYPES
from profilers import latency, power
from profilers.accuracy import perplexity, task_accuracy
from profilers.memory import PeakRSS

BACKENDS = ("edgerun", "llama-cpp-python")
FORMATS = ("gguf", "onnx")

VARIANT_SCHEMA = {
    "format": yf.Field(yf.one_of(FORMATS)),
    "quant": yf.Field(yf.is_str),
    "name": yf.Field(yf.is_str, required=False),
    "token_embedding_type": yf.Field(yf.is_str, required=False),
    "output_tensor_type": yf.Field(yf.is_str, required=False),
    "block_size": yf.Field(yf.positive_int, required=False, default=32),
}
ACCURACY_SCHEMA = {
    "perplexity_windows": yf.Field(yf.positive_int, required=False, default=4),
    "tasks": yf.Field(lambda v: None if isinstance(v, dict) and all(isinstance(n, int) and n > 0 for n in v.values())
                      else "must map task names to item counts", required=False, default={}),
    "task_variants": yf.Field(yf.list_of(yf.is_str), required=False, default=[]),
}
SCHEMA = {
    "name": yf.Field(yf.is_str),
    "models": yf.Field(yf.list_of(yf.is_str)),
    "variants": yf.Field(lambda v: None if isinstance(v, list) and v else "must be a non-empty list"),
    "backends": yf.Field(yf.list_of(yf.one_of(BACKENDS)), required=False, default=["edgerun"]),
    "threads": yf.Field(yf.list_of(yf.positive_int), required=False, default=[0]),
    "kv_cache_types": yf.Field(yf.list_of(yf.one_of(tuple(KV_TYPES))), required=False, default=["f16"]),
    "prompt_tokens": yf.Field(yf.list_of(yf.positive_int), required=False, default=[128]),
    "gen_tokens": yf.Field(yf.list_of(yf.positive_int), required=False, default=[64]),
    "repetitions": yf.Field(yf.positive_int, required=False, default=3),
    "warmup": yf.Field(lambda v: None if isinstance(v, int) and v >= 0 else "must be an integer >= 0",
                       required=False, default=1),
    "ctx_size": yf.Field(yf.positive_int, required=False, default=1024),
    "accuracy": yf.Field(lambda v: None if isinstance(v, dict) else "must be a mapping", required=False, default={}),
}


@dataclass
class Variant:
    """One export of a model: format, type and optional tensor-type overrides."""

    format: str
    quant: str
    name: str
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None
    block_size: int = 32


@dataclass
class Sweep:
    """A parsed sweep file."""

    path: Path
    name: str
    models: list[str]
    variants: list[Variant]
    backends: list[str]
    threads: list[int]
    kv_cache_types: list[str]
    prompt_tokens: list[int]
    gen_tokens: list[int]
    repetitions: int
    warmup: int
    ctx_size: int
    accuracy: dict = field(default_factory=dict)
    digest: str = ""

    def cells(self) -> list[dict]:
        """Every combination, in run order (model-major so each model's exports are reused)."""
        out = []
        for model, v, backend, threads, kv, p, g in itertools.product(
                self.models, self.variants, self.backends, self.threads, self.kv_cache_types,
                self.prompt_tokens, self.gen_tokens):
            out.append({"model": model, "variant": v.name, "format": v.format, "backend": backend,
                        "threads": threads, "kv_cache_type": kv, "prompt_tokens": p, "gen_tokens": g})
        return out


def cell_key(cell: dict) -> str:
    return "|".join(f"{k}={cell[k]}" for k in sorted(cell))


def load(path: str | Path) -> Sweep:
    """Read and check a sweep file.

    Raises:
        YamlError: malformed YAML or a bad field (named with its line); unknown models or quant types.
    """
    path = Path(path)
    data, lines = yf.read(path)
    data = yf.check(path, data, lines, SCHEMA)
    for i, m in enumerate(data["models"]):
        entry = catalog.CATALOG.get(m)
        if (entry is None or entry.kind != "model") and not Path(m).exists():
            raise yf.YamlError(f"{path}, line {lines.get(f'models[{i}]', '?')}: unknown model '{m}'; known: "
                               + ", ".join(e.name for e in catalog.entries("model")))
    variants, names = [], set()
    for i, raw in enumerate(data["variants"]):
        if not isinstance(raw, dict):
            raise yf.YamlError(f"{path}, line {lines.get(f'variants[{i}]', '?')}: a variant must be a mapping")
        v = yf.check(path, raw, lines, VARIANT_SCHEMA, prefix=f"variants[{i}].")
        line = lines.get(f"variants[{i}].quant", "?")
        if v["format"] == "gguf":
            try:
                v["quant"] = gguf_writer.check_type(v["quant"])
                gguf_writer.check_tensor_type(v["token_embedding_type"], "token_embedding_type")
                gguf_writer.check_tensor_type(v["output_tensor_type"], "output_tensor_type")
            except Exception as e:
                raise yf.YamlError(f"{path}, line {line}: {e}") from None
        elif v["quant"] not in PRECISIONS:
            raise yf.YamlError(f"{path}, line {line}: unknown ONNX precision '{v['quant']}'; valid: {', '.join(PRECISIONS)}")
        name = v["name"] or (v["quant"] if v["format"] == "gguf" else f"onnx-{v['quant']}")
        if name in names:
            raise yf.YamlError(f"{path}, line {line}: two variants are named '{name}'; give one a 'name'")
        names.add(name)
        variants.append(Variant(v["format"], v["quant"], name, v["token_embedding_type"], v["output_tensor_type"],
                                v["block_size"]))
    accuracy = yf.check(path, data["accuracy"], lines, ACCURACY_SCHEMA, prefix="accuracy.")
    for task in accuracy["tasks"]:
        if task not in TASKS:
            raise yf.YamlError(f"{path}, line {lines.get('accuracy.tasks.' + task, '?')}: unknown task '{task}'; "
                               f"known: {', '.join(TASKS)}")
    digest = hashlib.sha256(json.dumps({k: v for k, v in data.items()}, sort_keys=True, default=str).encode()).hexdigest()
    return Sweep(path=path, name=data["name"], models=data["models"], variants=variants, backends=data["backends"],
                 threads=data["threads"], kv_cache_types=data["kv_cache_types"], prompt_tokens=data["prompt_tokens"],
                 gen_tokens=data["gen_tokens"], repetitions=data["repetitions"], warmup=data["warmup"],
                 ctx_size=data["ctx_size"], accuracy=accuracy, digest=digest[:16])


def not_applicable(cell: dict) -> str | None:
    """Why a cell cannot run, or None."""
    if cell["format"] == "onnx" and cell["backend"] == "llama-cpp-python":
        return "the raw llama-cpp-python peer runs GGUF only"
    if cell["format"] == "onnx" and cell["kv_cache_type"] != "f16":
        return "llama.cpp KV cache types do not apply to onnxruntime-genai"
    return None


# --- running ------------------------------------------------------------------------------------

def export_variant(model: str, v: Variant, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The cached export of ``model`` as variant ``v``; returns (path, its manifest's BPW record)."""
    from converters.export import export  # torch: only an export not yet cached needs it

    safe = model.replace("/", "_")
    out = catalog.home() / "cache" / "exports" / safe / (f"{v.name}.gguf" if v.format == "gguf" else v.name)
    if out.exists() and manifest_mod.manifest_path(out).is_file():
        return out, manifest_mod.read(out)["bpw"]
    log(f"exporting {model} as {v.name} (cached for later sweeps)")
    result = export(model, to=v.format, quant=v.quant, out=out, force=True, verify=False, progress=False,
                    token_embedding_type=v.token_embedding_type, output_tensor_type=v.output_tensor_type,
                    block_size=v.block_size, log=lambda m: None)
    return out, result.record["bpw"]


class _RawLlama:
    """The peer baseline: raw ``llama_cpp.Llama`` behind just enough of the backend interface to be timed alike."""

    name = "llama-cpp-python"

    def __init__(self, path: Path, n_ctx: int, threads: int, kv: str):
        self._lc = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=KV_TYPES[kv].quantized,
                                   type_k=KV_TYPES[kv].ggml_id, type_v=KV_TYPES[kv].ggml_id, verbose=False)
        self.n_ctx = n_ctx
        self.last_stats = None

    def stream(self, prompt_tokens, sampling):
        self._lc.llama_perf_context_reset(self.llm.ctx)
        self.llm.reset()
        n = 0
        for tok in self.llm.generate(list(prompt_tokens), temp=0.0, top_k=40, top_p=0.95, min_p=0.05,
                                     repeat_penalty=1.0):
            n += 1
            yield self.llm.detokenize([tok]).decode("utf-8", errors="ignore")
            if n >= sampling.max_tokens:
                break
        p = self._lc.llama_perf_context(self.llm.ctx)
        self.last_stats = GenerationStats(prompt_tokens=len(prompt_tokens), prefill_tokens=len(prompt_tokens),
                                          generated_tokens=n, prefill_ms=p.t_p_eval_ms, decode_ms=p.t_eval_ms,
                                          decode_steps=p.n_eval, finish_reason="length")

    def close(self):
        self.llm.close()


def _open(cell: dict, path: Path, ctx: int):
    threads = cell["threads"] or physical_cores()
    if cell["backend"] == "llama-cpp-python":
        return _RawLlama(path, ctx, threads, cell["kv_cache_type"])
    if cell["format"] == "onnx":
        return open_backend("onnx", path, n_ctx=ctx, threads=threads)
    kv = cell["kv_cache_type"]
    return open_backend("llama.cpp", path, n_ctx=ctx, threads=threads, cache_type_k=kv, cache_type_v=kv,
                        flash_attn=KV_TYPES[kv].quantized)


def _prompt_tokens(backend, n: int) -> list[int]:
    """Exactly ``n`` prompt tokens cut from the held-out wiki text (the same text for every cell)."""
    if hasattr(backend, "tokenize"):
        ids = backend.tokenize(text("wiki", "heldout"))
    else:  # the raw peer: its own tokenizer
        ids = backend.llm.tokenize(text("wiki", "heldout").encode(), add_bos=False)
    return ids[:n]


def run_cell(cell: dict, sweep: Sweep, path: Path, bpw: dict, bandwidth_gbps: float | None, device,
             idle) -> list[dict]:
    """Warm-up then ``repetitions`` timed generations of one cell; one metrics dict per repetition."""
    ctx = max(sweep.ctx_size, cell["prompt_tokens"] + cell["gen_tokens"] + 8)
    with PeakRSS() as rss_load:
        backend = _open(cell, path, ctx)
    try:
        prompt = _prompt_tokens(backend, cell["prompt_tokens"])
        params = SamplingParams(temperature=0.0, max_tokens=cell["gen_tokens"], ignore_eos=True)
        for _ in range(sweep.warmup):
            latency.measure(backend, prompt, cell["gen_tokens"], sampling=params)
        runs = []
        for rep in range(sweep.repetitions):
            meter = power.EnergyMeter()
            cpu0, t0 = power.cpu_seconds(), time.perf_counter()
            with PeakRSS() as rss, meter:
                rec = latency.measure(backend, prompt, cell["gen_tokens"], sampling=params)
            wall = time.perf_counter() - t0
            util = (power.cpu_seconds() - cpu0) / wall / max(1, device.threads if device else 1) if wall > 0 else 0.0
            m = rec.as_dict()
            m.update(peak_rss_bytes=max(rss.peak_bytes, rss_load.peak_bytes), model_file_bytes=bpw["file_bytes"],
                     file_bpw=bpw["file_bpw"], linear_bpw=bpw["linear_bpw"], bytes_per_token=bpw["bytes_per_token"],
                     cpu_utilization=util)
            if hasattr(backend, "memory"):
                m["kv_cache_bytes"] = backend.memory().kv_cache_bytes
            if bandwidth_gbps and m["decode_tokens_per_s"]:
                roof = bandwidth_gbps * 1e9 / bpw["bytes_per_token"]
                m.update(roofline_tokens_per_s=roof, roofline_fraction=m["decode_tokens_per_s"] / roof)
            m.update(power.above_idle(meter.reading, idle))
            if device is not None and device.tdp_watts:
                m.update(power.estimate_from_tdp(device.tdp_watts, device.idle_watts or 0.0, util, wall))
            runs.append({"repetition": rep, "metrics": m})
        return runs
    finally:
        backend.close()


def measure_quality(model: str, variant: Variant, path: Path, sweep: Sweep, log) -> dict:
    """Perplexity (shared protocol) and, for the variants named in ``accuracy.task_variants``, task accuracy."""

    acc = sweep.accuracy
    engine = "llama.cpp" if variant.format == "gguf" else "onnx"
    backend = open_backend(engine, path, n_ctx=1024)
    try:
        label = f"{model} {variant.name}"
        out = {"perplexity": perplexity(backend, label, n_windows=acc["perplexity_windows"]).as_dict(), "tasks": {}}
        if variant.name in acc["task_variants"]:
            for task, n in acc["tasks"].items():
                log(f"accuracy: {label} on {task} ({n} items)")
                out["tasks"][task] = task_accuracy(backend, label, task, n).as_dict()
        return out
    finally:
        backend.close()


def machine_info() -> dict:
    """CPU model, platform, Python version and tool versions of this machine."""
    return {"cpu": cpu_model(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": manifest_mod.tool_versions()}


def run(sweep: Sweep, out_dir: str | Path, device=None, force: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, bandwidth_gbps: float | None = None) -> Path:
    """Run (or resume) ``sweep`` into ``out_dir``; returns the JSONL path.

    Raises:
        UsageError: ``out_dir`` holds a different sweep and ``force`` is false.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / "sweep.json"
    if marker.exists():
        prev = json.loads(marker.read_text())
        if prev.get("digest") != sweep.digest and not force:
            raise UsageError(f"{out_dir} holds results of a different sweep ('{prev.get('name')}'); "
                             "pass --force to add to it, or choose another --out")
    marker.write_text(json.dumps({"name": sweep.name, "digest": sweep.digest, "file": str(sweep.path),
                                  "device": device.as_dict() if device else None}, indent=2))
    jsonl = out_dir / "runs.jsonl"
    done = set()
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by an interrupt: that cell runs again
            done.add(rec.get("key"))
    machine = machine_info()
    if bandwidth_gbps is None and device is not None:
        bandwidth_gbps = device.memory_bandwidth_gbps
    idle = power.measure_idle(2.0)
    cells = sweep.cells()
    todo = [c for c in cells if cell_key(c) not in done]
    quality_todo = [(m, v) for m in sweep.models for v in sweep.variants if f"quality|{m}|{v.name}" not in done]
    log(f"sweep '{sweep.name}': {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run")
    bar = None
    if progress:
        bar = tqdm(total=len(todo) + len(quality_todo), desc="bench", unit="cell")
    variants = {v.name: v for v in sweep.variants}
    if jsonl.exists() and jsonl.stat().st_size and not jsonl.read_bytes().endswith(b"\n"):
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write("\n")  # close a line an interrupt cut short; it is skipped when read
    with open(jsonl, "a", encoding="utf-8") as f:
        def write(rec):
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()

        exports: dict[tuple[str, str], tuple[Path, dict]] = {}
        for cell in todo:
            base = {"sweep": sweep.name, "key": cell_key(cell), "cell": cell, "device": device.name if device else None,
                    "machine": machine, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            why = not_applicable(cell)
            if why:
                write({**base, "status": "not applicable", "reason": why})
            else:
                try:
                    k = (cell["model"], cell["variant"])
                    if k not in exports:
                        exports[k] = export_variant(cell["model"], variants[cell["variant"]], log)
                    path, bpw = exports[k]
                    runs = run_cell(cell, sweep, path, bpw, bandwidth_gbps, device, idle)
                    write({**base, "status": "ok", "runs": runs})
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # a failing cell is recorded, the sweep goes on
                    write({**base, "status": "error", "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc(limit=3)})
            if bar:
                bar.update(1)
        for model, v in quality_todo:
            key = f"quality|{model}|{v.name}"
            base = {"sweep": sweep.name, "key": key, "kind": "quality", "model": model, "variant": v.name}
            try:
                if (model, v.name) not in exports:
                    exports[(model, v.name)] = export_variant(model, v, log)
                path, bpw = exports[(model, v.name)]
                write({**base, "status": "ok", "bpw": bpw, "quality": measure_quality(model, v, path, sweep, log)})
            except KeyboardInterrupt:
                raise
            except Exception as e:
                write({**base, "status": "error", "error": f"{type(e).__name__}: {e}"})
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return jsonl
