"""Device configs: what a laptop is (cores, RAM, memory budget, TDP, RAPL domains, memory bandwidth).

One YAML file per device in ``device_configs/``. The runtime reads them for its memory budget
(:func:`load`, or :func:`this_machine` without a file); ``profilers.device.detect`` adds what only a
measurement can tell (RAPL domains, memory bandwidth) for ``edgerun device detect``. Fields no
command can read (TDP, idle watts) are left empty rather than guessed.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from edgerun.backends.base import physical_cores
from edgerun.formats import yamlfile as yf

SCHEMA = {
    "name": yf.Field(yf.is_str),
    "cpu_model": yf.Field(yf.is_str),
    "cores": yf.Field(yf.positive_int),
    "threads": yf.Field(yf.positive_int),
    "ram_gib": yf.Field(yf.positive_number),
    "memory_budget_gib": yf.Field(yf.positive_number),
    "tdp_watts": yf.Field(yf.positive_number, required=False),
    "idle_watts": yf.Field(yf.non_negative_number, required=False),
    "rapl_domains": yf.Field(yf.list_of(yf.is_str), required=False, default=[]),
    "memory_bandwidth_gbps": yf.Field(yf.positive_number, required=False),
    "memory": yf.Field(yf.is_str, required=False),
    "sources": yf.Field(yf.list_of(yf.is_str), required=False, default=[]),
    "notes": yf.Field(yf.is_str, required=False),
}


@dataclass
class DeviceConfig:
    """A device description (see ``device_configs/*.yaml``).

    Attributes:
        name: short name. cpu_model: CPU name. cores / threads: physical cores / hardware threads.
        ram_gib: installed RAM. memory_budget_gib: RAM a model may take on this device.
        tdp_watts, idle_watts: package power figures (None when unknown; never guessed).
        rapl_domains: readable RAPL domains (empty: no counters).
        memory_bandwidth_gbps: measured or specified memory bandwidth in GB/s (1e9 bytes/s).
        memory: memory type and configuration. sources: where the figures come from. notes: free text.
    """

    name: str
    cpu_model: str
    cores: int
    threads: int
    ram_gib: float
    memory_budget_gib: float
    tdp_watts: float | None = None
    idle_watts: float | None = None
    rapl_domains: list[str] = field(default_factory=list)
    memory_bandwidth_gbps: float | None = None
    memory: str | None = None
    sources: list[str] = field(default_factory=list)
    notes: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def load(path: str | Path) -> DeviceConfig:
    """Read and check a device YAML file.

    Raises:
        YamlError: malformed YAML or a bad field (the message names the field and its line).
    """
    path = Path(path)
    data, lines = yf.read(path)
    data = yf.check(path, data, lines, SCHEMA)
    if data["memory_budget_gib"] > data["ram_gib"]:
        raise yf.YamlError(f"{path}, line {lines.get('memory_budget_gib', '?')}: field 'memory_budget_gib' "
                           f"({data['memory_budget_gib']}) exceeds ram_gib ({data['ram_gib']})")
    if data["threads"] < data["cores"]:
        raise yf.YamlError(f"{path}, line {lines.get('threads', '?')}: field 'threads' is below 'cores'")
    return DeviceConfig(**data)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def this_machine() -> DeviceConfig:
    """This machine as read from the OS, without measurements: CPU, cores, RAM, a budget of 75% of RAM.

    RAPL domains and memory bandwidth stay empty (``profilers.device.detect`` measures them).
    """
    ram = psutil.virtual_memory().total / 2**30
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return DeviceConfig(name=platform.node() or "this-machine", cpu_model=cpu_model(), cores=physical_cores(),
                        threads=threads, ram_gib=round(ram, 1), memory_budget_gib=round(ram * 0.75, 1),
                        notes=f"detected by edgerun on {time.strftime('%Y-%m-%d')}")


def budget_bytes(device: str | Path | DeviceConfig | None = None) -> int:
    """The memory budget in bytes of a device config (a YAML path or a loaded config; None: this machine).

    Raises:
        YamlError: a malformed device YAML.
    """
    cfg = device if isinstance(device, DeviceConfig) else (load(device) if device is not None else this_machine())
    return int(cfg.memory_budget_gib * 2**30)


def to_yaml(config: DeviceConfig) -> str:
    import yaml  # only to write a config; chat reads none unless --device is given (yamlfile reads those)

    return yaml.safe_dump(config.as_dict(), sort_keys=False, allow_unicode=True)
