"""``fastvlm serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

The checkpoint is found (or downloaded) before the server starts, so a wrong path is
one line on stderr; the weights then load in the background while ``/health`` answers
503. Every media-safety and capacity limit of :class:`~fastvlm.serve.options.ServeOptions`
is a flag here, with the safe value as default.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from fastvlm.cli.common import Subparsers, add_model_loading_arguments, check_device
from fastvlm.errors import UsageError
from fastvlm.processing import DEFAULT_MAX_PIXELS
from fastvlm.serve.media import MediaPolicy
from fastvlm.serve.options import ServeOptions

API_KEY_ENV = "FASTVLM_API_KEY"
MIB = 2**20
# Every limit's default is the one ServeOptions and MediaPolicy define (one place for each).
SERVE_DEFAULTS = ServeOptions(model="")


def register(subparsers: Subparsers) -> None:
    serve, media = SERVE_DEFAULTS, SERVE_DEFAULTS.media
    p = subparsers.add_parser("serve", help="an OpenAI-compatible server (chat completions, page, metrics)")
    add_model_loading_arguments(p)
    p.add_argument("--host", default=serve.host, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=serve.port)
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV})")
    group = p.add_argument_group("capacity")
    group.add_argument("--max-batch-size", type=int, default=serve.max_batch_size, help="sequences decoded together")
    group.add_argument("--max-queue", type=int, default=serve.max_queue, help="requests waiting; beyond it: 429")
    group.add_argument("--max-active-tokens", type=int, help="prompt+answer budget of admitted requests")
    group.add_argument(
        "--max-prefill-tokens", type=int, default=serve.max_prefill_tokens, help="prompt tokens admitted per step"
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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from fastvlm.files import resolve_checkpoint
    from fastvlm.serve.app import create_app

    check_device(args.device)
    folder = resolve_checkpoint(args.model)  # a wrong path fails here, before the server starts
    options = serve_options(args, str(folder))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if options.api_key is None and not _is_loopback(options.host):
        print(
            f"warning: serving on {options.host} without an API key; anyone who can reach it can use it",
            file=sys.stderr,
        )
    uvicorn.run(create_app(options), host=options.host, port=options.port, log_level=args.log_level)


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
        device=args.device,
        dtype=args.dtype,
        image_mode=args.image_mode,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_active_tokens=args.max_active_tokens,
        max_prefill_tokens=args.max_prefill_tokens,
        request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_request_bytes,
        feature_cache_entries=args.feature_cache_entries,
        feature_cache_bytes=args.feature_cache_mb * MIB,
        media=policy,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
