"""``fastvlm serve``: flags become ServeOptions, mistakes are one line, and the real command serves."""

from __future__ import annotations

import signal
import subprocess

import httpx
import pytest

from fastvlm.bench.serve_process import ServerProcess, free_port, serve_command, wait_until_healthy
from fastvlm.cli import build_parser, main
from fastvlm.cli.serve import serve_options
from fastvlm.errors import UsageError
from tests.conftest import fixture_path


def _args(*flags: str):
    return build_parser().parse_args(["serve", "--model", "some/model", *flags])


def test_the_defaults_are_the_safe_ones():
    options = serve_options(_args(), "/models/FastVLM-0.5B")
    assert options.host == "127.0.0.1" and options.api_key is None
    assert options.model_name == "model"  # from what the user typed, not the resolved cache folder
    media = options.media
    assert not media.allow_remote_media and media.allowed_local_media_path is None
    assert media.limit_images_per_prompt == 1 and media.max_pixels is not None


def test_flags_map_onto_the_options(tmp_path):
    options = serve_options(
        _args(
            "--served-model-name",
            "fastvlm",
            "--api-key",
            "k",
            "--max-batch-size",
            "4",
            "--max-queue",
            "9",
            "--request-timeout",
            "30",
            "--allow-remote-media",
            "--allowed-media-domains",
            "a.com, b.org",
            "--allowed-local-media-path",
            str(tmp_path),
            "--limit-images-per-prompt",
            "2",
            "--allow-large-images",
        ),
        "/models/x",
    )
    assert (options.model_name, options.api_key, options.max_batch_size, options.max_queue) == ("fastvlm", "k", 4, 9)
    assert options.request_timeout_s == 30 and options.media.allowed_media_domains == {"a.com", "b.org"}
    assert options.media.allowed_local_media_path == tmp_path and options.media.max_pixels is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--allowed-media-domains", "a.com"], "needs --allow-remote-media"),
        (["--allow-remote-media"], "needs --allowed-media-domains"),
        (["--allowed-local-media-path", "/no/such/folder"], "is not a folder"),
    ],
)
def test_inconsistent_media_flags_are_usage_errors(flags, message):
    with pytest.raises(UsageError, match=message):
        serve_options(_args(*flags), "/models/x")


def test_a_missing_checkpoint_is_one_line_before_anything_starts(capsys):
    assert main(["serve", "--model", "/no/such/checkpoint"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint folder not found" in err[0]


def test_the_command_serves_the_fixture_model_and_stops_on_sigint(tmp_path):
    port = free_port()
    command = serve_command(fixture_path("hf_fastvlm_tiny"), port, ["--log-level", "warning"])
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(base_url=f"http://127.0.0.1:{port}", pid=process.pid, log_path=log_path)
    try:
        wait_until_healthy(server, process, timeout_s=120)
        models = httpx.get(f"{server.base_url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["hf_fastvlm_tiny"]
        answer = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) in (0, 130)
