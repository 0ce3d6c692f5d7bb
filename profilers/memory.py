"""Memory of a run: peak resident set size, model bytes and KV-cache bytes.

Peak RSS comes from the one reader, :mod:`edgerun.procmem`: :class:`PeakRSS` resets the kernel's
high water mark (``VmHWM``) when the measured block starts and reads it when the block ends (on
systems that do not allow the reset, a thread samples the RSS every 5 ms instead). RSS includes the
file-backed pages of a memory-mapped model that have been touched, which is what the model really
occupies. Model and KV-cache bytes come from the backend (:meth:`edgerun.backends.base.Backend.memory`).
"""

from __future__ import annotations

from edgerun.procmem import PeakRSS, peak_rss_bytes, rss_bytes

__all__ = ["PeakRSS", "peak_rss_bytes", "rss_bytes"]
