"""``fastvlm bench-vs-transformers``: ours against transformers' FastVLM, same weights, one process.

Needs transformers' ``FastVlmForConditionalGeneration`` and timm, which live in a side
environment (``bash benchmarks/transformers_env.sh`` builds ``.venv-hf``); elsewhere the
command stops at once with one line saying so. The measurement is
:mod:`fastvlm.bench.vs_transformers`; the table goes to the terminal and, with the JSON,
to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastvlm.cli.common import (
    LLM_SIZES,
    Subparsers,
    add_threads,
    check_device,
    check_resolutions,
    set_threads,
)
from fastvlm.dtypes import DTYPES
from fastvlm.errors import UsageError


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "bench-vs-transformers",
        help="TTFT, decode and greedy tokens against transformers' FastVLM on the same weights (needs .venv-hf)",
    )
    p.add_argument("--model", type=Path, help="a checkpoint in transformers' fast_vlm format (default: random weights)")
    p.add_argument("--size", choices=[*LLM_SIZES, "tiny"], default="0.5b", help="the random model's decoder")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024], help="input sides in px (default 1024)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each with its own seeded image and prompt)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per generation (decode and agreement)")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens around the image")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--full-head", action="store_true", help="our greedy steps read the whole LM head, not its int8 screen"
    )
    add_threads(p)
    p.add_argument("--out", default="results/vs_transformers", help="folder for vs_transformers.{md,json}")
    p.set_defaults(func=cmd_bench_vs_transformers)


def cmd_bench_vs_transformers(args: argparse.Namespace) -> None:
    from fastvlm.bench.gpu_common import dtype_name
    from fastvlm.bench.vs_transformers import CompareSettings, format_report, run_comparison, write_report

    check_resolutions(args.resolutions)
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0")
    if args.new_tokens < 2 or args.text_tokens < 2:
        raise UsageError("--new-tokens must be at least 2 (one prefill token and one decode step), --text-tokens too")
    if args.model is not None and not args.model.is_dir():
        raise UsageError(f"--model {args.model} is not a folder")
    check_device(args.device)
    set_threads(args.threads)
    settings = CompareSettings(
        size=args.size,
        resolutions=tuple(dict.fromkeys(args.resolutions)),
        dtypes=tuple(dict.fromkeys(dtype_name(DTYPES[d]) for d in args.dtypes)),
        text_tokens=args.text_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        full_head=args.full_head,
    )
    report = run_comparison(settings, args.model, out_dir=Path(args.out))  # written after each row too
    files = write_report(report, Path(args.out))
    print(format_report(report))
    print("wrote " + ", ".join(str(f) for f in files))
