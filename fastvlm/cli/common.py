"""Flag sets and checks that several commands share, each defined once.

A flag that more than one command takes (``--llm``, ``--threads``, the benchmark
``--device`` list, ``--json`` for benchmark rows, the model-loading and sampling flags)
is added by one function here, so its choices, default and help read the same
everywhere. The checks raise :class:`~fastvlm.errors.UsageError`, which the command
line prints as one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from fastvlm.dtypes import AUTO, DTYPES, load_dtype_from_name
from fastvlm.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

# What build_parser hands each command group's register().
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# The released Qwen2 decoder sizes: the keys of fastvlm.presets.QWEN2_PRESETS (a test keeps
# them equal). Spelled out here so that building the parser does not import transformers.
LLM_SIZES = ("0.5b", "1.5b", "7b")
# The values of fastvlm.formats.CheckpointFormat (a test keeps them equal), for the same reason.
CHECKPOINT_FORMATS = ("fastvlm", "apple", "hf")

BENCH_DEVICES = ("cpu", "cuda")
THREADS_HELP = "torch CPU threads (default: torch's choice)"


# ------------------------------------------------------------------------------ flag sets


def add_dtype(parser: argparse.ArgumentParser, flag: str = "--dtype", *, auto: bool = False, **kwargs: Any) -> None:
    """A dtype flag (fp32, bf16 or fp16, and ``auto`` if asked); ``kwargs`` are argparse's (default, help)."""
    parser.add_argument(flag, choices=[*sorted(DTYPES), *([AUTO] if auto else [])], **kwargs)


def add_llm_size(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--llm``: one of the released decoder sizes, 0.5b by default."""
    parser.add_argument("--llm", choices=list(LLM_SIZES), default="0.5b", help=help)


def add_threads(parser: argparse.ArgumentParser, help: str | None = THREADS_HELP) -> None:
    """``--threads N`` for torch's CPU thread pool (``bench`` and ``bench-ttft`` show no help for it)."""
    parser.add_argument("--threads", type=int, help=help)


def add_bench_devices(parser: argparse.ArgumentParser) -> None:
    """``--device cpu cuda``: the devices a benchmark measures, one row set each."""
    parser.add_argument("--device", nargs="+", choices=list(BENCH_DEVICES), help="default: cpu, and cuda when present")


def add_rows_json(parser: argparse.ArgumentParser) -> None:
    """``--json FILE`` of the benchmark commands (see :func:`print_benchmark`)."""
    parser.add_argument("--json", help="also write the rows and machine description to this JSON file")


def add_model_loading_arguments(parser: argparse.ArgumentParser, *, auto_dtype: bool = False) -> None:
    """The flags of :func:`load_model`: checkpoint, device, dtype, image handling.

    ``auto_dtype`` adds ``--dtype auto`` (precision per stage chosen by measurement, cached).
    """
    parser.add_argument("--model", required=True, help="checkpoint folder (authors', transformers' or ours) or hub id")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    auto_help = "; auto: per-stage precision measured on this machine (cached; see fastvlm tune-precision)"
    add_dtype(parser, auto=auto_dtype, default="fp32", help="default: fp32" + (auto_help if auto_dtype else ""))
    parser.add_argument("--image-mode", choices=["pad", "crop"], help="pad to square (authors) or centre-crop")
    parser.add_argument("--allow-large-images", action="store_true", help="lift the 100-megapixel guard")


def add_model_arguments(parser: argparse.ArgumentParser, *, auto_dtype: bool = False) -> None:
    """Model loading plus the sampling flags of :func:`generation_kwargs`."""
    add_model_loading_arguments(parser, auto_dtype=auto_dtype)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --temperature > 0)")
    parser.add_argument("--seed", type=int, help="seed for sampling")


# ------------------------------------------------------------------------------ checks and helpers


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that exists here, or a UsageError naming what is missing."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for, but this torch build sees no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' was asked for, but it is not available here")
    return dev


def check_resolutions(resolutions: list[int]) -> None:
    """Every side must be a positive multiple of FastViTHD's stride (64)."""
    from fastvlm.vision.config import fastvithd_config

    stride = fastvithd_config().stride
    for r in resolutions:
        if r <= 0 or r % stride:
            raise UsageError(f"resolution {r} is not a positive multiple of {stride} (the FastViTHD stride)")


def bench_devices(requested: list[str] | None) -> list[str]:
    """The devices to benchmark: those asked for, else the CPU and the GPU when there is one."""
    devices = requested or (list(BENCH_DEVICES) if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        check_device(device)
    return devices


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (unset or 0: torch's own choice)."""
    if threads:
        torch.set_num_threads(threads)


def print_benchmark(title: str, table: str, rows: list, meta: dict, json_path: str | None) -> None:
    """Title line with the machine, the markdown table, and the rows as JSON when asked."""
    from fastvlm.measure import machine_line, write_rows_json

    print(f"\n{title}; {machine_line(meta)}")
    print(table)
    if json_path:
        write_rows_json(rows, json_path, meta)
        print(f"wrote {json_path}")


def load_model(args: argparse.Namespace) -> FastVLM:
    """The model named by the :func:`add_model_loading_arguments` flags, with its tokenizer."""
    from fastvlm.model import FastVLM

    check_device(args.device)
    model = FastVLM.from_pretrained(
        args.model,
        device=args.device,
        dtype=load_dtype_from_name(args.dtype),
        image_mode=args.image_mode,
        quantization=getattr(args, "quantization", None),  # predict and chat have --quantization
    )
    if model.precision is not None:  # --dtype auto: say what was chosen, beside the answer's timings
        print(f"[dtype auto: {model.precision.describe()}]", file=sys.stderr)
    if args.allow_large_images:
        model.image_processor.max_pixels = None
    if model.tokenizer is None:
        raise CheckpointError(f"{args.model} has no tokenizer files; predict and chat need one")
    return model


def result_report(result: Any) -> dict[str, Any]:
    """``predict --json``'s report of a generation result, whichever backend produced it."""
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "timings": result.timings.as_dict(),
    }


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags of :func:`add_model_arguments` as ``generate`` keywords."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
