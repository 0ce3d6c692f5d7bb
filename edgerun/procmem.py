"""This process's memory: current and peak resident set size (RSS), read from the kernel.

The one reader of peak RSS in edgerun, the converters and the profilers.

- :func:`peak_rss_bytes` reads ``VmHWM`` ("high water mark") from ``/proc/self/status``, Linux's
  peak RSS of the current address space. It starts afresh at ``exec``, so a CLI run reports its own
  peak, not its parent's.
- Fallback where ``/proc`` is missing (macOS, other Unixes): ``getrusage(RUSAGE_SELF).ru_maxrss``
  (kilobytes on Linux, bytes on macOS). It survives ``fork`` and ``exec``, so a child can report a
  larger parent's peak, and it cannot be reset.
- :class:`PeakRSS` measures the peak over a block of code: it resets the high water mark at entry
  (writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0, see ``proc(5)``) and reads ``VmHWM`` at
  exit, so every page the block touched counts, however briefly. Fallback where the reset is not
  allowed: a background thread samples the current RSS every ``interval_s`` (a short-lived spike
  between two samples is missed).

- :func:`release_free_memory` hands memory freed by Python and torch back to the kernel (glibc's
  ``malloc_trim``). Without it a process that closes one model and opens another keeps the freed
  heap: a 90-turn adaptive-expert soak (a model rebuilt on 33 task switches) grew 139 MiB; with a
  trim after each close it stayed flat (docs/reliability.md).

Resetting the high water mark is process-wide: after a :class:`PeakRSS` block, :func:`peak_rss_bytes`
reports the peak since that block began. Nested blocks are handled (an outer block keeps the peak
an inner block's reset would have erased).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import threading
from pathlib import Path

STATUS = Path("/proc/self/status")
_LIBC = None
CLEAR_REFS = Path("/proc/self/clear_refs")
_lock = threading.Lock()
_open_blocks: list["PeakRSS"] = []


def _status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or None where there is no such file or field."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (bytes): ``VmHWM``, else ``ru_maxrss`` (see the module doc)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def rss_bytes() -> int:
    """Current resident memory of this process (bytes): ``VmRSS``, else psutil's ``memory_info().rss``."""
    rss = _status_bytes("VmRSS")
    if rss is not None:
        return rss
    import psutil  # only where /proc is missing

    return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Reset this process's high water mark to its current RSS; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


class PeakRSS:
    """Context manager: the peak RSS of this process while the block runs.

    After exit, ``peak_bytes`` is the peak (bytes) and ``start_bytes`` the RSS at entry (bytes);
    ``sampled`` says whether the fallback sampler measured it (see the module doc).

    Args:
        interval_s: sampling period of the fallback sampler (seconds).
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.start_bytes = 0
        self.sampled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        with _lock:
            hwm = _status_bytes("VmHWM")
            for outer in _open_blocks:          # the reset below erases their peak so far: keep it
                if not outer.sampled and hwm is not None:
                    outer.peak_bytes = max(outer.peak_bytes, hwm)
            self.start_bytes = self.peak_bytes = rss_bytes()
            self.sampled = not reset_peak()
            _open_blocks.append(self)
        if self.sampled:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        with _lock:
            _open_blocks.remove(self)
            now = rss_bytes() if self.sampled else peak_rss_bytes()
            self.peak_bytes = max(self.peak_bytes, now)


def release_free_memory() -> bool:
    """Collect Python's garbage, then return the C heap's free pages to the kernel.

    glibc keeps freed blocks for reuse (above its dynamic mmap threshold, even blocks of tens of MiB,
    such as a closed model's tensors), so the RSS of a process that swaps models keeps the high-water
    heap of every model it held. ``malloc_trim(0)`` releases the free parts (``malloc_trim(3)``). Call
    it after dropping a model (:meth:`edgerun.backends.torch.TorchBackend.close` does); it takes
    milliseconds.

    Returns:
        True when the C library has ``malloc_trim`` (glibc) and it ran; False elsewhere (macOS, musl),
        where the collection alone is done.
    """
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is None:
        return False
    trim(0)
    return True
