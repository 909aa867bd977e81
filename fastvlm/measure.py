"""Measurement and reporting helpers shared by the benchmarks, evaluation and the CLI.

A small utility layer below ``bench/`` and ``eval/``: both use the same markdown tables,
and every benchmark times, counts and describes its machine the same way, so these
live here rather than in either package (evaluation must not import the benchmarks).

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
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

MIB = 2**20  # bytes in a MiB
PEAK_SAMPLE_INTERVAL_S = 0.001  # how often the CPU peak-memory sampler reads the resident set


def synchronize(device: torch.device) -> None:
    """Wait for the queued GPU work on ``device`` (no-op on CPU), so wall times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_latency_ms(
    fns: Mapping[str, Callable[[], object]], device: torch.device, *, warmup: int = 1, repeats: int = 5
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
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    if device.type != "cpu" or _rss_bytes() is None:
        return None
    _release_free_heap()
    base = peak = _rss_bytes() or 0  # readable: checked above
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes() or 0)
            time.sleep(PEAK_SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss_bytes() or 0)
    return (peak - base) / MIB


def write_rows_json(rows: Sequence[Any], path: str | Path, meta: dict) -> None:
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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    """What a benchmark ran on: torch version, CPU model and threads, Python, and the GPU if any."""
    info = {
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(meta: dict) -> str:
    """'CPU, N threads, torch V[, GPU]' for benchmark headers (``meta`` from :func:`machine_description`)."""
    gpu = f", {meta['gpu']}" if "gpu" in meta else ""
    return f"{meta['cpu']}, {meta['cpu_threads']} threads, torch {meta['torch']}{gpu}"
