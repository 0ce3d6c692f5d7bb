"""CPU energy from RAPL counters in the Linux powercap tree, or an honest "unavailable (reason)".

Why our own reader rather than a library: pyRAPL is unmaintained since
2019, needs root since CVE-2020-8694 made ``energy_uj`` root-only, and does not handle counter
wraparound; zeus (0.16) is maintained and handles wraparound, but reads a fixed
``/sys/class/powercap`` path (so the code that runs in production cannot be exercised against a
test tree) and pulls in pandas, scikit-learn, amdsmi and NVML bindings. Reading RAPL is small:

- zones are ``<root>/intel-rapl:N`` (packages) with subzones ``intel-rapl:N:M`` (``core``,
  ``uncore``, ``dram``); AMD processors expose the same ``intel-rapl`` interface through the
  ``rapl`` driver (package and core only); ``psys`` (platform) zones are reported apart;
- each zone has ``name``, ``energy_uj`` (microjoules, monotonically increasing) and
  ``max_energy_range_uj``; the counter wraps to 0 after ``max_energy_range_uj``, so a negative delta
  is corrected by adding the range (a sampler thread reads at least every ``sample_s`` seconds so
  that at most one wrap happens between reads: the fastest-wrapping package counter spans ~60 s at
  ~250 W);
- ``energy_uj`` is root-only on patched kernels: a permission error is reported, never zeros.

The energy of a run is package energy minus the idle baseline (idle watts x duration), where the
idle power is measured before the run. Where no counter is readable the record says so; a model
estimate from the device config's TDP and measured CPU utilization goes in a separately named field
(:func:`estimate_from_tdp`), never in the measured one.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

POWERCAP_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class Zone:
    """One RAPL counter: ``path`` (its directory), ``name`` (``package-0``, ``core``, ``dram``...),
    ``domain`` (``package``, ``core``, ``uncore``, ``dram``, ``psys``), ``max_range_uj``."""

    path: Path
    name: str
    domain: str
    max_range_uj: int


@dataclass
class EnergyReading:
    """Energy over a measured interval.

    Attributes:
        available: whether counters could be read.
        reason: why not, when unavailable (e.g. "no /sys/class/powercap", "permission denied").
        seconds: interval length.
        joules: domain -> joules over the interval (packages summed under ``package``).
        watts: domain -> average watts.
        wraps: counter wraparounds corrected during the interval.
    """

    available: bool
    reason: str = ""
    seconds: float = 0.0
    joules: dict[str, float] = field(default_factory=dict)
    watts: dict[str, float] = field(default_factory=dict)
    wraps: int = 0

    def as_dict(self) -> dict:
        if not self.available:
            return {"energy": f"unavailable ({self.reason})"}
        return {"energy_joules": self.joules, "power_watts": self.watts, "seconds": self.seconds,
                "counter_wraps": self.wraps}


def _domain(name: str) -> str:
    if name.startswith("package"):
        return "package"
    return name if name in ("core", "uncore", "dram", "psys") else "other"


def discover(root: str | Path = POWERCAP_ROOT) -> tuple[list[Zone], str]:
    """RAPL zones under ``root`` and, when there are none usable, the reason.

    Returns:
        (zones, reason): reason is "" when at least one zone's counter is readable.
    """
    root = Path(root)
    if not root.is_dir():
        return [], f"no {root} on this machine"
    zones = []
    for d in sorted(root.glob("intel-rapl:*")):
        try:
            name = (d / "name").read_text().strip()
            max_range = int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue
        zones.append(Zone(d, name, _domain(name), max_range))
    if not zones:
        return [], f"no RAPL zones under {root}"
    try:
        int((zones[0].path / "energy_uj").read_text())
    except PermissionError:
        return [], f"permission denied reading {zones[0].path / 'energy_uj'} (root-only since CVE-2020-8694)"
    except (OSError, ValueError) as e:
        return [], f"cannot read {zones[0].path / 'energy_uj'}: {e}"
    return zones, ""


class EnergyMeter:
    """Measure RAPL energy over a block of code, correcting counter wraparound.

    Usage::

        meter = EnergyMeter()
        with meter:
            run()
        reading = meter.reading   # EnergyReading, available or with its reason

    Args:
        root: powercap directory (tests point it at a fake tree).
        sample_s: how often a background thread reads the counters (wraparound safety).
    """

    def __init__(self, root: str | Path = POWERCAP_ROOT, sample_s: float = 1.0):
        self.zones, self.reason = discover(root)
        self.sample_s = sample_s
        self.reading = EnergyReading(available=False, reason=self.reason or "not measured yet")
        self._last: dict[Path, int] = {}
        self._total: dict[Path, int] = {}
        self._wraps = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def _read(self, zone: Zone) -> int:
        return int((zone.path / "energy_uj").read_text())

    def _sample(self) -> None:
        with self._lock:
            for z in self.zones:
                now = self._read(z)
                delta = now - self._last[z.path]
                if delta < 0:  # the counter wrapped past max_energy_range_uj
                    delta += z.max_range_uj + 1
                    self._wraps += 1
                self._total[z.path] += delta
                self._last[z.path] = now

    def _loop(self) -> None:
        while not self._stop.wait(self.sample_s):
            try:
                self._sample()
            except OSError:
                return

    def __enter__(self) -> "EnergyMeter":
        self._t0 = time.perf_counter()
        if not self.zones:
            return self
        try:
            self._last = {z.path: self._read(z) for z in self.zones}
        except PermissionError as e:
            self.zones, self.reason = [], f"permission denied reading {e.filename}"
            return self
        self._total = {z.path: 0 for z in self.zones}
        self._wraps = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self._t0
        if not self.zones:
            self.reading = EnergyReading(available=False, reason=self.reason, seconds=seconds)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        joules: dict[str, float] = {}
        for z in self.zones:
            joules[z.domain] = joules.get(z.domain, 0.0) + self._total[z.path] / 1e6
        watts = {d: j / seconds for d, j in joules.items()} if seconds > 0 else {}
        self.reading = EnergyReading(available=True, seconds=seconds, joules=joules, watts=watts, wraps=self._wraps)


def measure_idle(seconds: float = 2.0, root: str | Path = POWERCAP_ROOT) -> EnergyReading:
    """Package power with nothing running, for the idle baseline (unavailable readings pass through)."""
    meter = EnergyMeter(root, sample_s=min(1.0, seconds))
    with meter:
        time.sleep(seconds)
    return meter.reading


def above_idle(run: EnergyReading, idle: EnergyReading) -> dict:
    """Package joules of ``run`` minus the idle baseline over the same duration (a record's energy fields)."""
    if not run.available:
        return run.as_dict()
    out = run.as_dict()
    if idle.available and idle.seconds > 0:
        idle_w = idle.watts.get("package", 0.0)
        out["idle_package_watts"] = idle_w
        out["package_joules_above_idle"] = run.joules.get("package", 0.0) - idle_w * run.seconds
    return out


def estimate_from_tdp(tdp_watts: float, idle_watts: float, cpu_utilization: float, seconds: float) -> dict:
    """A *model estimate*, not a measurement: (idle + utilization x (TDP - idle)) x seconds.

    Args:
        tdp_watts, idle_watts: from the device config.
        cpu_utilization: 0..1 share of the machine's CPU time used during the run.
        seconds: run duration.
    """
    watts = idle_watts + max(0.0, min(1.0, cpu_utilization)) * (tdp_watts - idle_watts)
    return {"estimated_energy_joules_from_tdp": watts * seconds, "estimated_watts_from_tdp": watts,
            "estimate_basis": "device config TDP and idle watts x measured CPU utilization (not a measurement)"}


def cpu_seconds() -> float:
    """CPU time (user + system) used by this process so far, seconds."""
    t = os.times()
    return t.user + t.system
