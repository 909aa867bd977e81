"""``fastvlm serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn), ours or vLLM's.

The checkpoint is found (or downloaded) before the server starts, so a wrong path is
one line on stderr; the weights then load in the background while ``/health`` answers
503. Every media-safety and capacity limit of :class:`~fastvlm.serve.options.ServeOptions`
is a flag here, with the safe value as default.

``--engine vllm`` starts vLLM's OpenAI server with FastVLM's plugin instead
(:mod:`fastvlm.integrations.vllm.server`): the flags both servers understand are mapped
onto vLLM's, flags only ours has are refused unless left at their defaults, and anything
after ``--`` goes to vLLM as it is. Flags whose default differs between the engines
(device, dtype, batch size, tokens per step) default to None here, so that an unset one
leaves vLLM its own default.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastvlm.cli.common import Subparsers, add_model_loading_arguments, check_device
from fastvlm.dtypes import AUTO
from fastvlm.errors import UsageError
from fastvlm.processing import DEFAULT_MAX_PIXELS
from fastvlm.serve.media import MediaPolicy
from fastvlm.serve.options import ServeOptions

if TYPE_CHECKING:
    from fastvlm.integrations.vllm.server import VLLMServerSettings

API_KEY_ENV = "FASTVLM_API_KEY"
MIB = 2**20
ENGINES = ("fastvlm", "vllm")
# Every limit's default is the one ServeOptions and MediaPolicy define (one place for each).
SERVE_DEFAULTS = ServeOptions(model="")
# Flags of our server that vLLM's has no counterpart for: (flag, dest, default). --engine vllm
# refuses them unless they are left at their defaults.
FASTVLM_ONLY_FLAGS = (
    ("--device", "device", None),
    ("--image-mode", "image_mode", None),
    ("--allow-large-images", "allow_large_images", False),
    ("--max-queue", "max_queue", SERVE_DEFAULTS.max_queue),
    ("--max-active-tokens", "max_active_tokens", None),
    ("--request-timeout", "request_timeout", SERVE_DEFAULTS.request_timeout_s),
    ("--max-request-bytes", "max_request_bytes", SERVE_DEFAULTS.max_body_bytes),
    ("--feature-cache-entries", "feature_cache_entries", SERVE_DEFAULTS.feature_cache_entries),
    ("--feature-cache-mb", "feature_cache_mb", SERVE_DEFAULTS.feature_cache_bytes // MIB),
    ("--max-image-bytes", "max_image_bytes", SERVE_DEFAULTS.media.max_image_bytes),
)
VLLM_ONLY_FLAGS = (("--max-model-len", "max_model_len"), ("--tensor-parallel-size", "tensor_parallel_size"))


def register(subparsers: Subparsers) -> None:
    serve, media = SERVE_DEFAULTS, SERVE_DEFAULTS.media
    p = subparsers.add_parser("serve", help="an OpenAI-compatible server (chat completions, page, metrics)")
    add_model_loading_arguments(p, auto_dtype=True)
    # None: the engine's own default (ours: cpu, fp32; vLLM chooses its device and dtype itself).
    p.set_defaults(device=None, dtype=None)
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="fastvlm",
        help="fastvlm: this package's server (default); vllm: vLLM's OpenAI server with FastVLM's plugin "
        "(vLLM installed in this environment; its extra flags after --)",
    )
    p.add_argument("--host", default=serve.host, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=serve.port)
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV})")
    group = p.add_argument_group("capacity")
    group.add_argument(
        "--max-batch-size",
        type=int,
        help=f"sequences decoded together (default: {serve.max_batch_size}; vLLM: its --max-num-seqs)",
    )
    group.add_argument("--max-queue", type=int, default=serve.max_queue, help="requests waiting; beyond it: 429")
    group.add_argument("--max-active-tokens", type=int, help="prompt+answer budget of admitted requests")
    group.add_argument(
        "--max-prefill-tokens",
        type=int,
        help=f"prompt tokens admitted per step (default: {serve.max_prefill_tokens}; vLLM: --max-num-batched-tokens)",
    )
    group.add_argument(
        "--request-timeout", type=float, default=serve.request_timeout_s, help="seconds per request; then 504"
    )
    group.add_argument("--max-request-bytes", type=int, default=serve.max_body_bytes, help="request body limit (413)")
    group.add_argument(
        "--feature-cache-entries", type=int, default=serve.feature_cache_entries, help="images whose features are kept"
    )
    group.add_argument(
        "--feature-cache-mb", type=int, default=serve.feature_cache_bytes // MIB, help="memory for kept image features"
    )
    group = p.add_argument_group("media safety")
    group.add_argument("--limit-images-per-prompt", type=int, default=media.limit_images_per_prompt)
    group.add_argument(
        "--max-image-bytes", type=int, default=media.max_image_bytes, help="encoded size limit per image (413)"
    )
    group.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (off by default)")
    group.add_argument("--allowed-media-domains", default="", help="comma-separated hosts remote images may come from")
    group.add_argument("--allowed-local-media-path", help="serve file:// image URLs from inside this folder only")
    group.add_argument(
        "--media-fetch-timeout", type=float, default=media.fetch_timeout_s, help="seconds per remote image"
    )
    group = p.add_argument_group("vLLM engine (--engine vllm)")
    group.add_argument("--max-model-len", type=int, help="context length in tokens, prompt + answer (default: model's)")
    group.add_argument("--tensor-parallel-size", type=int, help="GPUs the model is split over")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "engine_args", nargs="*", metavar="-- VLLM_ARGS", help="with --engine vllm: vLLM server flags, passed as given"
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from fastvlm.files import resolve_checkpoint

    _check_engine_flags(args)
    if args.engine == "fastvlm":
        check_device(args.device or SERVE_DEFAULTS.device)
    folder = resolve_checkpoint(args.model)  # a wrong path fails here, before the server starts
    options = serve_options(args, str(folder))
    _warn_if_open(options)
    if args.engine == "vllm":
        from fastvlm.integrations.vllm.server import launch_vllm_server

        launch_vllm_server(vllm_settings(args, options))  # replaces this process
        return
    _run_fastvlm_server(args, options)


def _run_fastvlm_server(args: argparse.Namespace, options: ServeOptions) -> None:
    import uvicorn

    from fastvlm.serve.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(options), host=options.host, port=options.port, log_level=args.log_level)


def _warn_if_open(options: ServeOptions) -> None:
    if options.api_key is None and not _is_loopback(options.host):
        print(
            f"warning: serving on {options.host} without an API key; anyone who can reach it can use it",
            file=sys.stderr,
        )


def _check_engine_flags(args: argparse.Namespace) -> None:
    """A UsageError for a flag the chosen engine has no use for (rather than ignoring it silently)."""
    if args.engine == "vllm":
        if args.dtype == AUTO:
            raise UsageError(
                "--dtype auto (each stage's precision measured on this machine) is fastvlm's own server's; "
                "with --engine vllm name fp32, bf16 or fp16, or leave --dtype out for vLLM's choice"
            )
        given = [flag for flag, dest, default in FASTVLM_ONLY_FLAGS if getattr(args, dest) != default]
        if given:
            raise UsageError(
                f"{', '.join(given)}: only fastvlm's own server has {'these' if len(given) > 1 else 'this'}; "
                "leave them out with --engine vllm (vLLM's own flags go after --)"
            )
        return
    given = [flag for flag, dest in VLLM_ONLY_FLAGS if getattr(args, dest) is not None]
    if args.engine_args:
        given.append(f"the arguments {' '.join(args.engine_args)!r}")
    if given:
        raise UsageError(f"{', '.join(given)}: only with --engine vllm")


def vllm_settings(args: argparse.Namespace, options: ServeOptions) -> VLLMServerSettings:
    """vLLM's server settings for the flags (``options``: what they mean for our server, checked)."""
    from fastvlm.integrations.vllm.server import VLLMServerSettings

    media = options.media
    return VLLMServerSettings(
        model=options.model,
        host=options.host,
        port=options.port,
        served_model_name=options.model_name,  # the same id as our server lists
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_batch_size,
        max_num_batched_tokens=args.max_prefill_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        images_per_prompt=media.limit_images_per_prompt,
        allowed_local_media_path=str(media.allowed_local_media_path) if media.allowed_local_media_path else None,
        allowed_media_domains=tuple(sorted(media.allowed_media_domains)),
        media_fetch_timeout_s=media.fetch_timeout_s,
        api_key=options.api_key,
        log_level=args.log_level,
        extra_args=tuple(args.engine_args),
    )


