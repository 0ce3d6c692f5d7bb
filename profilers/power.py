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
  ``max_energy_range_uj``. The hardware counter steps from its maximum to 0 by one energy unit of
  the package (``2^-ESU`` J from ``MSR_RAPL_POWER_UNIT``, ~61 µJ on most Intel parts), so the exact
  correction of a wrap is ``max_energy_range_uj + unit``. The powercap sysfs has no unit file (it
  is only in the MSR, which needs root and the ``msr`` module), so a wrap is corrected by adding
  ``max_energy_range_uj`` alone, the convention of common RAPL readers: each corrected wrap
  under-counts by at most one energy unit (~61 µJ), negligible against the ~262 kJ range;
- a zone whose ``max_energy_range_uj`` is unreadable is kept (``Zone.max_range_uj`` None, with a
  ``note``): its readings carry "cannot correct wraparound", and if its counter goes backwards the
  interval's energy of its domain is reported unavailable with the reason, never negative;
- a sampler thread reads every :func:`polling_interval_s` seconds: a quarter of the time the
  fastest-wrapping counter takes to wrap at the device's TDP (default :data:`DEFAULT_TDP_WATTS`),
  between 10 ms and 1 s, so that at most one wrap happens between reads even at 4x TDP bursts;
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

#: W. Assumed package power when the device config gives no TDP: a generous upper bound for laptop
#: CPUs (high-end mobile parts have a 45-55 W base and ~150 W short-term limits).
DEFAULT_TDP_WATTS = 150.0
#: Share of the fastest counter's wrap time (at TDP) between two reads: 1/4 keeps at most one wrap
#: between reads while the package draws up to 4x TDP.
POLL_SAFETY_FRACTION = 0.25
#: s. Bounds of the derived polling interval: reading more often than 10 ms only costs CPU; reading
#: at least every second bounds the error of a missed reading.
POLL_MIN_S = 0.01
POLL_MAX_S = 1.0
#: The note on a zone (and its readings) whose wraps cannot be corrected.
NO_WRAP_CORRECTION = "cannot correct wraparound"


@dataclass(frozen=True)
class Zone:
    """One RAPL counter: ``path`` (its directory), ``name`` (``package-0``, ``core``, ``dram``...),
    ``domain`` (``package``, ``core``, ``uncore``, ``dram``, ``psys``), ``max_range_uj`` (µJ, the
    counter's maximum before it wraps to 0; None when ``max_energy_range_uj`` is unreadable) and
    ``note`` (``"cannot correct wraparound (...)"`` in that case, else "")."""

    path: Path
    name: str
    domain: str
    max_range_uj: int | None
    note: str = ""


@dataclass
class EnergyReading:
    """Energy over a measured interval.

    Attributes:
        available: whether counters could be read.
        reason: why not, when unavailable (e.g. "no /sys/class/powercap", "permission denied").
        seconds: interval length.
        joules: domain -> joules over the interval (packages summed under ``package``).
        watts: domain -> average watts.
        wraps: counter wraparounds corrected during the interval (each under-counts by at most
            one energy unit, ~61 µJ: see the module docstring).
        notes: zone directory name -> note, for zones whose wraps cannot be corrected
            ("cannot correct wraparound (...)").
        unavailable: domain -> reason, for domains whose energy over the interval is unknown (a
            zone without ``max_energy_range_uj`` whose counter went backwards); such a domain is
            absent from ``joules`` and ``watts``.
    """

    available: bool
    reason: str = ""
    seconds: float = 0.0
    joules: dict[str, float] = field(default_factory=dict)
    watts: dict[str, float] = field(default_factory=dict)
    wraps: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The record's energy fields: ``energy_joules`` (J by domain), ``power_watts`` (W),
        ``seconds``, ``counter_wraps``, plus ``energy_notes`` / ``energy_unavailable`` when there are
        any; or ``{"energy": "unavailable (reason)"}``."""
        if not self.available:
            return {"energy": f"unavailable ({self.reason})"}
        out = {"energy_joules": self.joules, "power_watts": self.watts, "seconds": self.seconds,
               "counter_wraps": self.wraps}
        if self.notes:
            out["energy_notes"] = dict(self.notes)
        if self.unavailable:
            out["energy_unavailable"] = {d: f"unavailable ({r})" for d, r in self.unavailable.items()}
        return out


def _domain(name: str) -> str:
    if name.startswith("package"):
        return "package"
    return name if name in ("core", "uncore", "dram", "psys") else "other"


def discover(root: str | Path = POWERCAP_ROOT) -> tuple[list[Zone], str]:
    """RAPL zones under ``root`` and, when there are none usable, the reason.

    A zone whose ``max_energy_range_uj`` is missing or unreadable is kept, with ``max_range_uj``
    None and ``note`` "cannot correct wraparound (...)"; only a zone without a readable ``name`` is
    skipped. Raises nothing: unreadable trees and counters are reported in ``reason``.

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
        except OSError:
            continue
        try:
            zones.append(Zone(d, name, _domain(name), int((d / "max_energy_range_uj").read_text())))
        except (OSError, ValueError) as e:
            why = "missing" if isinstance(e, FileNotFoundError) else f"unreadable: {e}"
            zones.append(Zone(d, name, _domain(name), None,
                              note=f"{NO_WRAP_CORRECTION} (max_energy_range_uj {why})"))
    if not zones:
        return [], f"no RAPL zones under {root}"
    try:
        int((zones[0].path / "energy_uj").read_text())
    except PermissionError:
        return [], f"permission denied reading {zones[0].path / 'energy_uj'} (root-only since CVE-2020-8694)"
    except (OSError, ValueError) as e:
        return [], f"cannot read {zones[0].path / 'energy_uj'}: {e}"
    return zones, ""


