"""Measurement helpers shared by the benchmarks: latency, FLOPs and peak memory.

Latency is the median of repeated calls after warm-up (GPU work is synchronised).
FLOPs come from torch's FLOP counter on the ``meta`` device, so counting costs no
compute. Peak memory is what one call adds on top of what is resident before it: on
CUDA from the caching allocator's counters, on CPU from the process's resident set
sampled every millisecond (after handing freed heap memory back to the OS, so earlier
calls do not hide the peak).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_latency_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 1, repeats: int = 5
) -> dict[str, float]:
    """Median wall time in ms of each ``fns[name]()`` over ``repeats`` calls after ``warmup`` calls.

    The variants run interleaved (a, b, a, b, ...) so that drift of a shared or
    throttling machine affects all of them alike, which keeps their ratios honest.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply and add counted separately) of the matmuls/convs/attention in ``fn()``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def _rss_bytes() -> int | None:
    """Resident set size of this process (Linux), or None where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _release_free_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call of ``fn()`` needs above what is resident before it, in MiB (None if unknown)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type != "cpu" or _rss_bytes() is None:
        return None
    _release_free_heap()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss_bytes())
    return (peak - base) / 2**20


def write_rows_json(rows: list, path: str | Path, meta: dict) -> None:
    """Benchmark rows (dataclasses) and a machine description as one JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n")


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table; a column named with a leading '>' is right-aligned (the '>' is dropped)."""
    names = [c.lstrip(">") for c in columns]
    rule = ["---:" if c.startswith(">") else "---" for c in columns]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [names, rule, *rows])


def mib(value: float | None) -> str:
    """A memory figure for a table ('n/a' when it could not be measured)."""
    return "n/a" if value is None else f"{value:,.0f}"
