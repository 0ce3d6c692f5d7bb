"""Memory of a run: peak resident set size (sampled), model bytes and KV-cache bytes.

Peak RSS is sampled by a background thread (default every 5 ms) while the measured block runs, plus
once at its start and end; RSS includes the file-backed pages of a memory-mapped model that have
been touched, which is what the model really occupies. Model and KV-cache bytes come from the
backend (:meth:`edgerun.backends.base.Backend.memory`).
"""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """Context manager sampling this process's RSS; ``peak_bytes`` and ``start_bytes`` after exit.

    Args:
        interval_s: sampling period in seconds.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.start_bytes = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self.start_bytes = self.peak_bytes = self._proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
