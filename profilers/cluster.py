"""Device fleets on Ray: sweeps and searches spread over a cluster of machines (``--cluster``).

Ray (https://docs.ray.io) schedules the work; this module only says what runs where:

- **Sweeps** (``edgerun bench --sweep FILE --cluster ADDRESS``): a sweep that names ``devices``
  (``device_configs/NAME.yaml``) runs each group of cells (the cells that differ only in backend,
  whose repetitions are interleaved A B B A in one process pair, so they must share a machine) as one
  Ray task that requires the custom resource ``device:NAME``. A node offers that resource, with
  amount 1, when it was started by ``edgerun worker`` with that device config, so a node runs one
  group at a time and no two measurements share its cores. On the node the task runs exactly what a
  local sweep runs (:func:`profilers.sweep.group_records`: one child process per cell, cold
  repetitions, the node's own device config and idle baseline) and returns the records, which the
  driver appends to the one ``runs.jsonl`` as groups finish. Resume is the local one: cells in
  ``runs.jsonl`` are not run again. When a node is lost, its group runs again on another node with
  the same device if there is one; otherwise its cells are recorded as errors that name the lost
  node, marked ``rerun_on_resume`` (run again when the sweep is resumed and such a node is back).
- **KV layout searches** (``edgerun kv tune --cluster``): :class:`LayoutPool` is the search's
  ``evaluate`` function: one evaluator actor per CPU of the cluster (each node rebuilds the
  evaluator from an :class:`edgerun.kv.tune.EvaluationSpec` and its own copy of the checkpoint) and
  each layout one actor call; NSGA-II asks a generation, the pool evaluates its new layouts in
  parallel (see :mod:`edgerun.kv.tune`).
- **Expert calibration** (``edgerun experts calibrate --cluster``): one Ray task per task, each
  calibrating on its node's copy of the model (:func:`calibrate_tasks`).

What crosses the network per task is small: cell descriptions, sweep settings, layouts (a pair per
layer), task names, and back JSON records or per-layer statistics. Models and datasets never go
through Ray's object store: each node resolves them from its own cache (``edgerun pull``'s catalog,
sha256-checked: a catalog model file against the catalog's digest, a checkpoint or a model given as
a path against the digest the driver computed from its own copy, so every node runs the same bytes).

Ray is imported only when ``--cluster`` is given (``pip install 'edgerun[cluster]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from edgerun import catalog
from edgerun.atomic import atomic_file
from edgerun.device import DeviceConfig
from edgerun.device import load as load_device
from edgerun.device import this_machine, to_yaml
from edgerun.errors import ChecksumError, EdgerunError, UsageError

RESOURCE_PREFIX = "device:"
ROOT_CONFIGS = Path(__file__).resolve().parent.parent / "device_configs"   # the shipped configs (a source checkout)
_ADDRESS = re.compile(r"^(auto|ray://[^\s:/]+:\d+|[^\s:/]+:\d+)$")
_NODE: dict = {}          # per Ray worker process: verified files, device configs, idle baselines, exports


def device_resource(name: str) -> str:
    """The Ray custom resource a node with device config ``name`` offers: ``device:NAME``."""
    return RESOURCE_PREFIX + name


def _ray():
    try:
        import ray  # heavy (about 1 s): only --cluster imports it
    except ImportError:
        raise UsageError("--cluster needs Ray: pip install 'edgerun[cluster]' (or 'ray[client]')") from None
    return ray


@contextlib.contextmanager
def connected(address: str):
    """Connect this process to the Ray cluster at ``address`` for the duration of the block; yields ``ray``.

    ``address``: ``auto`` (the cluster this machine is a node of), ``HOST:PORT`` (its head's GCS port,
    from a machine of the cluster's network) or ``ray://HOST:PORT`` (Ray Client, from anywhere the
    head's client port is reachable). Ray is shut down when the block ends, however it ends.

    Raises:
        UsageError: a malformed address, Ray not installed, or no cluster there.
    """
    if not _ADDRESS.match(address or ""):
        raise UsageError(f"bad --cluster address '{address}'; use auto, HOST:PORT or ray://HOST:PORT")
    ray = _ray()
    for attempt in range(3):
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            break
        except (ConnectionError, RuntimeError, ValueError) as e:
            # a head that has just started may refuse the first client ("Initialization failure from
            # server") until its client server is up: try again twice, 2 s apart
            transient = "Initialization failure" in str(e)
            if attempt < 2 and transient:
                with contextlib.suppress(Exception):
                    ray.shutdown()
                time.sleep(2.0)
                continue
            raise UsageError(f"cannot connect to a Ray cluster at {address}: {str(e).splitlines()[0]} "
                             "(start one with 'edgerun worker --head', docs/cluster.md)") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def alive_devices(ray) -> dict[str, list[str]]:
    """Device name -> ids of the alive nodes that offer it (from the cluster's node table)."""
    out: dict[str, list[str]] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for res in node.get("Resources", {}):
                if res.startswith(RESOURCE_PREFIX):
                    out.setdefault(res[len(RESOURCE_PREFIX):], []).append(node["NodeID"])
    return out


def _lost_errors(ray) -> tuple:
    """The exceptions that mean the machine running a task went away (not an error of the task itself)."""
    names = ("NodeDiedError", "WorkerCrashedError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError",
             "ActorDiedError", "ActorUnavailableError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _cause(e: BaseException) -> str:
    """One line for an exception raised inside a Ray task: the original error, not Ray's wrapper."""
    inner = getattr(e, "cause", None) or e
    return f"{type(inner).__name__}: {str(inner).strip().splitlines()[-1] if str(inner).strip() else ''}"


# --- files every node checks -------------------------------------------------------------------

def tree_sha256(path: str | Path) -> str:
    """sha256 of a model file, or of a checkpoint directory: its files' relative names and contents, in
    name order (hidden files and ``*.lock`` left out)."""
    path = Path(path)
    if path.is_file():
        return catalog.file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or rel.endswith(".lock"):
            continue
        h.update(rel.encode() + b"\0" + catalog.file_sha256(f).encode())
    return h.hexdigest()


def _verified(path: Path, expected: str, what: str) -> Path:
    """``path`` after checking its sha256 against ``expected`` (once per process and file version).

    Raises:
        ChecksumError: the node's copy differs from the one the driver (or the catalog) names.
    """
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    seen = _NODE.setdefault("verified", {})
    if seen.get(key) != expected:
        got = tree_sha256(path)
        if got != expected:
            raise ChecksumError(f"{what} on this node ({path}) has sha256 {got[:12]}..., expected {expected[:12]}...: "
                                "the nodes do not hold the same model (pull it again there, or copy the same files)")
        seen[key] = expected
    return path


def model_digests(models: Sequence[str]) -> dict[str, str]:
    """sha256 each node must find for the sweep's models: the catalog's for catalog models (a node pulls
    them into its own cache), the driver's own copy's for a model given as a path (which every node
    must hold at the same path)."""
    out = {}
    for m in models:
        entry = catalog.CATALOG.get(m)
        if entry is not None and entry.kind == "model":
            out[m] = entry.sha256
        else:
            out[m] = tree_sha256(m)
    return out


def node_model(model: str, expected: str) -> Path:
    """The sweep model ``model`` on this node: pulled into its cache when it is a catalog model, then
    checked against ``expected`` (sha256).

    Raises:
        ChecksumError: a different file. ModelFileError: a path this node does not have.
    """
    entry = catalog.CATALOG.get(model)
    path = catalog.pull(entry.name, progress=False) if entry is not None and entry.kind == "model" \
        else catalog.resolve(model, progress=False)
    return _verified(path, expected, f"model {model}")


def checkpoint_dir(model: str) -> Path:
    """An HF checkpoint directory of ``model`` on this machine: the path itself, or a catalog GGUF
    dequantized to float32 once (cached under ``$EDGERUN_HOME``), as ``edgerun kv tune`` does."""
    from converters.source import open_source  # torch: dequantizing a GGUF source

    path = catalog.resolve(model, progress=False)
    return path if path.is_dir() else open_source(model, progress=False).path


# --- nodes -------------------------------------------------------------------------------------

def devices_dir() -> Path:
    """Where a node keeps the device config it was started with: ``$EDGERUN_HOME/devices``."""
    return catalog.home() / "devices"


def find_config(name_or_path: str, configs: Path | None = None) -> tuple[str, Path]:
    """(device name, config file) of ``--device``: a YAML path, or NAME in ``configs`` (``./device_configs``,
    else the shipped ``device_configs/``).

    Raises:
        UsageError: no such config.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UsageError(f"no such device config: {p}")
        return p.stem, p
    for d in ([configs] if configs else [Path("device_configs"), ROOT_CONFIGS]):
        if (d / f"{name_or_path}.yaml").is_file():
            return name_or_path, d / f"{name_or_path}.yaml"
    raise UsageError(f"no device config '{name_or_path}' (looked for device_configs/{name_or_path}.yaml); "
                     "write one with 'edgerun device detect > device_configs/NAME.yaml'")


def _model_tokens(text: str) -> set[str]:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", text.lower())
    return set(re.findall(r"[a-z0-9][a-z0-9-]*", text))


def detect_config(configs: Path | None = None) -> tuple[str, DeviceConfig, str]:
    """This machine's device config: (name, config, how it was found).

    The config in ``configs`` (default ``./device_configs``, else the shipped ones) whose CPU model
    (its name before any parenthesis) names this CPU and whose cores and threads are this machine's;
    with none, the detected description (``edgerun.device.this_machine``) under this host's name.

    Raises:
        UsageError: several configs match (pass ``--device``).
    """
    me = this_machine()
    mine = _model_tokens(me.cpu_model)
    d = configs or (Path("device_configs") if Path("device_configs").is_dir() else ROOT_CONFIGS)
    found = []
    for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
        try:
            cfg = load_device(f)
        except EdgerunError:
            continue
        want = _model_tokens(cfg.cpu_model.split(" (")[0])
        if want and want <= mine and cfg.cores == me.cores and cfg.threads == me.threads:
            found.append((f.stem, cfg, f"matched {f}"))
    if len(found) > 1:
        raise UsageError("several device configs describe this machine (" + ", ".join(n for n, _, _ in found)
                         + "); pass --device NAME")
    if found:
        return found[0]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", me.name) or "this-machine"
    return name, me, f"no config in {d} matches this CPU ({me.cpu_model}, {me.cores} cores): detected as '{name}'"


def install_config(name: str, config: DeviceConfig) -> Path:
    """Keep ``config`` as this node's device ``name`` (``$EDGERUN_HOME/devices/NAME.yaml``, atomic)."""
    path = devices_dir() / f"{name}.yaml"
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(to_yaml(config))
    return path


def worker_command(device: str, address: str | None = None, head: bool = False, port: int = 6379,
                   client_port: int = 10001, num_cpus: int | None = None, object_store_bytes: int | None = None,
                   node_ip: str | None = None) -> list[str]:
    """The ``ray start`` command line of ``edgerun worker``: a node offering ``device:NAME`` (amount 1),
    in the foreground (``--block``: Ctrl-C or SIGTERM stops it), usage statistics off.

    Raises:
        UsageError: neither ``address`` nor ``head``, or both.
    """
    if head == bool(address):
        raise UsageError("edgerun worker needs --address HOST:PORT (join a cluster) or --head (start one), not both")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
           "--resources", json.dumps({device_resource(device): 1})]
    if head:
        cmd += ["--head", f"--port={port}", f"--ray-client-server-port={client_port}", "--include-dashboard=false"]
    else:
        cmd += [f"--address={address}"]
    if num_cpus is not None:
        cmd += [f"--num-cpus={num_cpus}"]
    if object_store_bytes is not None:
        cmd += [f"--object-store-memory={object_store_bytes}"]
    if node_ip:
        cmd += [f"--node-ip-address={node_ip}"]
    return cmd


def node_device(name: str) -> DeviceConfig:
    """The device config of this node for device ``name``: the one ``edgerun worker`` installed
    (``$EDGERUN_HOME/devices/NAME.yaml``), else ``device_configs/NAME.yaml`` of a source checkout.

    Raises:
        UsageError: neither exists (the node was started with plain ``ray start``).
    """
    for path in (devices_dir() / f"{name}.yaml", ROOT_CONFIGS / f"{name}.yaml"):
        if path.is_file():
            return load_device(path)
    raise UsageError(f"this node offers device '{name}' but has no config for it; start it with "
                     f"'edgerun worker --device {name}'")


def _node_state(device_name: str) -> dict:
    """What a node measures once per Ray worker process and device: config, machine info, idle baseline."""
    from profilers import power, sweep

    states = _NODE.setdefault("devices", {})
    if device_name not in states:
        device = node_device(device_name)
        states[device_name] = {
            "device": device, "machine": sweep.machine_info(),
            "idle": power.measure_idle(2.0, tdp_watts=device.tdp_watts),
            "bandwidth": (device.memory_bandwidth_gbps, f"device config {device.name}"),
        }
    return states[device_name]


def _exports() -> dict:
    return _NODE.setdefault("exports", {})


def run_group_here(group: list[dict], sweep, device_name: str, digests: dict[str, str]) -> list[dict]:
    """A Ray task's body: one group of a sweep on this node; returns its records (as a local sweep writes them).

    Raises:
        ChecksumError: this node's copy of the model differs. UsageError: no config for the device.
    """
    from profilers import sweep as sweep_mod

    for model in {c["model"] for c in group}:
        node_model(model, digests[model])
    state = _node_state(device_name)
    records: list[dict] = []
    sweep_mod.group_records(group, sweep, _exports(), state["device"], state["machine"], state["idle"],
                            state["bandwidth"], log=lambda m: None, emit=lambda *recs: records.extend(recs))
    return records


def quality_here(sweep, model: str, variant: str, digests: dict[str, str]) -> dict:
    """A Ray task's body: the quality record of one model variant, measured on this node."""
    from profilers import sweep as sweep_mod

    node_model(model, digests[model])
    v = next(v for v in sweep.variants if v.name == variant)
    return sweep_mod.quality_record(sweep, model, v, _exports(), log=lambda m: None)


# --- sweeps ------------------------------------------------------------------------------------

def run_sweep(sweep, out_dir: str | Path, address: str, device_name: str | None = None, force: bool = False,
              progress: bool = True, log: Callable[[str], None] = print, retries: int = 2,
              poll_s: float = 2.0) -> Path:
    """Run (or resume) ``sweep`` on the Ray cluster at ``address`` into ``out_dir``; returns the JSONL path.

    Each group of cells is a task pinned to ``device:NAME`` (its cells' device; for a sweep without
    ``devices``, ``device_name``). Records are appended as groups finish. A group whose node is lost
    runs again (up to ``retries`` times) when another alive node has its device; otherwise, like a group
    whose device no alive node offers, its cells are recorded as errors marked ``rerun_on_resume``.
    Quality records run on a node of any of the sweep's devices. Ray is shut down at the end.

    Raises:
        UsageError: no devices to place cells on; as :func:`connected` and
            :func:`profilers.sweep.open_results`.
    """
    from profilers import sweep as sweep_mod

    if not sweep.devices and not device_name:
        raise UsageError(f"sweep '{sweep.name}' names no devices: add 'devices: [NAME, ...]' (device_configs/NAME.yaml) "
                         "or pass --device NAME, so each cell has a node to run on")
    digests = model_digests(sweep.models)
    with connected(address) as ray:                 # reached (or refused) before anything is written
        jsonl, done = sweep_mod.open_results(sweep, out_dir, None, force)
        groups, quality = sweep_mod.todo(sweep, done)
        n_cells = sum(len(g) for g in groups)
        log(f"sweep '{sweep.name}' on the cluster at {address}: {len(sweep.cells())} cells, {n_cells} to run "
            f"in {len(groups)} tasks, {len(quality)} quality records")
        with open(jsonl, "a", encoding="utf-8") as f:
            _drive(ray, sweep, groups, quality, f, device_name, digests, progress, log, retries, poll_s)
    return jsonl


def _drive(ray, sweep, groups, quality, f, device_name, digests, progress, log, retries, poll_s) -> None:
    """Submit the groups and quality records, write their records to ``f`` as they finish (see :func:`run_sweep`)."""
    from profilers import sweep as sweep_mod

    lost_errors = _lost_errors(ray)
    n_cells = sum(len(g) for g in groups)
    group_task, quality_task = ray.remote(run_group_here), ray.remote(quality_here)
    alive = alive_devices(ray)
    log("devices in the cluster: " + (", ".join(f"{d} ({len(n)} node{'s' * (len(n) > 1)})"
                                                for d, n in sorted(alive.items())) or "none"))
    bar = tqdm(total=n_cells + len(quality), desc="bench (cluster)", unit="cell") if progress else None

    def write(recs: list[dict]) -> None:
        f.write("".join(json.dumps(rec, default=str) + "\n" for rec in recs))
        f.flush()
        if bar:
            bar.update(len(recs))

    def failed(job: dict, why: str, rerun: bool) -> list[dict]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        extra = {"rerun_on_resume": True} if rerun else {}
        if job["kind"] == "quality":
            model, variant = job["payload"]
            return [{"sweep": sweep.name, "key": f"quality|{model}|{variant}", "kind": "quality", "model": model,
                     "variant": variant, "node": None, "status": "error", "error": why, **extra}]
        return [{"sweep": sweep.name, "key": sweep_mod.cell_key(c), "cell": c, "device": job["device"],
                 "machine": None, "node": None, "time_utc": stamp, "status": "error", "error": why, **extra}
                for c in job["payload"]]

    pending: dict = {}

    def submit(job: dict, alive: dict[str, list[str]]) -> None:
        if job["kind"] == "quality":
            job["device"] = next((d for d in (sweep.devices or [device_name]) if alive.get(d)), None)
        if not job["device"] or not alive.get(job["device"]):
            what = job["device"] or " or ".join(sweep.devices or [device_name])
            write(failed(job, f"no node in the cluster offers device {what}", rerun=True))
            return
        job["attempts"] += 1
        # num_cpus=0: the device resource (amount 1 per node) is what keeps two measurements off one node
        options = {"resources": {device_resource(job["device"]): 1}, "num_cpus": 0, "max_retries": 0}
        if job["kind"] == "quality":
            ref = quality_task.options(**options).remote(sweep, *job["payload"], digests)
        else:
            ref = group_task.options(**options).remote(job["payload"], sweep, job["device"], digests)
        pending[ref] = job

    for g in groups:
        submit({"kind": "group", "payload": g, "device": g[0].get("device", device_name), "attempts": 0}, alive)
    for model, v in quality:
        submit({"kind": "quality", "payload": (model, v.name), "device": None, "attempts": 0}, alive)
    checked = time.monotonic()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    recs = ray.get(ref)
                    write(recs if isinstance(recs, list) else [recs])
                except lost_errors as e:
                    alive = alive_devices(ray)
                    if job["attempts"] <= retries and (alive.get(job["device"]) or job["kind"] == "quality"):
                        log(f"the node running a {job['device']} task was lost ({type(e).__name__}); "
                            "running it again on another node with that device")
                        submit(job, alive)
                    else:
                        why = (f"and no other node has device {job['device']}" if not alive.get(job["device"])
                               else f"{job['attempts']} times")
                        write(failed(job, f"lost: the node running it ({job['device']}) left the cluster "
                                          f"({type(e).__name__}) {why}", rerun=True))
                except Exception as e:   # the task itself failed: recorded, the sweep goes on
                    write(failed(job, _cause(e), rerun=False))
            if time.monotonic() - checked >= poll_s:     # a task whose device left would wait forever
                checked = time.monotonic()
                alive = alive_devices(ray)
                for ref, job in list(pending.items()):
                    if not alive.get(job["device"]):
                        ray.cancel(ref)
                        pending.pop(ref)
                        write(failed(job, f"lost: no node in the cluster offers device {job['device']} any more",
                                     rerun=True))
    finally:
        for ref in pending:
            ray.cancel(ref)
        if bar:
            bar.close()


# --- KV layout searches ------------------------------------------------------------------------

class LayoutEvaluator:
    """A Ray actor's state: one model on its node and one evaluator per :class:`EvaluationSpec`.

    The node resolves ``model`` itself (:func:`checkpoint_dir`: pulled and dequantized from its own
    cache, or a path it holds) and checks it against the driver's sha256 before loading it.
    """

    def __init__(self, model: str, sha256: str, threads: int = 1):
        from edgerun.backends.torch import TorchBackend
        from edgerun.kv.tune import LocalEvaluations

        path = _verified(checkpoint_dir(model), sha256, f"checkpoint of {model}")
        engine = TorchBackend(path, n_ctx=4096, threads=threads)
        self.evaluations = LocalEvaluations(engine.model, engine.tokenizer)

    def evaluate(self, spec, layout) -> dict:
        """The quality of ``layout`` on ``spec``'s windows (:meth:`edgerun.kv.tune.Evaluator.__call__`)."""
        return self.evaluations.evaluator(spec)(layout)


class LayoutPool:
    """``edgerun kv tune --cluster``: an :data:`edgerun.kv.tune.Evaluate` on evaluator actors of a Ray cluster.

    Use as a context manager around :func:`edgerun.kv.tune.tune`: it connects, starts ``workers``
    actors (default: one per ``threads`` CPUs of the cluster; each takes ``threads`` CPUs and runs that
    many torch threads), and shuts Ray down at the end. Results equal a local run's with the same
    ``threads`` on the same kind of CPU (float sums depend on the thread split and the instruction set). Calling it with (spec, layouts) sends each layout to a free actor and yields
    the results in the layouts' order as they arrive. An actor lost with its node is dropped and its
    layout sent to another one.

    Args:
        address: as :func:`connected`. model: the model as the user named it (catalog name, or a path
            every node holds). model_dir: the driver's checkpoint of it (its sha256 is what every node
            must have). workers: actors to start.
    """

    def __init__(self, address: str, model: str, model_dir: str | Path, workers: int | None = None,
                 threads: int = 1):
        self.address, self.model, self.workers, self.threads = address, model, workers, threads
        self.sha256 = tree_sha256(model_dir)
        self.actors: list = []

    def __enter__(self) -> "LayoutPool":
        self._conn = connected(self.address)
        self.ray = self._conn.__enter__()
        try:
            n = self.workers or max(1, int(self.ray.cluster_resources().get("CPU", 1)) // self.threads)
            actor = self.ray.remote(LayoutEvaluator).options(num_cpus=self.threads, max_restarts=0)
            self.actors = [actor.remote(self.model, self.sha256, self.threads) for _ in range(n)]
        except BaseException:
            self._conn.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.actors = []
        self._conn.__exit__(*exc)

    def __call__(self, spec, layouts: Sequence) -> Iterator[dict]:
        """Yield each layout's quality in order (see the class doc).

        Raises:
            EdgerunError: every actor was lost, or an actor failed to start (its cause).
        """
        ray = self.ray
        lost = _lost_errors(ray)
        queue = list(range(len(layouts)))
        free, running, done = list(self.actors), {}, {}
        nxt = 0
        while nxt < len(layouts):
            while free and queue:
                actor, i = free.pop(0), queue.pop(0)
                running[actor.evaluate.remote(spec, layouts[i])] = (i, actor)
            if not running:
                raise EdgerunError("every cluster evaluator was lost; run the same command again to resume")
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i, actor = running.pop(ref)
                try:
                    done[i] = ray.get(ref)
                    free.append(actor)
                except lost:
                    self.actors.remove(actor)
                    queue.insert(0, i)
                except Exception as e:
                    raise EdgerunError(f"a cluster evaluator failed: {_cause(e)}") from None
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1


# --- expert calibration ------------------------------------------------------------------------

def calibrate_here(model: str, sha256: str, task: tuple[str, str], tokens: int, key_layer: int, score: str,
                   name: str, threads: int = 1):
    """A Ray task's body: one task's expert pattern, calibrated on this node's checked copy of ``model``."""
    from edgerun.moe import calibrate as cal

    path = _verified(catalog.resolve(model, progress=False), sha256, f"model {model}")
    net, tokenizer = cal.load_model(path, threads=threads)
    return cal.calibrate(net, tokenizer, [task], tokens=tokens, key_layer=key_layer, score=score, name=name)[0]


def calibrate_tasks(address: str, model: str, tasks: list[tuple[str, str]], tokens: int, key_layer: int,
                    score: str, name: str, progress: bool = True, threads: int = 1) -> list:
    """``edgerun experts calibrate --cluster``: one Ray task per calibration task (``threads`` CPUs and torch
    threads each), each on its node's copy of ``model`` (checked against this machine's sha256); the
    patterns in ``tasks``' order, as :func:`edgerun.moe.calibrate.calibrate` returns them (equal to a
    local run's with the same threads on the same kind of CPU).

    Raises:
        EdgerunError: a task failed (its cause).
    """
    sha = tree_sha256(catalog.resolve(model, progress=False))
    with connected(address) as ray:
        task = ray.remote(calibrate_here).options(num_cpus=threads, max_retries=2)
        refs = [task.remote(model, sha, t, tokens, key_layer, score, name, threads) for t in tasks]
        out = {}
        bar = tqdm(total=len(refs), desc="calibrating (cluster)", unit="task") if progress else None
        try:
            remaining = list(refs)
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                try:
                    out[ready[0]] = ray.get(ready[0])
                except Exception as e:
                    raise EdgerunError(f"calibrating on the cluster failed: {_cause(e)}") from None
                if bar:
                    bar.update(1)
        finally:
            if bar:
                bar.close()
        return [out[r] for r in refs]


__all__ = ["connected", "run_sweep", "LayoutPool", "calibrate_tasks", "worker_command", "detect_config",
           "install_config", "find_config", "device_resource", "tree_sha256", "alive_devices"]
