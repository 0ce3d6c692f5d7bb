"""This machine's device config with measurements: RAPL domains and memory bandwidth (``edgerun device detect``).

The config format and the runtime's reading of it are :mod:`edgerun.device`; this module adds what
must be measured. Memory bandwidth is a streaming read (:func:`measure_bandwidth`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from edgerun.backends.base import physical_cores
from edgerun.device import DeviceConfig, this_machine
from profilers.power import discover


def measure_bandwidth(gib: float = 1.0, repeats: int = 5, threads: int | None = None) -> float:
    """Memory read bandwidth in GB/s: the best of ``repeats`` multi-threaded sums over a ``gib`` GiB buffer.

    A sum streams every byte once from DRAM (the buffer is far larger than the caches), which is
    what a memory-bound decode step does with the weights.
    """
    torch.set_num_threads(threads or physical_cores())
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(buf.sum())
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def detect(measure: bool = True) -> DeviceConfig:
    """Describe this machine: CPU, cores, RAM, readable RAPL domains, and (if ``measure``) memory bandwidth.

    The memory budget is 75% of RAM; TDP and idle watts cannot be read from software and stay empty.
    """
    base = this_machine()
    zones, reason = discover()
    notes = [base.notes]
    if reason:
        notes.append(f"RAPL: {reason}")
    bw = None
    if measure:
        bw = round(measure_bandwidth(), 1)
        notes.append("memory_bandwidth_gbps measured by a streaming read (profilers.device.measure_bandwidth)")
    return replace(base, rapl_domains=sorted({z.domain for z in zones}), memory_bandwidth_gbps=bw,
                   notes="; ".join(notes))
