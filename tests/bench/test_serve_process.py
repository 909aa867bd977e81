"""The server child process of ``bench-serve --model``: started on a free loopback port, always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from fastvlm.bench.serve_process import ServerStartError, local_server, rss_reader, serve_command, stop_process
from tests.conftest import fixture_path


def test_resident_memory_is_read_with_psutil_or_from_proc(monkeypatch):
    with_psutil = rss_reader(os.getpid())()
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if psutil were not installed
    from_proc = rss_reader(os.getpid())()
    assert with_psutil is not None and from_proc is not None
    assert from_proc == pytest.approx(with_psutil, rel=0.2)
    assert rss_reader(2**22 + 12345)() is None  # no such process


def test_the_server_command_binds_to_loopback_only():
    command = serve_command("model-dir", 8123, ["--max-batch-size", "16"])
    assert command[:4] == [sys.executable, "-m", "fastvlm.cli", "serve"]
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "8123"
    assert command[-2:] == ["--max-batch-size", "16"]


def test_a_process_that_ignores_sigint_is_still_stopped():
    ignore_sigint = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True)"
    process = subprocess.Popen([sys.executable, "-c", ignore_sigint + "; time.sleep(60)"], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"up\n"
    stop_process(process, grace_s=0.5)
    assert process.returncode == -signal.SIGTERM


def test_local_server_serves_the_model_and_is_stopped_after(tmp_path):
    with local_server(fixture_path("apple_fastvlm_tiny"), log_path=tmp_path / "server.log") as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        models = httpx.get(server.base_url + "/v1/models", trust_env=False).json()
        assert models["data"][0]["id"] == "apple_fastvlm_tiny"
        assert rss_reader(server.pid)() > 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base_url + "/health", trust_env=False)
    assert rss_reader(server.pid)() is None  # the process is gone (and reaped)


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    with (
        pytest.raises(ServerStartError, match="exited with status 2(.|\n)*no-such-model"),
        local_server(tmp_path / "no-such-model", log_path=tmp_path / "server.log"),
    ):
        pass