def polling_interval_s(zones: list[Zone], tdp_watts: float | None = None) -> float:
    """Seconds between counter reads so that no wrap is missed.

    ``POLL_SAFETY_FRACTION`` (1/4) of the time the fastest-wrapping counter takes to wrap at
    ``tdp_watts``: ``max_range_uj / (tdp_watts x 1e6)`` s, clamped to [``POLL_MIN_S``,
    ``POLL_MAX_S``] = [0.01, 1.0] s. Zones without a known range do not constrain it; with none
    known the result is ``POLL_MAX_S``. At the floor a counter whose range lasts under 40 ms at
    TDP could still wrap twice between reads (no real RAPL counter is that small: 2^32 units).

    Args:
        zones: from :func:`discover`.
        tdp_watts: W, the device's TDP; None means ``DEFAULT_TDP_WATTS`` (150 W).

    Raises:
        ValueError: if ``tdp_watts`` is not a positive number.
    """
    if tdp_watts is None:
        tdp_watts = DEFAULT_TDP_WATTS
    if not tdp_watts > 0:
        raise ValueError(f"tdp_watts must be positive, got {tdp_watts!r}")
    ranges = [z.max_range_uj for z in zones if z.max_range_uj]
    if not ranges:
        return POLL_MAX_S
    wrap_s = min(ranges) / (tdp_watts * 1e6)
    return min(POLL_MAX_S, max(POLL_MIN_S, POLL_SAFETY_FRACTION * wrap_s))


class EnergyMeter:
    """Measure RAPL energy over a block of code, correcting counter wraparound.

    Usage::

        meter = EnergyMeter()
        with meter:
            run()
        reading = meter.reading   # EnergyReading, available or with its reason

    Args:
        root: powercap directory (tests point it at a fake tree).
        sample_s: s, how often a background thread reads the counters (wraparound safety); None
            derives it with :func:`polling_interval_s` from the zones' ranges and ``tdp_watts``.
        tdp_watts: W, the device config's TDP (None: ``DEFAULT_TDP_WATTS``); used only to derive
            ``sample_s``.

    Raises:
        ValueError: from :func:`polling_interval_s` when ``tdp_watts`` is not positive.
    """

    def __init__(self, root: str | Path = POWERCAP_ROOT, sample_s: float | None = None,
                 tdp_watts: float | None = None):
        self.zones, self.reason = discover(root)
        self.sample_s = sample_s if sample_s is not None else polling_interval_s(self.zones, tdp_watts)
        self.reading = EnergyReading(available=False, reason=self.reason or "not measured yet")
        self._last: dict[Path, int] = {}
        self._total: dict[Path, int] = {}
        self._broken: dict[Path, str] = {}  # zones whose interval energy is unknown -> reason
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
                if delta < 0:
                    if z.max_range_uj is None:
                        self._broken.setdefault(
                            z.path, f"{z.path.name} ({z.name}) counter went backwards, {z.note}")
                    else:  # wrapped: + max alone, at most one energy unit (~61 µJ) short (module docstring)
                        delta += z.max_range_uj
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
        self._broken = {}
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
        unavailable: dict[str, str] = {}
        for z in self.zones:
            if z.path in self._broken:
                unavailable[z.domain] = "; ".join(filter(None, [unavailable.get(z.domain), self._broken[z.path]]))
            else:
                joules[z.domain] = joules.get(z.domain, 0.0) + self._total[z.path] / 1e6
        for d in unavailable:  # a partial sum (e.g. one package of two) would be wrong, not just low
            joules.pop(d, None)
        watts = {d: j / seconds for d, j in joules.items()} if seconds > 0 else {}
        notes = {z.path.name: z.note for z in self.zones if z.note}
        self.reading = EnergyReading(available=True, seconds=seconds, joules=joules, watts=watts, wraps=self._wraps,
                                     notes=notes, unavailable=unavailable)


def measure_idle(seconds: float = 2.0, root: str | Path = POWERCAP_ROOT,
                 tdp_watts: float | None = None) -> EnergyReading:
    """Package power with nothing running over ``seconds`` s, for the idle baseline (unavailable
    readings pass through). ``tdp_watts`` (W) sets the polling interval (:func:`polling_interval_s`).

    Raises:
        ValueError: when ``tdp_watts`` is not positive.
    """
    meter = EnergyMeter(root, tdp_watts=tdp_watts)
    with meter:
        time.sleep(seconds)
    return meter.reading


def above_idle(run: EnergyReading, idle: EnergyReading) -> dict:
    """Package joules (J) of ``run`` minus the idle baseline (W x s) over the same duration (a record's
    energy fields); no ``package_joules_above_idle`` when either package energy is unavailable."""
    if not run.available:
        return run.as_dict()
    out = run.as_dict()
    if idle.available and idle.seconds > 0 and "package" in idle.watts and "package" in run.joules:
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
