"""A Ray cluster of local processes on loopback, each node started by ``edgerun worker`` (tests/test_cluster.py
and benchmarks/cluster_scaling.py).

Every node is a child process of the caller, stopped by its pid (SIGTERM to Ray's ``ray start --block``,
which ends the node's own processes); nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on loopback now (from the ephemeral range, outside Ray's worker ports 10002-19999)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes() -> set[int]:
    """Pids of this machine's Ray processes (Ray's binaries, its Python services and workers, ``ray::`` titles)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray::" in cmd or "/site-packages/ray/" in cmd or "ray.scripts.scripts" in cmd or "ray.util.client" in cmd:
            out.add(int(entry.name))
    return out


def linked_home(real: Path, home: Path) -> Path:
    """An EDGERUN_HOME for the nodes: its own ``devices/`` (the configs ``edgerun worker`` installs), the
    real cache's models, datasets, sources and exports linked in (nothing pulled twice)."""
    home.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "datasets", "sources", "cache", "tmp"):
        (real / sub).mkdir(parents=True, exist_ok=True)
        if not (home / sub).exists():
            (home / sub).symlink_to(real / sub)
    return home


class LocalCluster:
    """Head and worker nodes as local processes; use as a context manager (every node stopped at the end).

    Args:
        tmp: directory for the nodes' logs. env: extra environment (EDGERUN_HOME). Ray's session files go to
            a short directory under /tmp (its socket paths must stay under 108 bytes), removed at the end.
    """

    def __init__(self, tmp: Path, env: dict | None = None):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="er-ray-", dir="/tmp"))
        self.env = dict(os.environ, RAY_TMPDIR=str(self.ray_tmp), RAY_USAGE_STATS_ENABLED="0", **(env or {}))
        self.nodes: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.client_port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self, name: str, device: str, head: bool = False, num_cpus: int = 1,
              cpus: set[int] | None = None) -> subprocess.Popen:
        """Start node ``name`` offering ``device`` (a name in device_configs/ or a YAML path) with ``num_cpus``
        CPUs; ``cpus``: the cores its processes may run on (inherited by Ray's workers and the cells)."""
        cmd = [sys.executable, "-m", "edgerun.cli", "worker", "--device", str(device), f"--num-cpus={num_cpus}",
               "--object-store-memory=80000000"]
        cmd += (["--head", f"--port={self.port}", f"--client-port={self.client_port}"] if head
                else [f"--address={self.address}"])
        log = open(self.tmp / f"{name}.log", "w")

        def pin():
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.nodes[name] = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=pin)
        log.close()
        return self.nodes[name]

    def wait_for(self, devices: dict[str, int], timeout: float = 90.0) -> None:
        """Block until the cluster has ``devices`` (name -> alive nodes offering it), or raise TimeoutError."""
        import ray

        from profilers.cluster import alive_devices

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"node {name} exited ({proc.returncode}): "
                                       + (self.tmp / f"{name}.log").read_text()[-2000:])
            try:
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
                try:
                    have = {d: len(n) for d, n in alive_devices(ray).items()}
                finally:
                    ray.shutdown()
                if all(have.get(d, 0) == n for d, n in devices.items()):
                    return
            except ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the cluster did not reach {devices} within {timeout:.0f} s")

    def stop(self, name: str, timeout: float = 60.0) -> None:
        """Stop node ``name``: SIGTERM to its ``ray start``, which stops the node's processes; SIGKILL to its
        process group if it is not gone within ``timeout`` seconds."""
        proc = self.nodes.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def pids(self) -> set[int]:
        """Processes still alive in the nodes' process groups (ray start, raylet, GCS, agents)."""
        out = set()
        for proc in self.nodes.values():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        if os.getpgid(int(entry.name)) == proc.pid:
                            out.add(int(entry.name))
                    except OSError:
                        pass
        return out

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        for name in [n for n in self.nodes if n != "head"] + [n for n in self.nodes if n == "head"]:
            self.stop(name)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
