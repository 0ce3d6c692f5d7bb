"""``edgerun bench --sweep FILE``: the cross product of models x variants x backends x threads x KV types x lengths.

A sweep file (YAML) names what to cross; every variant is exported once (cached under
``$EDGERUN_HOME/cache/exports``, excluded from the timings). How a cell is timed, so that its
figures measure the engine and not the harness:

- **One process per cell** (:mod:`profilers.cellproc`): the engine loads once in a child process;
  peak memory is that process's ``VmHWM``, after load and at the end of generation, with llama.cpp's
  own buffer sizes (model, KV, compute) from its load log.
- **Cold repetitions**: the KV cache is emptied before every warm-up and timed repetition on every
  engine; TTFT and prefill tokens/s count the prompt tokens the engine really evaluated (llama.cpp's
  counter), and a repetition that reused a cached prefix is rejected and re-run, never averaged.
  Prompt reuse, a real feature of the chat path, is its own metric (``second_turn_ttft_ms``: all
  but the last 32 prompt tokens cached).
- **Interleaved pairs**: cells that differ only in backend (edgerun and the raw peer) run side by
  side, repetitions alternating A B B A ... (``order`` and ``position`` in each run record), 7 by
  default. Each repetition records the CPU time its process got against wall time, the CPU time all
  other processes used meanwhile and the machine's steal time; one that shared the CPU (other
  processes above 10% of a core, steal above 5% of its wall time, or its own CPU share below 90% of
  the warm-up's) is re-run up to ``MAX_RERUNS`` times and flagged if it never got the CPU back.

Each cell appends one JSON line to ``DIR/runs.jsonl`` when its group is done: the cell, every
repetition's metrics, rejected attempts, memory, machine info and tool versions. Combinations that
do not apply (llama.cpp KV types on ONNX, the raw llama-cpp-python peer on ONNX) are recorded as
``not applicable``; a cell that fails, or whose process dies (the cause is recorded: a signal such as
the OOM killer's SIGKILL, or an exit code), is recorded with its error and the sweep goes on. A sweep
is resumable: cells already in ``runs.jsonl`` are skipped, and a group interrupted by Ctrl-C wrote
none of its measured records (they are written together when the group ends), so it runs again
whole. Quality (perplexity, task accuracy) is measured once per model variant and written as a
``quality`` record.

Backends:
- ``edgerun``: edgerun's own path (llama.cpp for GGUF, onnxruntime-genai for ONNX);
- ``llama-cpp-python``: the peer baseline, raw ``llama_cpp.Llama`` on the same GGUF, same threads,
  context, batch and KV settings, timed the same way, so edgerun's numbers always stand next to the
  engine's own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from converters import gguf as gguf_writer
from converters import manifest as manifest_mod
from converters.bpw import gguf_bpw, onnx_bpw
from converters.onnx import PRECISIONS
from edgerun import catalog
from edgerun.atomic import atomic_file
from edgerun.backends import open_backend
from edgerun.data import TASKS
from edgerun.device import cpu_model
from edgerun.errors import UsageError
from edgerun.formats import yamlfile as yf
from edgerun.kv.types import KV_TYPES
from profilers import power
from profilers.accuracy import perplexity, task_accuracy

BACKENDS = ("edgerun", "llama-cpp-python")
MAX_RERUNS = 3          # extra attempts of a repetition that reused a cached prefix or lost the CPU
LOST_CPU_SHARE = 0.9    # a repetition whose CPU share falls below this fraction of its warm-up's lost the CPU
OTHER_CPU_SHARE = 0.1   # ... or while which other processes used more than this share of one core
COMMAND_TIMEOUT_S = 900.0  # a cell's child that answers no command within this is killed and recorded
FORMATS = ("gguf", "onnx")
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")   # a device config's file stem: device_configs/NAME.yaml

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
    "devices": yf.Field(yf.list_of(lambda v: None if isinstance(v, str) and DEVICE_NAME.match(v)
                                   else f"must name a device config (device_configs/NAME.yaml: letters, digits, "
                                        f"'.', '_', '-'), got {v!r}"), required=False, default=[]),
    "variants": yf.Field(lambda v: None if isinstance(v, list) and v else "must be a non-empty list"),
    "backends": yf.Field(yf.list_of(yf.one_of(BACKENDS)), required=False, default=["edgerun"]),
    "threads": yf.Field(yf.list_of(yf.positive_int), required=False, default=[0]),
    "kv_cache_types": yf.Field(yf.list_of(yf.one_of(tuple(KV_TYPES))), required=False, default=["f16"]),
    "prompt_tokens": yf.Field(yf.list_of(yf.positive_int), required=False, default=[128]),
    "gen_tokens": yf.Field(yf.list_of(yf.positive_int), required=False, default=[64]),
    "repetitions": yf.Field(yf.positive_int, required=False, default=7),
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
    devices: list[str] = field(default_factory=list)

    def cells(self) -> list[dict]:
        """Every combination, in run order (device-major, then model-major so each model's exports are reused).

        A sweep that names ``devices`` gives each cell a ``device`` field (the device config's name,
        ``device_configs/NAME.yaml``): the device it is measured on. Without it cells have no such field.
        """
        out = []
        for device, model, v, backend, threads, kv, p, g in itertools.product(
                self.devices or [None], self.models, self.variants, self.backends, self.threads,
                self.kv_cache_types, self.prompt_tokens, self.gen_tokens):
            cell = {"model": model, "variant": v.name, "format": v.format, "backend": backend,
                    "threads": threads, "kv_cache_type": kv, "prompt_tokens": p, "gen_tokens": g}
            if device is not None:
                cell["device"] = device
            out.append(cell)
        return out


def cell_key(cell: dict) -> str:
    """The cell's identity in ``runs.jsonl``: its fields, sorted, as ``k=v|k=v...`` (what resume skips)."""
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
    if len(set(data["devices"])) != len(data["devices"]):
        raise yf.YamlError(f"{path}, line {lines.get('devices', '?')}: a device is named twice")
    # a sweep without devices keeps the digest it had before the field existed (its results stay resumable)
    digested = {k: v for k, v in data.items() if k != "devices" or v}
    digest = hashlib.sha256(json.dumps(digested, sort_keys=True, default=str).encode()).hexdigest()
    return Sweep(path=path, name=data["name"], models=data["models"], variants=variants, backends=data["backends"],
                 threads=data["threads"], kv_cache_types=data["kv_cache_types"], prompt_tokens=data["prompt_tokens"],
                 gen_tokens=data["gen_tokens"], repetitions=data["repetitions"], warmup=data["warmup"],
                 ctx_size=data["ctx_size"], accuracy=accuracy, digest=digest[:16], devices=data["devices"])


def _groups(cells: list[dict]) -> list[list[dict]]:
    """Cells that differ only in backend, in run order: their repetitions are interleaved."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(cell_key({k: v for k, v in c.items() if k != "backend"}), []).append(c)
    return list(groups.values())


def not_applicable(cell: dict) -> str | None:
    """Why a cell cannot run, or None."""
    if cell["format"] == "onnx" and cell["backend"] == "llama-cpp-python":
        return "the raw llama-cpp-python peer runs GGUF only"
    if cell["format"] == "onnx" and cell["kv_cache_type"] != "f16":
        return "llama.cpp KV cache types do not apply to onnxruntime-genai"
    return None


# --- running ------------------------------------------------------------------------------------

def export_variant(model: str, v: Variant, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The cached export of ``model`` as variant ``v``; returns (path, its BPW record measured from the file).

    Processes sharing a cache (two cluster nodes on one machine, or two sweeps) export a variant one at a
    time: the first writes it under an exclusive lock, the others wait and reuse it.
    """
    import fcntl

    from converters.export import export  # torch: only an export not yet cached needs it

    safe = model.replace("/", "_")
    out = catalog.home() / "cache" / "exports" / safe / (f"{v.name}.gguf" if v.format == "gguf" else v.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # released when the file closes (also if this process dies)
        if not (out.exists() and manifest_mod.manifest_path(out).is_file()):
            log(f"exporting {model} as {v.name} (cached for later sweeps)")
            export(model, to=v.format, quant=v.quant, out=out, force=True, verify=False, progress=False,
                   token_embedding_type=v.token_embedding_type, output_tensor_type=v.output_tensor_type,
                   block_size=v.block_size, log=lambda m: None)
    # measured again from the file (a fraction of a second): an older cached manifest may lack newer fields
    return out, (gguf_bpw(out) if v.format == "gguf" else onnx_bpw(out)).as_dict()


class CellDied(Exception):
    """A cell's child process ended without replying (a signal such as the OOM killer's SIGKILL, or a crash)."""


class CellProcess:
    """A child process running one cell (:mod:`profilers.cellproc`), driven one command at a time."""

    def __init__(self, cell: dict, timeout_s: float = COMMAND_TIMEOUT_S):
        """Start the child (its own session: a Ctrl-C reaches the sweep, which ends its children).

        Raises:
            OSError: the process could not be started.
        """
        self.cell, self.timeout_s = cell, timeout_s
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, EDGERUN_CELL_FD=str(write_fd))
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "profilers.cellproc"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr, env=env, pass_fds=(write_fd,),
                                     text=True, start_new_session=True)
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")

    def command(self, op: str, **args) -> dict:
        """Send one command and return the child's reply.

        Raises:
            CellDied: the child exited (its cause: the signal or the exit code, and its last stderr line),
                or gave no reply within ``timeout_s`` seconds (then it is killed).
            RuntimeError: the child replied with an error (the engine refused the model, ...).
        """
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self._replies], [], [], self.timeout_s)
            if not ready:
                self.proc.kill()
                raise CellDied(f"no reply to '{op}' within {self.timeout_s:.0f} s (killed)")
            line = self._replies.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise CellDied(self.cause())
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error", "the cell process failed"))
        return reply

    def cause(self) -> str:
        """Why the child ended: ``killed by SIGKILL (out of memory?)``, ``exit code N``, with its last stderr line."""
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if rc < 0:
            name = signal.Signals(-rc).name
            why = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        else:
            why = f"exit code {rc}"
        self._stderr.seek(0)
        tail = [ln for ln in self._stderr.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return why + (f": {tail[-1]}" if tail else "")

    def kill(self) -> None:
        """End the child (any state) and free its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._replies.close()
        self._stderr.close()


def _lost_cpu(m: dict, reference: float | None) -> str | None:
    """Why a repetition shared the CPU with another process, or None: other processes used more than
    OTHER_CPU_SHARE of one core over its wall time, steal above 5% of it, or its own CPU share fell below
    LOST_CPU_SHARE of the cell's reference (its warm-up's share). llama.cpp's threads spin while they
    wait, so a loss shows in the other processes' time more than in the cell's own share."""
    if m.get("other_cpu_s") is not None and m["wall_s"] > 0 and m["other_cpu_s"] / m["wall_s"] > OTHER_CPU_SHARE:
        return f"other processes used {m['other_cpu_s'] / m['wall_s']:.0%} of a core"
    if m.get("steal_s") is not None and m["wall_s"] > 0 and m["steal_s"] / m["wall_s"] > 0.05:
        return f"steal {m['steal_s'] / m['wall_s']:.0%} of wall time"
    if reference and m["cpu_share"] < LOST_CPU_SHARE * reference:
        return f"CPU share {m['cpu_share']:.2f} against {reference:.2f} in the warm-up"
    return None


def _timed(proc: CellProcess, reference: float | None, state: dict) -> tuple[dict | None, dict]:
    """One accepted cold repetition of ``proc``'s cell, re-run up to MAX_RERUNS times when it reused a cached
    prefix or lost the CPU; returns (the run or None when every attempt reused a prefix, rejected attempts)."""
    rejected = []
    for attempt in range(1 + MAX_RERUNS):
        state["seq"] += 1
        m = proc.command("run", cold=True)["metrics"]
        if m["reused_prefix_tokens"] > 0:
            rejected.append({"order": state["seq"], "reason": f"reused a cached prefix of {m['reused_prefix_tokens']} "
                             "tokens", "metrics": m})
            continue
        lost = _lost_cpu(m, reference)
        if lost and attempt < MAX_RERUNS:
            rejected.append({"order": state["seq"], "reason": f"lost the CPU: {lost}", "metrics": m})
            continue
        return {"order": state["seq"], "attempts": attempt + 1, "flag": f"lost the CPU: {lost}" if lost else None,
                "metrics": m}, rejected
    return None, rejected


def run_group(cells: list[dict], sweep: Sweep, path: Path, bpw: dict, bandwidth: tuple[float | None, str], device,
              idle) -> list[dict]:
    """Run cells that differ only in backend, one child process each, repetitions interleaved A B B A ...

    Each cell's child loads its engine once; warm-ups, then ``repetitions`` cold repetitions alternate
    which cell goes first; then the second-turn TTFT (prefix cached) as its own metric. Returns one
    record body per cell: ``{"status": "ok", "runs", "rejected", "memory", ...}`` or an error with its cause.
    """
    ctx = max(sweep.ctx_size, cells[0]["prompt_tokens"] + cells[0]["gen_tokens"] + 8)
    procs, out = {}, {}
    try:
        for cell in cells:
            key = cell_key(cell)
            proc = CellProcess(cell)
            try:
                opened = proc.command("open", cell=cell, path=str(path), ctx=ctx, idle=dataclasses.asdict(idle),
                                      device=device.as_dict() if device else None)
            except (CellDied, RuntimeError) as e:
                proc.kill()
                out[key] = {"status": "error", "error": str(e)}
                continue
            except BaseException:      # Ctrl-C while loading: the child must not outlive the sweep
                proc.kill()
                raise
            procs[key] = (proc, opened)
            out[key] = {"status": "ok", "runs": [], "rejected": [], "pid": opened["pid"],
                        "engine_buffers_mib": opened["engine_buffers"], "load_s": opened["load_s"]}
        state = {"seq": 0}
        reference = {}

        def each(order):
            for key in order:
                if key in procs:
                    yield key, procs[key][0]

        def fail(key, e):
            procs.pop(key)[0].kill()
            out[key] = {"status": "error", "error": str(e)}

        keys = list(procs)
        for _ in range(sweep.warmup):
            for key, proc in list(each(keys)):
                try:
                    m = proc.command("run", cold=True)["metrics"]
                    reference[key] = max(reference.get(key, 0.0), m["cpu_share"])
                except (CellDied, RuntimeError) as e:
                    fail(key, e)
        for rep in range(sweep.repetitions):
            order = keys if rep % 2 == 0 else keys[::-1]
            for position, (key, proc) in enumerate(list(each(order))):
                try:
                    run, rejected = _timed(proc, reference.get(key), state)
                except (CellDied, RuntimeError) as e:
                    fail(key, e)
                    continue
                out[key]["rejected"] += rejected
                if run is not None:
                    run.update(repetition=rep, position=position)
                    _add_bpw(run["metrics"], bpw, *bandwidth)
                    out[key]["runs"].append(run)
        for key, proc in list(each(keys)):
            try:
                closed = proc.command("close")
            except (CellDied, RuntimeError) as e:
                fail(key, e)
                continue
            opened = procs[key][1]
            out[key]["memory"] = {"peak_rss_after_load_bytes": opened["peak_rss_after_load_bytes"],
                                  "rss_after_load_bytes": opened["rss_after_load_bytes"],
                                  "peak_rss_bytes": closed["peak_rss_bytes"]}
            for run in out[key]["runs"]:
                run["metrics"]["peak_rss_bytes"] = closed["peak_rss_bytes"]
                run["metrics"]["peak_rss_after_load_bytes"] = opened["peak_rss_after_load_bytes"]
            if not out[key]["runs"]:
                out[key] = {"status": "error", "error": "every repetition reused a cached prefix: no cold run",
                            "rejected": out[key]["rejected"]}
    finally:
        for proc, _ in procs.values():
            proc.kill()
    return [out[cell_key(c)] for c in cells]


def _add_bpw(m: dict, bpw: dict, bandwidth_gbps: float | None, bandwidth_source: str = "") -> None:
    """The variant's effective BPW and the bandwidth roofline: measured read bandwidth (GB/s) / bytes read
    per token, and where the bandwidth figure comes from."""
    m.update(model_file_bytes=bpw["file_bytes"], file_bpw=bpw["file_bpw"], tensor_bpw=bpw.get("tensor_bpw"),
             linear_bpw=bpw["linear_bpw"], bytes_per_token=bpw["bytes_per_token"])
    if bandwidth_gbps and m.get("decode_tokens_per_s"):
        roof = bandwidth_gbps * 1e9 / bpw["bytes_per_token"]
        m.update(bandwidth_roofline_tokens_per_s=roof, bandwidth_roofline_fraction=m["decode_tokens_per_s"] / roof,
                 bandwidth_gbps=bandwidth_gbps, bandwidth_source=bandwidth_source)


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


def node_info() -> dict:
    """Where a record was measured: this host's name and, inside a Ray task, the Ray node's id (else None)."""
    node_id = None
    ray = sys.modules.get("ray")        # never imported here: only a cluster run has it loaded
    if ray is not None and ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
    return {"host": platform.node(), "ray_node_id": node_id}


def open_results(sweep: Sweep, out_dir: str | Path, device=None, force: bool = False) -> tuple[Path, set[str]]:
    """Prepare ``out_dir`` for ``sweep`` and read what is done; returns (``runs.jsonl`` path, keys done).

    A key is done when its last record is not marked ``rerun_on_resume`` (a cell whose cluster node was
    lost, or that no node could take): those run again when the sweep is resumed, and their new record
    supersedes the old one (the report reads the last record of each key).

    Raises:
        UsageError: ``out_dir`` holds a different sweep and ``force`` is false; not Linux.
    """
    if os.name != "posix" or not Path("/proc/self/status").is_file():
        raise UsageError("edgerun bench needs Linux: each cell runs in a child process measured through /proc "
                         "(its own peak RSS, CPU and steal time)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / "sweep.json"
    if marker.exists():
        try:
            prev = json.loads(marker.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            prev = {}                                       # unreadable: a different sweep unless --force
        if not isinstance(prev, dict) or prev.get("digest") != sweep.digest and not force:
            name = prev.get("name") if isinstance(prev, dict) else None
            raise UsageError(f"{out_dir} holds results of a different sweep ('{name}'); "
                             "pass --force to add to it, or choose another --out")
    with atomic_file(marker, force=True) as tmp:
        tmp.write_text(json.dumps({"name": sweep.name, "digest": sweep.digest, "file": str(sweep.path),
                                   "device": device.as_dict() if device else None}, indent=2))
    jsonl = out_dir / "runs.jsonl"
    last: dict[str, dict] = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by an interrupt: that cell runs again
            if isinstance(rec, dict):
                last[rec.get("key")] = rec
        if jsonl.stat().st_size and not jsonl.read_bytes().endswith(b"\n"):
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write("\n")  # close a line an interrupt cut short; it is skipped when read
    return jsonl, {k for k, rec in last.items() if not rec.get("rerun_on_resume")}


def group_records(group: list[dict], sweep: Sweep, exports: dict, device, machine: dict, idle,
                  bandwidth: tuple[float | None, str], log: Callable[[str], None],
                  emit: Callable[..., None]) -> None:
    """Run one group (cells that differ only in backend) on this machine, handing its records to ``emit``.

    Cells that do not apply are emitted first, as such; then the variant is exported (cached in
    ``exports`` and on disk) and the measured records are emitted together when the group ends (an
    interrupted group emits none of them); an export or harness failure is every runnable cell's error.
    ``device`` is this machine's config (or None), ``bandwidth`` (GB/s, its source) the roofline's figure.
    """
    bases = [{"sweep": sweep.name, "key": cell_key(c), "cell": c, "device": device.name if device else None,
              "machine": machine, "node": node_info(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
             for c in group]
    runnable, skipped = [], []
    for i, base in enumerate(bases):
        why = not_applicable(base["cell"])
        if why:
            skipped.append({**base, "status": "not applicable", "reason": why})
        else:
            runnable.append(i)
    if skipped:
        emit(*skipped)
    if runnable:
        cell = bases[runnable[0]]["cell"]
        variants = {v.name: v for v in sweep.variants}
        try:
            k = (cell["model"], cell["variant"])
            if k not in exports:
                exports[k] = export_variant(cell["model"], variants[cell["variant"]], log)
            path, bpw = exports[k]
            bodies = run_group([bases[i]["cell"] for i in runnable], sweep, path, bpw, bandwidth, device, idle)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failing export or harness error is recorded, the sweep goes on
            bodies = [{"status": "error", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=3)}] * len(runnable)
        emit(*({**bases[i], **body} for i, body in zip(runnable, bodies)))   # the whole group, once done


def quality_record(sweep: Sweep, model: str, v: Variant, exports: dict, log: Callable[[str], None]) -> dict:
    """The ``quality`` record of one model variant (perplexity, task accuracy), measured on this machine."""
    key = f"quality|{model}|{v.name}"
    base = {"sweep": sweep.name, "key": key, "kind": "quality", "model": model, "variant": v.name,
            "node": node_info()}
    try:
        if (model, v.name) not in exports:
            exports[(model, v.name)] = export_variant(model, v, log)
        path, bpw = exports[(model, v.name)]
        return {**base, "status": "ok", "bpw": bpw, "quality": measure_quality(model, v, path, sweep, log)}
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return {**base, "status": "error", "error": f"{type(e).__name__}: {e}"}


def todo(sweep: Sweep, done: set[str], device_name: str | None = None) -> tuple[list[list[dict]], list[tuple]]:
    """What is left to run: (groups of cells, in run order; (model, variant) pairs whose quality is not measured).

    ``device_name``: only that device's cells (a local run of a sweep that names devices).
    """
    cells = [c for c in sweep.cells() if cell_key(c) not in done
             and (device_name is None or c.get("device") in (None, device_name))]
    quality = [(m, v) for m in sweep.models for v in sweep.variants if f"quality|{m}|{v.name}" not in done]
    return _groups(cells), quality


def local_device_name(sweep: Sweep, device_path: str | Path | None) -> str | None:
    """The device whose cells a local run of ``sweep`` measures: the ``--device`` file's name (its stem).

    Raises:
        UsageError: the sweep names devices and ``--device`` names none of them (or is missing).
    """
    if not sweep.devices:
        return None
    name = Path(device_path).stem if device_path else None
    if name not in sweep.devices:
        raise UsageError(f"sweep '{sweep.name}' is measured on devices {', '.join(sweep.devices)}: run it on a cluster "
                         "(--cluster, docs/cluster.md), or here with --device device_configs/NAME.yaml for one of "
                         "them (only that device's cells run)" + (f"; '{name}' is not one of them" if name else ""))
    return name


def run(sweep: Sweep, out_dir: str | Path, device=None, force: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, bandwidth_gbps: float | None = None,
        device_name: str | None = None) -> Path:
    """Run (or resume) ``sweep`` into ``out_dir`` on this machine; returns the JSONL path.

    ``device_name``: for a sweep that names ``devices``, the one this machine is (only its cells run
    here; see :func:`local_device_name`); the others are left for a cluster run.

    Raises:
        UsageError: ``out_dir`` holds a different sweep and ``force`` is false; not Linux; a sweep that
            names devices without ``device_name`` among them.
    """
    if sweep.devices and device_name not in sweep.devices:
        raise UsageError(f"sweep '{sweep.name}' names devices {', '.join(sweep.devices)}; say which one this machine "
                         "is (--device device_configs/NAME.yaml), or run it on a cluster (--cluster)")
    jsonl, done = open_results(sweep, out_dir, device, force)
    machine = machine_info()
    bandwidth_source = "given to the sweep"
    if bandwidth_gbps is None and device is not None:
        bandwidth_gbps = device.memory_bandwidth_gbps
        bandwidth_source = f"device config {device.name}"
    idle = power.measure_idle(2.0, tdp_watts=device.tdp_watts if device else None)
    groups, quality_todo = todo(sweep, done, device_name)
    n_todo = sum(len(g) for g in groups)
    cells = sweep.cells()
    others = sum(1 for c in cells if c.get("device") not in (None, device_name) and cell_key(c) not in done)
    log(f"sweep '{sweep.name}': {len(cells)} cells, {sum(cell_key(c) in done for c in cells)} already done, "
        f"{n_todo} to run"
        + (f" ({others} for other devices left for a cluster run)" if others else ""))
    bar = tqdm(total=n_todo + len(quality_todo), desc="bench", unit="cell") if progress else None
    with open(jsonl, "a", encoding="utf-8") as f:
        def write(*recs):
            f.write("".join(json.dumps(rec, default=str) + "\n" for rec in recs))    # one write per group
            f.flush()

        exports: dict[tuple[str, str], tuple[Path, dict]] = {}
        for group in groups:
            group_records(group, sweep, exports, device, machine, idle, (bandwidth_gbps, bandwidth_source), log, write)
            if bar:
                bar.update(len(group))
        for model, v in quality_todo:
            write(quality_record(sweep, model, v, exports, log))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return jsonl
