"""``fastvlm bench-serve``: the serving load test and soak (registered with the other bench commands).

The server is one this command starts (``--model``: ``fastvlm serve`` as a child process
on a free 127.0.0.1 port, stopped at the end; with ``--engine vllm``, ``fastvlm serve
--engine vllm``: vLLM's server) or one already running on this machine (``--url``). Levels
of concurrent clients run first, then the soak when ``--soak N`` is given; each writes
JSON and markdown to ``--out`` and prints the markdown. The machine's load averages before
and after each phase are recorded, since on a small machine a neighbour's work shows in
the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastvlm.cli.common import Subparsers
from fastvlm.errors import UsageError

if TYPE_CHECKING:
    from fastvlm.bench.serve_requests import Workload

DEFAULT_CLIENT_LEVELS = (1, 4, 16, 64)


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "bench-serve", help="load test and soak of a local OpenAI-compatible server (also benchmarks/serve_load.py)"
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a server already running on this machine: http://127.0.0.1:PORT")
    target.add_argument("--model", help="start `fastvlm serve --model MODEL` on a free 127.0.0.1 port for the run")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="with --model: pass ARG on to fastvlm serve (repeat it; write --serve-arg=--max-batch-size=16)",
    )
    p.add_argument(
        "--engine",
        choices=["fastvlm", "vllm"],
        help="with --model: the server fastvlm serve starts (default: fastvlm, ours; vllm: vLLM's, with the plugin)",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="with --engine vllm: pass ARG on to vLLM's server, after fastvlm serve's -- (--vllm-arg=--enforce-eager)",
    )
    p.add_argument("--server-pid", type=int, help="with --url: the server's PID, to sample its resident memory")
    p.add_argument("--api-key", help="sent as a bearer token")
    p.add_argument(
        "--clients",
        nargs="+",
        help="concurrent clients of each level, e.g. 1,4,16,64 (the default; with --soak, levels run only if given)",
    )
    p.add_argument(
        "--requests-per-client",
        nargs="+",
        default=["4"],
        help="requests each client sends: one count, or one per level (e.g. 3,2,2,1); default 4",
    )
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per level; no request starts after it")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may wait for a chunk")
    p.add_argument("--image-size", type=int, default=512, help="side of the generated images in px")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--shared-image-fraction", type=float, default=0.25, help="requests that reuse one image")
    p.add_argument(
        "--ignore-eos", action="store_true", help="ask for exactly --max-tokens tokens per answer (vLLM's ignore_eos)"
    )
    p.add_argument("--soak", type=int, metavar="N", help="the soak: N requests, a fifth of them invalid")
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--soak-invalid-fraction", type=float, default=0.2)
    p.add_argument(
        "--soak-warmup", type=int, default=0, metavar="N", help="valid requests sent before the soak, not counted"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/serve", help="folder for serve_load.{json,md}, serve_soak.{json,md}")
    p.set_defaults(func=cmd_bench_serve)


def _counts(values: list[str], flag: str) -> tuple[int, ...]:
    """``1,4 16`` (commas, spaces or both) as (1, 4, 16): positive whole numbers, at least one."""
    try:
        counts = tuple(int(v) for value in values for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} takes whole numbers such as 1,4,16,64, got {' '.join(values)!r}") from None
    if not counts or min(counts) < 1:
        raise UsageError(f"{flag} needs at least one count, each 1 or more")
    return counts


def _client_levels(values: list[str] | None, soak: int | None) -> tuple[int, ...]:
    """The levels of ``--clients``: the default ones, or none when only the soak was asked for."""
    if values is None:
        return () if soak else DEFAULT_CLIENT_LEVELS
    return _counts(values, "--clients")


def _check_serve_args(args: argparse.Namespace) -> None:
    counts = (args.image_size, args.max_tokens, args.soak_clients, args.soak or 1, args.soak_warmup + 1)
    if min(counts) < 1 or args.time_limit <= 0 or args.request_timeout <= 0:
        raise UsageError(
            "--image-size, --max-tokens, --soak, --soak-clients, --time-limit and --request-timeout must be positive "
            "(--soak-warmup 0 or more)"
        )
    if not 0 <= args.shared_image_fraction <= 1 or not 0 <= args.soak_invalid_fraction <= 1:
        raise UsageError("--shared-image-fraction and --soak-invalid-fraction must be between 0 and 1")
    if (args.serve_arg or args.engine) and not args.model:
        raise UsageError("--serve-arg and --engine apply to a server that bench-serve starts (--model), not to --url")
    if args.vllm_arg and args.engine != "vllm":
        raise UsageError("--vllm-arg applies to vLLM's server: add --engine vllm")


@contextlib.contextmanager
def _target_server(args: argparse.Namespace, out: Path) -> Iterator[tuple[str, int | None]]:
    """The server's base URL and PID (when known): the one at --url, or one started for the run."""
    from fastvlm.bench.serve_load import check_local_url
    from fastvlm.bench.serve_process import local_server

    if args.url:
        yield check_local_url(args.url), args.server_pid
        return
    engine = ["--engine", args.engine] if args.engine else []
    serve_args = [*engine, *args.serve_arg, *(["--", *args.vllm_arg] if args.vllm_arg else [])]
    print(f"starting {' '.join(['fastvlm', 'serve', '--model', args.model, *serve_args])} (log: {out / 'server.log'})")
    with local_server(args.model, log_path=out / "server.log", serve_args=serve_args) as server:
        yield server.base_url, server.pid


