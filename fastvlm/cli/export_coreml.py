"""``fastvlm export coreml MODEL OUT``: the vision encoder (tower + projector) as a Core ML package.

Added to the ``fastvlm export`` group by :func:`register`; the conversion itself is
:func:`fastvlm.export.coreml.export_coreml` (imported when the command runs, so building
the parser does not import coremltools).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastvlm.cli.common import Subparsers

# The values of fastvlm.export.coreml.PRECISIONS / INPUT_KINDS (a test keeps them equal).
PRECISIONS = ("fp16", "fp32")
INPUT_KINDS = ("image", "tensor")


def register(subparsers: Subparsers) -> None:
    """Add ``coreml`` to the subcommands of ``fastvlm export``."""
    p = subparsers.add_parser(
        "coreml",
        help="the vision encoder (tower + projector) as a Core ML .mlpackage",
        description=(
            "Convert the vision tower and projector to OUT/vision_encoder.mlpackage (an ML program, iOS 16+) "
            "with OUT/vision_encoder.json describing it. Pad-to-square and resizing stay outside the model."
        ),
    )
    p.add_argument("model", help="checkpoint folder (authors', transformers' or ours) or hub id")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--image-size", type=int, help="input side, a multiple of 64 (default: the checkpoint's)")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="weights and compute (default: fp32, the authors')"
    )
    p.add_argument(
        "--input",
        choices=INPUT_KINDS,
        default="image",
        help="image: an RGB image scaled by 1/255 in the model (default); tensor: float pixels in [0, 1]",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run_coreml)


def run_coreml(args: argparse.Namespace) -> None:
    from fastvlm.export.coreml import ENCODER_FILE, INPUT_NAME, OUTPUT_NAME, export_coreml

    result = export_coreml(
        args.model,
        args.out,
        image_size=args.image_size,
        precision=args.precision,
        input_kind=args.input,
        overwrite=args.overwrite,
    )
    size = result.image_size
    print(
        f"wrote {result.out}/{ENCODER_FILE}: {INPUT_NAME} ({result.input_kind} 1x3x{size}x{size}) -> "
        f"{OUTPUT_NAME} 1x{result.tokens}x{result.hidden_size}, {result.precision}, in {result.seconds:.1f} s"
    )
