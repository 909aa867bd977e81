"""``fastvlm export onnx|coreml MODEL OUT``, and ``fastvlm predict --backend onnx`` on an exported folder.

``export onnx`` writes the three graphs Transformers.js and the hub's ONNX build use
(:mod:`fastvlm.export.onnx`), optionally with fp16 and quantized variants beside them
(:func:`fastvlm.export.quantize.write_variants`); ``export coreml`` is registered by
:mod:`fastvlm.cli.export_coreml`. The heavy modules are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastvlm.cli import export_coreml
from fastvlm.cli.common import result_report
from fastvlm.errors import UsageError

if TYPE_CHECKING:
    from fastvlm.cli.common import Subparsers

# The graph precisions `--quantize` accepts (the variants of fastvlm.export.runner.VARIANT_SUFFIXES but fp32/fp16).
QUANTIZED_VARIANTS = ("int8", "uint8", "q4", "q4f16")
# The precisions `predict --backend onnx --onnx-variant` reads (fastvlm.export.runner.VARIANT_SUFFIXES).
ONNX_VARIANTS = ("fp32", "fp16", *QUANTIZED_VARIANTS)


def register(subparsers: Subparsers) -> None:
    group = subparsers.add_parser("export", help="export a checkpoint for other runtimes (ONNX, Core ML)")
    commands = group.add_subparsers(dest="export_command", required=True)
    p = commands.add_parser(
        "onnx",
        help="vision_encoder, embed_tokens and decoder_model_merged ONNX graphs (Transformers.js layout)",
        description="Write OUT/onnx/{vision_encoder,embed_tokens,decoder_model_merged}.onnx (fp32) with config, "
        "generation config, tokenizer and processor files beside them, so that OUT loads as a model in "
        "Transformers.js and in `fastvlm predict --backend onnx`.",
    )
    p.add_argument("model", help="checkpoint folder (authors', transformers' or ours) or hub id")
    p.add_argument("out", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--image-size", type=int, help="input side, a multiple of 64 (default: the checkpoint's)")
    p.add_argument(
        "--dtype", choices=["fp32", "fp16"], default="fp32", help="fp16 adds the _fp16 graphs beside the fp32 ones"
    )
    p.add_argument(
        "--quantize", nargs="+", choices=list(QUANTIZED_VARIANTS), default=[], help="also write these variants"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_export_onnx)
    export_coreml.register(commands)


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from fastvlm.export.onnx import export_onnx

    variants = (["fp16"] if args.dtype == "fp16" else []) + list(dict.fromkeys(args.quantize))
    start = time.perf_counter()
    out = export_onnx(args.model, args.out, image_size=args.image_size, overwrite=args.overwrite, variants=variants)
    graphs = sorted(p.name for p in (Path(out) / "onnx").glob("*.onnx"))
    print(f"wrote {out} ({', '.join(graphs)}) in {time.perf_counter() - start:.1f} s")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend torch|onnx`` and ``--onnx-variant`` of ``predict``."""
    parser.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="torch (default): the checkpoint in PyTorch; onnx: a folder written by `fastvlm export onnx`, "
        "run on onnxruntime's CPU provider",
    )
    parser.add_argument(
        "--onnx-variant", choices=list(ONNX_VARIANTS), default="fp32", help="graph precision (--backend onnx)"
    )


def predict_onnx(args: argparse.Namespace) -> None:
    """``predict --backend onnx``: greedy generation with :class:`fastvlm.export.runner.OnnxFastVLM`."""
    if args.device != "cpu":
        raise UsageError("--backend onnx runs on the CPU; drop --device")
    if args.temperature > 0:
        raise UsageError("--backend onnx decodes greedily; drop --temperature")
    from fastvlm.export.runner import OnnxFastVLM
    from fastvlm.processing import DEFAULT_MAX_PIXELS, load_image

    image = None
    if args.image is not None:  # decode (and reject a bad image) before loading the graphs
        image = load_image(args.image, max_pixels=None if args.allow_large_images else DEFAULT_MAX_PIXELS)
    model = OnnxFastVLM.from_pretrained(args.model, variant=args.onnx_variant)
    if args.image_mode is not None:
        model.image_processor.mode = args.image_mode
    pixels = None if image is None else model.image_processor.preprocess(image)[None]
    result = model.generate(prompt=args.prompt, pixel_values=pixels, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result_report(result), indent=2))
        return
    print(result.text)
    t = result.timings
    print(
        f"[onnxruntime: vision {t.vision_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, TTFT {t.ttft_ms:.0f} ms, "
        f"{t.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
