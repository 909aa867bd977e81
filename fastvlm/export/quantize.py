"""Quantized and half-precision copies of the exported ONNX graphs, as the hub's ONNX build names them.

``write_variants(folder, ["int8", "q4"])`` reads the three fp32 graphs of an exported folder
(``onnx/vision_encoder.onnx``, ``onnx/embed_tokens.onnx``, ``onnx/decoder_model_merged.onnx``)
and writes ``onnx/<graph>_<variant>.onnx`` next to them, the suffixes Transformers.js looks for
(``dtype: "q4"`` loads ``decoder_model_merged_q4.onnx``). Every variant is made by onnxruntime's
own tools; nothing here touches a weight by hand:

- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with
  ``keep_io_types=True``: weights and compute in float16, inputs and outputs (pixel values,
  embeddings, logits, the key/value cache) stay float32, so a caller feeds every variant the
  same tensors, and Transformers.js (which sizes its first cache from the declared input
  types, docs/transformersjs-notes.md) can mix graphs of different dtypes in one model
  (``{vision_encoder: "fp16", decoder_model_merged: "q4"}``). Ops without a float16 kernel
  on onnxruntime's CPU provider are left in float32 by the converter's own block list.
- ``int8`` / ``uint8``: ``onnxruntime.quantization.quantize_dynamic`` with weight type
  ``QInt8`` / ``QUInt8``, per-tensor weight scales, activations quantized at run time
  (``DynamicQuantizeLinear`` → ``MatMulInteger``). Quantized op types: ``MatMul`` and
  ``Gather`` (the embedding table) in every graph. The vision encoder's ``Conv`` nodes stay
  float32: onnxruntime's CPU provider has no ``ConvInteger`` kernel for int8 weights, and the
  two variants should differ only in the weights' type. That costs little: in our export
  the fused tower's 1x1 convolutions and MLPs are ``MatMul`` nodes (123.6M of FastViTHD's
  126M weights), and only its depthwise and stem convolutions (2.5M) are ``Conv``.
- ``q4``: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``, 4-bit
  weights, blocks of 32 along the input dimension, asymmetric (a zero point per block, as
  the quantizer's default; symmetric blocks lose one of the 16 levels), giving
  ``MatMulNBits`` nodes. Only ``MatMul`` with a constant weight is quantized: the embedding
  table stays float32 (``embed_tokens_q4`` is the fp32 size), and so do the encoder's few
  ``Conv`` weights. (The hub build's q4 vision encoder kept its fp32 size because its tower's
  1x1 convolutions are ``Conv`` nodes; ours are ``MatMul`` and shrink: 91 MB for FastViTHD.)
- ``q4f16``: the q4 graph put through the same float16 conversion as ``fp16`` (inputs and
  outputs float32, the block scales in float16).

Variant names are checked before anything is written; an unknown one is a ``ConfigError``
listing the valid names. Graphs over protobuf's 2 GB limit are read and written with their
weights in an external-data file, ``<name>.onnx_data`` (the name Transformers.js fetches in
browsers); whatever name the fp32 graph's external data has, onnx reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from fastvlm.errors import ConfigError

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
VARIANTS = ("fp16", "int8", "uint8", "q4", "q4f16")
Q4_BLOCK_SIZE = 32
Q4_SYMMETRIC = False
DYNAMIC_OP_TYPES = ("MatMul", "Gather")
# Protobuf refuses messages of 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000

logger = logging.getLogger(__name__)


def check_variants(variants: Sequence[str]) -> list[str]:
    """The variants in order without repeats; a ``ConfigError`` naming the valid ones otherwise."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown ONNX variant(s) {', '.join(map(repr, unknown))}: choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(variants))


def variant_path(folder: Path, graph: str, variant: str | None) -> Path:
    """``onnx/<graph>.onnx`` for fp32 (``variant`` None or "fp32"), else ``onnx/<graph>_<variant>.onnx``."""
    suffix = "" if variant in (None, "fp32") else f"_{variant}"
    return folder / "onnx" / f"{graph}{suffix}.onnx"


def graph_bytes(path: Path) -> int:
    """Size on disk of a graph, its external-data files included."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(path, load_external_data=False)
    locations = {ExternalDataInfo(tensor).location for tensor in model.graph.initializer if uses_external_data(tensor)}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in locations)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model``, its weights in ``<name>.onnx_data`` when one file would be too large."""
    path.parent.mkdir(parents=True, exist_ok=True)
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + "_data")
    data.unlink(missing_ok=True)
    onnx.save_model(
        model,
        path,
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and compute, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)


def to_q4(model: onnx.ModelProto) -> onnx.ModelProto:
    """4-bit blocked weights for every MatMul with a constant weight (``MatMulNBits``)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=Q4_BLOCK_SIZE, is_symmetric=Q4_SYMMETRIC)
    quantizer.process()
    return quantizer.model.model


def dynamic_quantizer(weight_type: str) -> Callable[[Path, Path], None]:
    """A function quantizing one graph file to another with ``quantize_dynamic``."""

    def quantize(source: Path, target: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target.with_name(target.name + "_data").unlink(missing_ok=True)
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=list(DYNAMIC_OP_TYPES),
            weight_type=QuantType[weight_type],
            # 8-bit weights take a quarter of the room of float32 ones.
            use_external_data_format=graph_bytes(source) > EXTERNAL_DATA_BYTES * 4,
        )

    return quantize


def in_memory(convert: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Callable[[Path, Path], None]:
    """A file-to-file conversion from a ModelProto-to-ModelProto one."""

    def run(source: Path, target: Path) -> None:
        save_model(convert(onnx.load(source)), target)

    return run


CONVERSIONS: dict[str, Callable[[Path, Path], None]] = {
    "fp16": in_memory(to_fp16),
    "int8": dynamic_quantizer("QInt8"),
    "uint8": dynamic_quantizer("QUInt8"),
    "q4": in_memory(to_q4),
    "q4f16": in_memory(lambda model: to_fp16(to_q4(model))),
}


def write_variants(folder: Path, variants: Sequence[str]) -> list[Path]:
    """Write each variant of each fp32 graph in ``folder/onnx``; returns the files written.

    ``folder`` is an exported model folder (its ``onnx/`` holds the fp32 graphs). Only files
    inside ``folder/onnx`` are written. Unknown variant names are refused before any work.
    """
    folder = Path(folder)
    names = check_variants(variants)
    sources = [variant_path(folder, graph, None) for graph in GRAPHS]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing and names:
        raise FileNotFoundError(f"no fp32 graph to quantize: {', '.join(missing)}")
    written = []
    for variant in names:
        for graph, source in zip(GRAPHS, sources, strict=True):
            target = variant_path(folder, graph, variant)
            logger.info("writing %s", target)
            CONVERSIONS[variant](source, target)
            written.append(target)
    return written
