"""A ``fastvlm serve`` process for the load test: started on a free 127.0.0.1 port, always stopped.

The server runs as a child process, not in the load generator's process, so that its
memory (read from its PID) and its CPU time are its own, and a crash in it shows as
failed requests rather than a dead benchmark. Its output goes to a log file, whose tail
is shown if it does not come up.

Resident memory of any process is read with psutil when it is installed, else from
``/proc/<pid>/status`` (Linux); elsewhere it is unknown (None).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from fastvlm.errors import FastVLMError

HEALTH_POLL_S = 0.5
STOP_GRACE_S = 20.0  # after SIGINT (uvicorn's graceful shutdown), before SIGTERM and then SIGKILL
LOG_TAIL_CHARS = 2000
MIB = 2**20


class ServerStartError(FastVLMError):
    """The server did not come up: it exited, or /health did not answer 200 in time."""


@dataclass(frozen=True)
class ServerProcess:
    base_url: str
    pid: int
    log_path: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_command(model: str | Path, port: int, serve_args: Sequence[str] = ()) -> list[str]:
    """The command line of ``fastvlm serve`` on 127.0.0.1:``port``, run by this Python."""
    return [
        sys.executable,
        "-m",
        "fastvlm.cli",
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *serve_args,
    ]


@contextlib.contextmanager
def local_server(
    model: str | Path, *, log_path: Path, serve_args: Sequence[str] = (), startup_timeout_s: float = 600.0
) -> Iterator[ServerProcess]:
    """Run ``fastvlm serve --model model`` until the block ends; yields once /health answers 200."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(serve_command(model, port, serve_args), stdout=log, stderr=subprocess.STDOUT)
        try:
            server = ServerProcess(base_url=f"http://127.0.0.1:{port}", pid=process.pid, log_path=log_path)
            wait_until_healthy(server, process, timeout_s=startup_timeout_s)
            yield server
        finally:
            stop_process(process)


def wait_until_healthy(server: ServerProcess, process: subprocess.Popen, *, timeout_s: float) -> None:
    """Poll GET /health until 200; a ServerStartError with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=HEALTH_POLL_S * 4, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(
                    f"fastvlm serve exited with status {process.returncode}; its log ends:\n{_log_tail(server)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(server.base_url + "/health").status_code == 200:
                    return
            time.sleep(HEALTH_POLL_S)
    raise ServerStartError(f"fastvlm serve was not healthy after {timeout_s:g} s; its log ends:\n{_log_tail(server)}")


def _log_tail(server: ServerProcess) -> str:
    try:
        return server.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return "(no log)"


def stop_process(process: subprocess.Popen, *, grace_s: float = STOP_GRACE_S) -> None:
    """Ask politely (SIGINT), then firmly (SIGTERM), then kill, ``grace_s`` apart; returns once the process is gone."""
    for stop in (lambda: process.send_signal(signal.SIGINT), process.terminate, process.kill):
        if process.poll() is not None:
            return
        stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    process.wait()


def rss_reader(pid: int) -> Callable[[], float | None]:
    """A function giving process ``pid``'s resident memory in MiB now (None once unreadable)."""
    try:
        import psutil
    except ImportError:
        return lambda: _proc_status_rss_mib(pid)
    try:
        process = psutil.Process(pid)
    except psutil.Error:  # no such process (any more)
        return lambda: None

    def read() -> float | None:
        try:
            return float(process.memory_info().rss) / MIB
        except psutil.Error:
            return None

    return read


def _proc_status_rss_mib(pid: int) -> float | None:
    """VmRSS from /proc/<pid>/status (in kB there)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MIB
    except (OSError, ValueError, IndexError):
        pass
    return None