def serve_options(args: argparse.Namespace, folder: str) -> ServeOptions:
    """The :class:`ServeOptions` the flags describe (``folder``: the resolved checkpoint)."""
    domains = frozenset(d.strip() for d in args.allowed_media_domains.split(",") if d.strip())
    if domains and not args.allow_remote_media:
        raise UsageError("--allowed-media-domains needs --allow-remote-media")
    if args.allow_remote_media and not domains:
        raise UsageError("--allow-remote-media needs --allowed-media-domains (the hosts images may come from)")
    local = args.allowed_local_media_path
    if local is not None and not Path(local).is_dir():
        raise UsageError(f"--allowed-local-media-path {local} is not a folder")
    policy = MediaPolicy(
        max_image_bytes=args.max_image_bytes,
        max_pixels=None if args.allow_large_images else DEFAULT_MAX_PIXELS,
        allow_remote_media=args.allow_remote_media,
        allowed_media_domains=domains,
        allowed_local_media_path=Path(local) if local else None,
        fetch_timeout_s=args.media_fetch_timeout,
        limit_images_per_prompt=args.limit_images_per_prompt,
    )
    return ServeOptions(
        model=folder,
        served_model_name=args.served_model_name or Path(args.model.rstrip("/")).name,
        host=args.host,
        port=args.port,
        device=args.device or SERVE_DEFAULTS.device,
        dtype=args.dtype or SERVE_DEFAULTS.dtype,
        image_mode=args.image_mode,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_size=_given(args.max_batch_size, SERVE_DEFAULTS.max_batch_size),
        max_queue=args.max_queue,
        max_active_tokens=args.max_active_tokens,
        max_prefill_tokens=_given(args.max_prefill_tokens, SERVE_DEFAULTS.max_prefill_tokens),
        request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_request_bytes,
        feature_cache_entries=args.feature_cache_entries,
        feature_cache_bytes=args.feature_cache_mb * MIB,
        media=policy,
    )


def _given(value: int | None, default: int) -> int:
    """A flag's value, or our server's default when it was not given (None)."""
    return default if value is None else value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
