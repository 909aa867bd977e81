"""``fastvlm.allocator``: freed tensor memory stays in the process, so the next tensor does not fault its pages in.

Measured in child processes (the setting is process-wide): page faults while three 16 MiB
tensors are made, filled, held together (as a block's activations are) and freed, again and again.
With glibc's default thresholds (128 KiB each) every one of them is mapped fresh and unmapped when
freed, so each round faults every page in again. glibc raises those defaults as a process frees
mapped blocks, depending on what it freed before (an import can be enough) and on where small
blocks landed on the heap, so both children first fix them at their documented values with
``mallopt`` instead of leaving them to that history (left alone, the defaults faulted in some runs
and not in others); the tuned child then sets ours over them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fastvlm import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
REPO = Path(__file__).resolve().parents[1]

FAULTS = """
import resource, sys, torch
from fastvlm.allocator import keep_freed_memory
import ctypes
mallopt = ctypes.CDLL(None).mallopt  # first glibc's documented thresholds, fixed (this turns off their raising)
assert mallopt(-3, 128 * 1024) == 1 and mallopt(-1, 128 * 1024) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
tuned = sys.argv[1] == "tuned" and keep_freed_memory()  # then ours over them
def three():
    return [torch.ones(4 * 2**20) for _ in range(3)]  # 16 MiB each, written once
for _ in range(3):  # warm: the first allocations fault in any case
    three()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    three()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_tensor(mode: str) -> tuple[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    tuned, faults = result.stdout.split()
    return tuned, float(faults)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_freed_tensors_are_reused_without_faulting_their_pages_in_again() -> None:
    pages = 3 * 16 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    tuned, tuned_faults = _faults_per_tensor("tuned")
    default, default_faults = _faults_per_tensor("default")
    assert (tuned, default) == ("True", "False")
    assert default_faults > pages / 2  # glibc's default thresholds: a fault per page, each round
    assert tuned_faults < pages / 50


def test_the_fastvlm_command_keeps_freed_memory_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("set") or True)
    monkeypatch.setenv(allocator.DISABLE_ENV, "0")
    assert allocator.keep_freed_memory_unless_disabled() is False and calls == []
    monkeypatch.delenv(allocator.DISABLE_ENV)
    assert allocator.keep_freed_memory_unless_disabled() is True and calls == ["set"]


def test_the_program_entry_point_sets_it_and_main_alone_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastvlm.cli

    assert 'fastvlm = "fastvlm.cli:run"' in (REPO / "pyproject.toml").read_text()
    calls: list[str] = []
    monkeypatch.setattr(fastvlm.cli, "keep_freed_memory_unless_disabled", lambda: calls.append("set") or True)
    monkeypatch.setattr(sys, "argv", ["fastvlm", "info", "--help"])
    with pytest.raises(SystemExit):
        fastvlm.cli.main(["info", "--help"])  # what tests and embedding programs call
    assert calls == []
    with pytest.raises(SystemExit):
        fastvlm.cli.run()
    assert calls == ["set"]
