"""The vision encoder (FastViTHD tower + projector) as a Core ML ``.mlpackage``.

What is converted: one image -> tower -> projector -> features ``[1, T, H]``, the visual
tokens the decoder reads (``T = (S / 64) ** 2`` for an S x S image, H the decoder's hidden
size). The authors' ``export_vision_encoder.py`` converts the tower alone; the projector is
included here so that an app only has to hand the features to its language model.

Route: the tower in its fused form (BatchNorms and layer scales folded into the
convolutions and projections, attention through ``scaled_dot_product_attention``), captured
with ``torch.export`` and converted with coremltools' ExportedProgram frontend to an
``mlprogram`` (minimum deployment target iOS 16, as the authors'). ``torch.jit.trace`` is
not used: coremltools 9 fails on the traced graph's shape arithmetic with NumPy 2
(``aten::Int`` of a one-element array).

Input: by default a Core ML image (``ct.ImageType``, RGB, S x S, ``scale=1/255`` and no
bias: our preprocessing divides by 255 with no mean or std), so an app passes a
``CVPixelBuffer`` directly. ``input_kind="tensor"`` takes float pixels ``[1, 3, S, S]`` in
[0, 1] instead. Either way the pad-to-square (or centre-crop) and the bicubic resize to S
stay outside the model: the caller gives it an S x S image prepared as
:class:`fastvlm.processing.ImageProcessor` prepares one (``image_mode`` in the JSON).

Precision: ``fp32`` (the default, the authors' choice) or ``fp16`` sets coremltools'
compute precision, which stores the weights and runs the ops in that type. fp16 halves the
package (242 MB against 482 MB for FastViTHD with the 0.5B model's projector) and lets Core
ML use the Neural Engine; how far its features drift from fp32 on the released weights can
be measured only where Core ML runs (macOS). The output is float32 in both, so that callers
see one interface.

Output folder: ``vision_encoder.mlpackage`` and ``vision_encoder.json`` (image size, input
kind, tokens, hidden size, precision, source checkpoint), written through a staging folder
that takes the final name only when complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fastvlm.config import FastVLMConfig
from fastvlm.errors import ConfigError, OutputExistsError
from fastvlm.files import atomic_dir
from fastvlm.model import FastVLM

if TYPE_CHECKING:
    from fastvlm.model import MultiModalProjector
    from fastvlm.vision import FastViT

ENCODER_FILE = "vision_encoder.mlpackage"
INFO_FILE = "vision_encoder.json"
INPUT_NAME = "images"  # the authors' names
OUTPUT_NAME = "image_features"
PRECISIONS = ("fp16", "fp32")
INPUT_KINDS = ("image", "tensor")
DEPLOYMENT_TARGET = "iOS16"
INFO_FORMAT = "fastvlm-coreml-vision-encoder/1"


class VisionEncoder(nn.Module):
    """Pixels ``[1, 3, S, S]`` in [0, 1] -> projected visual tokens ``[1, T, H]`` (what is converted)."""

    def __init__(self, tower: FastViT, projector: MultiModalProjector) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower.image_embeddings(pixel_values))


@dataclass
class CoreMLExport:
    """What :func:`export_coreml` wrote: the contents of ``vision_encoder.json`` plus timings."""

    out: str
    image_size: int
    image_mode: str
    input_kind: str
    tokens: int
    hidden_size: int
    precision: str
    source: str
    seconds: float

    def info(self) -> dict[str, Any]:
        """The JSON written beside the package."""
        return {
            "format": INFO_FORMAT,
            "package": ENCODER_FILE,
            "input": {
                "name": INPUT_NAME,
                "kind": self.input_kind,
                "shape": [1, 3, self.image_size, self.image_size],
                "color_layout": "RGB",
                "scale": "1/255" if self.input_kind == "image" else None,
                "preprocessing": f"{self.image_mode} to square, bicubic resize to {self.image_size}, outside the model",
            },
            "output": {"name": OUTPUT_NAME, "shape": [1, self.tokens, self.hidden_size], "dtype": "float32"},
            "image_size": self.image_size,
            "image_mode": self.image_mode,
            "tokens": self.tokens,
            "hidden_size": self.hidden_size,
            "precision": self.precision,
            "minimum_deployment_target": DEPLOYMENT_TARGET,
            "source": self.source,
        }


def check_image_size(image_size: int, stride: int) -> None:
    """Refuse a side the tower cannot take (it must be a positive multiple of the stride)."""
    if image_size < stride or image_size % stride:
        lower = max(stride, image_size // stride * stride)
        raise ConfigError(
            f"image size {image_size} is not a multiple of the vision tower's stride {stride}; "
            f"use e.g. {lower} or {lower + stride}"
        )


def check_options(precision: str, input_kind: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if input_kind not in INPUT_KINDS:
        raise ConfigError(f"input kind must be one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")


def export_coreml(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    precision: str = "fp32",
    input_kind: str = "image",
    overwrite: bool = False,
) -> CoreMLExport:
    """Convert the vision encoder of the checkpoint at ``model_path`` into the folder ``out``.

    ``image_size`` (default: the checkpoint's) must be a multiple of the tower's stride
    (64). Every check (options, an existing ``out`` without ``overwrite``, the checkpoint,
    the size) runs before anything is written; an interrupted export leaves no ``out``.
    """
    check_options(precision, input_kind)
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    ct = import_coremltools()
    start = time.perf_counter()
    encoder, config, source = load_encoder(model_path)
    size = image_size or config.image_size
    check_image_size(size, config.vision.stride)
    mlmodel = convert(capture(encoder, size), size, precision=precision, input_kind=input_kind, ct=ct)
    result = CoreMLExport(
        out=str(out),
        image_size=size,
        image_mode=config.image_mode,
        input_kind=input_kind,
        tokens=config.num_image_tokens(size),
        hidden_size=config.hidden_size,
        precision=precision,
        source=source,
        seconds=0.0,
    )
    with atomic_dir(out) as staging:
        mlmodel.save(str(staging / ENCODER_FILE))
        write_info(staging / INFO_FILE, result)
    result.seconds = time.perf_counter() - start
    return result


def write_info(path: Path, result: CoreMLExport) -> None:
    path.write_text(json.dumps(result.info(), indent=2) + "\n")


def import_coremltools() -> Any:
    """coremltools, or a one-line error saying how to install it."""
    try:
        import coremltools
    except ImportError:
        raise ConfigError(
            "the Core ML export needs coremltools, which is not installed: pip install 'fastvlm[export]'"
        ) from None
    return coremltools


def load_encoder(model_path: str | os.PathLike) -> tuple[VisionEncoder, FastVLMConfig, str]:
    """The fused fp32 encoder of a checkpoint, its config and its folder.

    The checkpoint is read in its stored dtype (a 7B decoder in bf16 is not doubled to
    fp32 for nothing); the tower and projector are cast to fp32 before the tower is fused,
    so that folding the batch norms loses nothing. The decoder is dropped on return.
    """
    model = FastVLM.from_pretrained(model_path, dtype=None, fuse=False)
    encoder = VisionEncoder(model.vision_tower, model.projector).float().eval()
    encoder.tower.fuse()
    return encoder, model.config, str(model.source_path)


def capture(encoder: VisionEncoder, image_size: int) -> torch.export.ExportedProgram:
    """``encoder`` at ``image_size`` as an ATen-level ExportedProgram (what coremltools converts)."""
    example = torch.zeros(1, 3, image_size, image_size)
    # With autograd on, the fused tower runs plain PyTorch ops rather than its oneDNN kernels
    # (opaque to torch.export and to coremltools); the weights do not require grad either way.
    with torch.enable_grad():
        return torch.export.export(encoder, (example,)).run_decompositions({})


def convert(program: torch.export.ExportedProgram, image_size: int, *, precision: str, input_kind: str, ct: Any) -> Any:
    """``program`` as a coremltools ``MLModel`` (not yet saved)."""
    shape = (1, 3, image_size, image_size)
    if input_kind == "image":
        inputs = [ct.ImageType(name=INPUT_NAME, shape=shape, scale=1 / 255.0, color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)]
    return ct.convert(
        program,
        inputs=inputs,
        outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        compute_units=ct.ComputeUnit.ALL,
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        skip_model_load=sys.platform != "darwin",  # Core ML runs models on macOS only
    )
