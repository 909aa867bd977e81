"""The ``fastvlm`` command line.

Subcommands:
  info PATH                         layout, form, architecture and size of a tower checkpoint
  convert-tower SRC DST --layout L  rewrite a tower checkpoint in another layout (optionally re-parameterised)
  bench-encoder                     FastViTHD latency, unfused vs fused (also benchmarks/encoder_latency.py)

User errors (bad paths, bad checkpoints) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch


class CLIError(Exception):
    """An error caused by the user's input: reported as one line, without a traceback."""


# ------------------------------------------------------------------------------ helpers


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    info = {
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------ commands


def cmd_info(args: argparse.Namespace) -> None:
    from fastvlm.checkpoints import detect_tower_layout, extract_tower_state_dict, read_state_dict
    from fastvlm.vision import FastViT

    state_dict = read_state_dict(args.path)
    tensors, prefix = extract_tower_state_dict(state_dict)
    layout = detect_tower_layout(tensors)
    model = FastViT.from_state_dict(state_dict, device="meta")
    cfg = model.config
    report = {
        "layout": layout,
        "prefix": prefix,
        "form": "inference" if cfg.inference_mode else "training",
        "parameters": model.num_parameters(),
        "config": cfg.to_dict(),
        "has_clip_head": "head.proj" in tensors,
    }
    print(json.dumps(report, indent=2))


def cmd_convert_tower(args: argparse.Namespace) -> None:
    from fastvlm.checkpoints import convert_tower_state_dict, read_state_dict, save_safetensors_atomic
    from fastvlm.vision import FastViT

    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CLIError(f"{dst} exists; pass --overwrite to replace it")
    if dst.suffix != ".safetensors":
        raise CLIError(f"output must be a .safetensors file, got {dst}")
    state_dict = read_state_dict(src)
    if args.reparameterize:
        model = FastViT.from_state_dict(state_dict, dtype=None)
        state_dict = model.reparameterize().state_dict()
    out = convert_tower_state_dict(state_dict, args.layout, prefix=args.prefix)
    save_safetensors_atomic(out, dst, metadata={"format": "pt", "fastvlm_tower_layout": args.layout})
    print(f"wrote {len(out)} tensors in the {args.layout} layout to {dst}")


def cmd_bench_encoder(args: argparse.Namespace) -> None:
    from fastvlm.bench.encoder import format_table, run_encoder_benchmark, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    resolutions = args.resolutions or ([256, 512] if args.quick else [256, 512, 1024])
    repeats = args.repeats or (3 if args.quick else 5)
    for r in resolutions:
        if r <= 0 or r % 64:
            raise CLIError(f"resolution {r} is not a positive multiple of 64 (the FastViTHD stride)")
    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.fused_dtype]
    rows = run_encoder_benchmark(
        resolutions, devices, batch=args.batch, repeats=repeats, warmup=args.warmup, fused_dtype=dtype
    )
    meta = machine_description() | {"repeats": repeats, "warmup": args.warmup}
    print(
        f"\nFastViTHD, random weights, batch {args.batch}; median of {repeats} interleaved calls after "
        f"{args.warmup} warm-up; {meta['cpu']}, {meta['cpu_threads']} threads, torch {meta['torch']}"
        + (f", {meta['gpu']}" if "gpu" in meta else "")
    )
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, meta)
        print(f"wrote {args.json}")


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlm", description="FastVLM: fast vision-language inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a vision-tower checkpoint (.safetensors or .bin)")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert-tower", help="rewrite a vision-tower checkpoint in another key layout")
    p.add_argument("src", help="input .safetensors/.bin (any layout, prefixed or not)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--layout", choices=["fastvlm", "apple", "timm"], required=True)
    p.add_argument("--prefix", action="store_true", help="add the prefix the tower has inside a full checkpoint")
    p.add_argument("--reparameterize", action="store_true", help="convert a training-form tower to the inference form")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert_tower)

    p = sub.add_parser("bench-encoder", help="FastViTHD latency: released inference form vs our fused form")
    add_bench_encoder_arguments(p)
    p.set_defaults(func=cmd_bench_encoder)
    return parser


def add_bench_encoder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolutions", type=int, nargs="+", help="input sides in px (default 256 512 1024)")
    p.add_argument("--device", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, help="timed calls per form (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--fused-dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="dtype of the fused form (auto: fp32 on CPU, bf16 on GPU; bf16 is also fast on CPUs with AVX512-BF16)",
    )
    p.add_argument("--quick", action="store_true", help="256 and 512 px, 3 repeats")
    p.add_argument("--json", help="also write the rows and machine description to this JSON file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as err:
        print(f"fastvlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
