"""Benchmark commands: the paper's study (``bench``) and one command per measurement.

``bench-ttft``, ``bench-train``, ``bench-eval`` and ``bench-encoder`` each print one
markdown table headed by the machine it ran on, and write the rows as JSON with
``--json`` (the scripts in ``benchmarks/`` call these commands). ``bench-gpu`` writes
its report (JSON and markdown) to a folder after every step, for short GPU loans.
``bench-limits`` writes one too: each stage as a fraction of the machine's limits, measured
in the same run. Arguments are checked before anything is built, so a bad resolution or
device fails at once.

``bench-serve`` load-tests a server over HTTP instead of calling the model: one it
starts (``--model``, ``fastvlm serve`` as a child process on a free 127.0.0.1 port) or
one already running on this machine (``--url``). It writes JSON and markdown to ``--out``;
it lives in :mod:`~fastvlm.cli.bench_serve`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from fastvlm.cli import bench_compare, bench_serve
from fastvlm.cli.common import (
    DTYPES,
    LLM_SIZES,
    Subparsers,
    add_bench_devices,
    add_dtype,
    add_llm_size,
    add_rows_json,
    add_threads,
    bench_devices,
    check_device,
    check_resolutions,
    print_benchmark,
    set_threads,
)
from fastvlm.errors import UsageError


def register(subparsers: Subparsers) -> None:
    _register_study(subparsers)
    _register_ttft(subparsers)
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_encoder(subparsers)
    _register_gpu(subparsers)
    _register_limits(subparsers)
    bench_serve.register(subparsers)
    bench_compare.register(subparsers)


def _add_resolutions(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
    """``--resolutions`` (input sides in px); ``kwargs`` are argparse's (default, help)."""
    parser.add_argument("--resolutions", type=int, nargs="+", **kwargs)


# ------------------------------------------------------------------------------ bench (the study)


def _register_study(subparsers: Subparsers) -> None:
    from fastvlm.bench.baselines import ENCODERS
    from fastvlm.bench.study import LLM_NAMES

    p = subparsers.add_parser(
        "bench", help="the paper's efficiency study (encoders, resolutions, LLMs; tables and plots)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="FastViTHD vs ViT-L/14 vs ConvNeXt-L at 256/512/1024 px, Qwen2-0.5B prefill (a few minutes)",
    )
    p.add_argument("--encoders", nargs="+", choices=sorted(ENCODERS), help="default: all six")
    _add_resolutions(p, help="input sides in px (default 256 512 768 1024)")
    p.add_argument(
        "--llms",
        nargs="*",
        choices=LLM_NAMES,
        help="decoders for TTFT (default: all four; 7B ones run in bf16 or are skipped when memory is short; "
        "pass no names for encoders only)",
    )
    p.add_argument("--device", default="cpu")
    add_dtype(p, default="fp32", help="encoder dtype")
    add_dtype(p, "--llm-dtype", help="default: fp32 (bf16 for 7B models and on GPU)")
    p.add_argument(
        "--tiling",
        action="store_true",
        help="also the paper's AnyRes: 2x2 tiles + a global view at twice the largest side",
    )
    p.add_argument("--repeats", type=int, help="timed runs after the warm-up (default 3; 1 with --quick)")
    add_threads(p, help=None)
    p.add_argument("--out", default="results/bench", help="folder for results.json, results.md and the plots")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    from fastvlm.bench.report import markdown_report, write_report
    from fastvlm.bench.study import (
        DEFAULT_ENCODERS,
        DEFAULT_RESOLUTIONS,
        LLM_NAMES,
        QUICK_ENCODERS,
        QUICK_RESOLUTIONS,
        run_study,
    )
    from fastvlm.measure import machine_description

    set_threads(args.threads)
    encoders = args.encoders or (QUICK_ENCODERS if args.quick else DEFAULT_ENCODERS)
    resolutions = args.resolutions or (QUICK_RESOLUTIONS if args.quick else DEFAULT_RESOLUTIONS)
    llms = args.llms if args.llms is not None else (["qwen2-0.5b"] if args.quick else LLM_NAMES)
    repeats = args.repeats or (1 if args.quick else 3)
    if any(r < 64 for r in resolutions) or repeats < 1:
        raise UsageError("resolutions must be at least 64 px and --repeats at least 1")
    check_device(args.device)
    results = run_study(
        encoders,
        resolutions,
        llms,
        device=args.device,
        dtype=DTYPES[args.dtype],
        llm_dtype=DTYPES[args.llm_dtype] if args.llm_dtype else None,
        repeats=repeats,
        tiling=args.tiling,
        meta=machine_description(),
    )
    files = write_report(results, Path(args.out))
    print(markdown_report(results))
    print("wrote " + ", ".join(str(f) for f in files))