@dataclass
class _ServeRun:
    """What the load levels and the soak share: where the server is, what to send, where to write."""

    base_url: str
    workload: Workload
    rss: Callable[[], float | None] | None  # the server's resident MiB, when its PID is known
    meta: dict[str, Any]
    out: Path


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from fastvlm.bench.serve_load import served_model_id
    from fastvlm.bench.serve_process import rss_reader
    from fastvlm.bench.serve_requests import Workload
    from fastvlm.measure import machine_description

    levels = _client_levels(args.clients, args.soak)
    per_client = _counts(args.requests_per_client, "--requests-per-client")
    if len(per_client) not in (1, len(levels or (1,))):
        raise UsageError(f"--requests-per-client takes one count or one per level ({len(levels)} levels)")
    _check_serve_args(args)
    out = Path(args.out)
    with _target_server(args, out) as (base_url, pid):
        model_id = served_model_id(base_url, api_key=args.api_key)
        workload = Workload(
            image_size=args.image_size,
            max_tokens=args.max_tokens,
            shared_fraction=args.shared_image_fraction,
            model=model_id,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
        meta = machine_description() | {
            "server": base_url,
            "model": args.model or model_id,
            "engine": (args.engine or "fastvlm") if args.model else None,  # None: a server at --url
            "serve_args": args.serve_arg,
            "vllm_args": args.vllm_arg,
            "ignore_eos": args.ignore_eos,
            "image_size": args.image_size,
            "max_tokens": args.max_tokens,
            "shared_image_fraction": args.shared_image_fraction,
            "requests_per_client": per_client,
            "soak_clients": args.soak_clients,
        }
        run = _ServeRun(base_url=base_url, workload=workload, rss=rss_reader(pid) if pid else None, meta=meta, out=out)
        if levels:
            _run_levels(args, run, levels, per_client)
        if args.soak:
            _run_soak(args, run)


def _load_averages(meta: dict[str, Any], before: tuple[float, ...]) -> dict[str, Any]:
    """``meta`` with the machine's 1/5/15-minute load averages before and after a phase (others share the CPU)."""
    return meta | {"load_average_before": before, "load_average_after": os.getloadavg()}


def _run_levels(args: argparse.Namespace, run: _ServeRun, levels: tuple[int, ...], per_client: tuple[int, ...]) -> None:
    from fastvlm.bench.serve_load import LoadSettings, levels_payload, load_markdown, run_load_test, write_report

    settings = LoadSettings(
        levels=levels,
        requests_per_client=per_client,
        time_limit_s=args.time_limit,
        request_timeout_s=args.request_timeout,
    )
    before = os.getloadavg()
    results = asyncio.run(run_load_test(run.base_url, run.workload, settings, api_key=args.api_key, rss_mib=run.rss))
    meta = _load_averages(run.meta, before)
    markdown = load_markdown(results, meta)
    files = write_report("serve_load", run.out, levels_payload(results, meta), markdown)
    print(markdown)
    print("wrote " + ", ".join(str(f) for f in files))


def _run_soak(args: argparse.Namespace, run: _ServeRun) -> None:
    from fastvlm.bench.serve_load import write_report
    from fastvlm.bench.serve_soak import plan_soak, run_soak, soak_markdown

    print(f"preparing {args.soak} soak requests")
    plans = plan_soak(run.workload, args.soak, invalid_fraction=args.soak_invalid_fraction, seed=args.seed)
    warmup_failed = _soak_warmup(args, run) if args.soak_warmup else 0
    before = os.getloadavg()
    result = asyncio.run(
        run_soak(
            run.base_url,
            plans,
            clients=args.soak_clients,
            request_timeout_s=args.request_timeout,
            api_key=args.api_key,
            rss_mib=run.rss,
        )
    )
    meta = _load_averages(run.meta, before) | {"soak_warmup": args.soak_warmup, "soak_warmup_failed": warmup_failed}
    markdown = soak_markdown(result, meta)
    files = write_report("serve_soak", run.out, {"meta": meta, "soak": result.as_dict()}, markdown)
    print(markdown)
    print("wrote " + ", ".join(str(f) for f in files))


def _soak_warmup(args: argparse.Namespace, run: _ServeRun) -> int:
    """Send ``--soak-warmup`` valid requests (numbered after the soak's, so their images are new); how many failed."""
    from fastvlm.bench.serve_load import run_level

    print(f"warming up with {args.soak_warmup} requests")
    warmup = [run.workload.valid(args.soak + i, stream=i % 2 == 0) for i in range(args.soak_warmup)]
    results, _, _ = asyncio.run(
        run_level(
            run.base_url,
            warmup,
            clients=args.soak_clients,
            time_limit_s=args.request_timeout * len(warmup),
            request_timeout_s=args.request_timeout,
            api_key=args.api_key,
        )
    )
    return sum(not r.ok for r in results)