# ------------------------------------------------------------------------------ bench-ttft


def _register_ttft(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("bench-ttft", help="TTFT of a FastVLM-sized model (random weights) by resolution")
    _add_resolutions(p, default=[256, 512, 768, 1024])
    add_llm_size(p)
    add_bench_devices(p)
    add_dtype(p, help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--text-tokens", type=int, default=40, help="text tokens around the image (template + question)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded to measure decode speed")
    p.add_argument("--repeats", type=int, default=3)
    add_threads(p, help=None)
    add_rows_json(p)
    p.set_defaults(func=cmd_bench_ttft)


def cmd_bench_ttft(args: argparse.Namespace) -> None:
    from fastvlm.bench.ttft import format_ttft_table, run_ttft_benchmark
    from fastvlm.measure import machine_description

    set_threads(args.threads)
    check_resolutions(args.resolutions)
    if args.repeats < 1 or args.new_tokens < 2:
        raise UsageError("--repeats must be at least 1 and --new-tokens at least 2")
    rows = []
    for device in bench_devices(args.device):
        dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
        rows += run_ttft_benchmark(
            args.resolutions,
            llm=args.llm,
            device=device,
            dtype=dtype,
            text_tokens=args.text_tokens,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
        )
    meta = machine_description() | {
        "repeats": args.repeats,
        "text_tokens": args.text_tokens,
        "new_tokens": args.new_tokens,
    }
    model = f"FastVLM-{args.llm.upper()} (FastViTHD fused + Qwen2-{args.llm.upper()})"
    title = f"{model}, random weights, batch 1; median of {args.repeats} runs after a warm-up"
    print_benchmark(title, format_ttft_table(rows), rows, meta, args.json)


# ------------------------------------------------------------------------------ bench-train


def _register_train(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("bench-train", help="training throughput (samples/s) of a FastVLM-sized model, by stage")
    add_llm_size(p)
    _add_resolutions(p, default=[1024])
    p.add_argument("--stages", nargs="+", choices=["1", "1.5", "2", "3"], default=["1"])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    add_bench_devices(p)
    add_threads(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the full-logits baseline rows")
    add_rows_json(p)
    p.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args: argparse.Namespace) -> None:
    from fastvlm.bench.train_speed import format_train_table, measure_training_step
    from fastvlm.measure import machine_description

    set_threads(args.threads)
    check_resolutions(args.resolutions)
    rows = []
    for device in bench_devices(args.device):
        for px in args.resolutions:
            for stage in args.stages:
                rows += measure_training_step(
                    args.llm,
                    px,
                    stage=stage,
                    micro_batch=args.micro_batch,
                    steps=args.steps,
                    device=device,
                    baseline=not args.no_baseline,
                    progress=True,
                )
    title = (
        f"Training step of FastVLM-{args.llm.upper()} (random weights, fp32 master weights), one process; "
        f"median of {args.steps} steps after a warm-up"
    )
    print_benchmark(title, format_train_table(rows), rows, machine_description(), args.json)


# ------------------------------------------------------------------------------ bench-eval


def _register_eval(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "bench-eval", help="evaluation throughput (samples/s) of a FastVLM-sized model, by batch size"
    )
    add_llm_size(p)
    _add_resolutions(p, default=[1024])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="compared with batch size 1")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    add_bench_devices(p)
    add_threads(p)
    add_rows_json(p)
    p.set_defaults(func=cmd_bench_eval)


def cmd_bench_eval(args: argparse.Namespace) -> None:
    from fastvlm.bench.eval_speed import format_eval_table, measure_eval_throughput
    from fastvlm.measure import machine_description

    set_threads(args.threads)
    check_resolutions(args.resolutions)
    if args.samples < 1 or args.max_new_tokens < 1 or any(b < 1 for b in args.batch_sizes):
        raise UsageError("--samples, --max-new-tokens and every --batch-sizes value must be at least 1")
    batches = tuple(dict.fromkeys([1, *args.batch_sizes]))  # batch 1 is the baseline
    rows = []
    for device in bench_devices(args.device):
        for px in args.resolutions:
            rows += measure_eval_throughput(
                args.llm,
                px,
                samples=args.samples,
                batch_sizes=batches,
                max_new_tokens=args.max_new_tokens,
                device=device,
                progress=True,
            )
    title = f"fastvlm eval (GQA layout, synthetic images) with FastVLM-{args.llm.upper()}, random weights, greedy"
    print_benchmark(title, format_eval_table(rows), rows, machine_description(), args.json)


# ------------------------------------------------------------------------------ bench-encoder


def _register_encoder(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("bench-encoder", help="FastViTHD latency: released inference form vs our fused form")
    _add_resolutions(p, help="input sides in px (default 256 512 1024)")
    add_bench_devices(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, help="timed calls per form (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    add_threads(p)
    p.add_argument(
        "--fused-dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype of the fused form (auto: fp32 on CPU, bf16 on GPU; bf16 pays on some CPUs, e.g. with AMX, "
        "and loses on others)",
    )
    p.add_argument("--quick", action="store_true", help="256 and 512 px, 3 repeats")
    add_rows_json(p)
    p.set_defaults(func=cmd_bench_encoder)


def cmd_bench_encoder(args: argparse.Namespace) -> None:
    from fastvlm.bench.encoder import format_table, run_encoder_benchmark
    from fastvlm.measure import machine_description

    set_threads(args.threads)
    devices = bench_devices(args.device)
    resolutions = args.resolutions or ([256, 512] if args.quick else [256, 512, 1024])
    repeats = args.repeats or (3 if args.quick else 5)
    check_resolutions(resolutions)
    rows = run_encoder_benchmark(
        resolutions,
        devices,
        batch=args.batch,
        repeats=repeats,
        warmup=args.warmup,
        fused_dtype=DTYPES.get(args.fused_dtype),  # "auto": None, chosen per device
    )
    meta = machine_description() | {"repeats": repeats, "warmup": args.warmup}
    title = (
        f"FastViTHD, random weights, batch {args.batch}; median of {repeats} interleaved calls after "
        f"{args.warmup} warm-up"
    )
    print_benchmark(title, format_table(rows), rows, meta, args.json)


# ------------------------------------------------------------------------------ bench-gpu


def _register_gpu(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "bench-gpu",
        help="FastVLM 0.5B/1.5B/7B on a GPU vs transformers: encoder, prefill, TTFT, decode, memory (random weights)",
    )
    p.add_argument("--sizes", nargs="+", choices=[*LLM_SIZES, "tiny"], help="default: 0.5b 1.5b 7b")
    _add_resolutions(p, help="input sides in px; decode and memory at the first (default 1024 512)")
    p.add_argument("--batch", type=int, help="the large decode batch (default 32; batch 1 is always measured)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per decode measurement (default 64)")
    p.add_argument("--text-tokens", type=int, help="text tokens around the image (default 32)")
    p.add_argument("--repeats", type=int, help="timed calls per latency (default 10)")
    p.add_argument("--budget-s", type=float, help="start no new step after this many seconds (default 300)")
    p.add_argument("--compile-sizes", nargs="*", choices=[*LLM_SIZES, "tiny"], help="default: 7b 0.5b; none: skip")
    p.add_argument("--compile-timeout-s", type=float, help="limit of one compiled-decode child process (default 150)")
    p.add_argument("--no-transformers", action="store_true", help="measure our model only")
    p.add_argument("--smoke", action="store_true", help="every step at toy sizes on the CPU, in seconds")
    p.add_argument("--out", help="folder for gpu_speed.json and gpu_speed.md (default: $OUT, else results/gpu)")
    p.set_defaults(func=cmd_bench_gpu)


def cmd_bench_gpu(args: argparse.Namespace) -> None:
    from fastvlm.bench.gpu import GpuSettings, run_gpu_benchmark, settings_with

    if not args.smoke and not torch.cuda.is_available():
        raise UsageError("bench-gpu needs a CUDA device; --smoke runs the same steps at toy sizes on the CPU")
    if args.resolutions:
        check_resolutions(args.resolutions)
    if any(v is not None and v < 1 for v in (args.batch, args.new_tokens, args.repeats, args.text_tokens)):
        raise UsageError("--batch, --new-tokens, --repeats and --text-tokens must be at least 1")
    if args.new_tokens is not None and args.new_tokens < 2:
        raise UsageError("--new-tokens must be at least 2 (one prefill token and one decode step)")
    base = GpuSettings.smoke() if args.smoke else GpuSettings()
    settings = settings_with(
        base,
        sizes=tuple(args.sizes) if args.sizes else None,
        resolutions=tuple(args.resolutions) if args.resolutions else None,
        batch=args.batch,
        new_tokens=args.new_tokens,
        text_tokens=args.text_tokens,
        repeats=args.repeats,
        budget_s=args.budget_s,
        compile_sizes=tuple(args.compile_sizes) if args.compile_sizes is not None else None,
        compile_timeout_s=args.compile_timeout_s,
        transformers=False if args.no_transformers else None,
    )
    out = args.out or os.environ.get("OUT") or "results/gpu"
    run_gpu_benchmark(settings, out)


# ------------------------------------------------------------------------------ bench-limits


def _register_limits(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "bench-limits",
        help="encoder, prefill and decode as fractions of this machine's measured matmul rate and read bandwidth",
    )
    add_llm_size(p)
    add_bench_devices(p)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp32 bf16")
    p.add_argument(
        "--quantizations",
        nargs="*",
        choices=["int8", "int8-head"],
        help="decode also timed with the fp32 decoder quantized, on the CPU (default: int8-head; none: leave out)",
    )
    _add_resolutions(p, help="input sides in px (default 256 512 1024)")
    p.add_argument("--rounds", type=int, help="repeats of the whole set, ceilings included (default 3)")
    p.add_argument("--repeats", type=int, help="timed calls per ceiling, encoder and prefill (default 3)")
    p.add_argument("--warmup", type=int, help="untimed calls before those (default 1)")
    p.add_argument("--decode-steps", type=int, help="timed decode steps (default 8)")
    p.add_argument("--text-tokens", type=int, help="text tokens around the image (default 32)")
    p.add_argument("--matmul-n", type=int, help="side of the square matmul ceiling (default 4096)")
    p.add_argument("--buffer-mib", type=int, help="buffer of the read-bandwidth ceiling, MiB (default 1024)")
    add_threads(p)
    p.add_argument("--smoke", action="store_true", help="a tiny tower and decoder, small GEMM and buffer: seconds")
    p.add_argument("--out", default="results/limits", help="folder for limits.md and limits.json")
    p.set_defaults(func=cmd_bench_limits)


def cmd_bench_limits(args: argparse.Namespace) -> None:
    from fastvlm.bench.limits import LimitSettings, run_limits
    from fastvlm.bench.limits_report import format_report, write_report

    set_threads(args.threads)
    if args.resolutions:
        check_resolutions(args.resolutions)
    counts = {"--rounds": args.rounds, "--repeats": args.repeats, "--decode-steps": args.decode_steps}
    sizes = {"--text-tokens": args.text_tokens, "--matmul-n": args.matmul_n, "--buffer-mib": args.buffer_mib}
    for flag, value in (counts | sizes).items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, not {args.warmup}")
    base = LimitSettings.smoke() if args.smoke else LimitSettings(llm=args.llm)
    settings = base.with_changes(
        devices=tuple(bench_devices(args.device)),
        dtypes=tuple(dict.fromkeys(args.dtypes)) if args.dtypes else None,
        quantizations=tuple(dict.fromkeys(args.quantizations)) if args.quantizations is not None else None,
        resolutions=tuple(dict.fromkeys(args.resolutions)) if args.resolutions else None,
        rounds=args.rounds,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_steps=args.decode_steps,
        text_tokens=args.text_tokens,
        matmul_n=args.matmul_n,
        buffer_mib=args.buffer_mib,
    )
    report = run_limits(settings)
    files = write_report(report, args.out)
    print(format_report(report))
    print("wrote " + ", ".join(str(f) for f in files))
