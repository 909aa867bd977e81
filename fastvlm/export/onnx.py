"""FastVLM as three ONNX graphs in the layout of the hub's ONNX build and Transformers.js.

``onnx/vision_encoder.onnx``: ``pixel_values`` [batch_size, 3, S, S] float in [0, 1] ->
``image_features`` [batch_size, T, H] (tower + projector, T = (S/64)^2);
``onnx/embed_tokens.onnx``: ``input_ids`` [batch_size, sequence_length] int64 ->
``inputs_embeds`` [batch_size, sequence_length, H];
``onnx/decoder_model_merged.onnx``: ``inputs_embeds``, ``attention_mask``
[batch_size, total_sequence_length], ``position_ids`` [batch_size, sequence_length] and
``past_key_values.{i}.key/.value`` [batch_size, kv_heads, past_sequence_length, head_dim]
-> ``logits`` [batch_size, sequence_length, V] and ``present.{i}.key/.value``. The first
step passes a past of length 0, so one graph serves the prefill and the cached steps.
The symbolic dimensions carry exactly these names: Transformers.js builds the empty first
cache from the past inputs' metadata, sizing ``batch_size`` and zeroing every other
symbolic dimension (docs/transformersjs-notes.md).

Beside ``onnx/`` the folder gets what makes it load as a model: ``config.json`` (the
authors' flat ``llava_qwen2`` config, which Transformers.js maps to
``LlavaQwen2ForCausalLM``, plus ``image_token_index``), ``generation_config.json``, the
tokenizer, ``preprocessor_config.json`` and ``processor_config.json``. Images enter the
ids as the in-vocabulary placeholder of :func:`fastvlm.formats.placeholder_token_id`
repeated T times; its embedding row is overwritten by the image features.

The graphs are traced from the fused tower (one conv per re-parameterised block: the
faster form) by the dynamo exporter (``torch.export``), which handles the decoder's
cache and masks with symbolic lengths. Everything is written to a staging folder that
takes the output's name only when complete (:func:`fastvlm.files.atomic_dir`): a failed
or interrupted export leaves nothing under that name, and bad arguments (an image size
that is not a multiple of the tower's stride, a folder that is not a FastVLM checkpoint,
an existing non-empty output) fail before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from fastvlm.decoding import cache_argument
from fastvlm.errors import CheckpointError, ConfigError, OutputExistsError
from fastvlm.export.runner import ONNX_DIR, graph_path
from fastvlm.files import atomic_dir
from fastvlm.formats import CheckpointFormat, get_format, placeholder_token_id
from fastvlm.model import FastVLM
from fastvlm.processing import CHAT_TEMPLATE, DEFAULT_IMAGE_TOKEN

OPSET = 18
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: larger graphs keep their weights beside them
# Example sizes to trace with: above 1, so that torch.export does not specialise the dimension.
_TRACE_BATCH, _TRACE_LENGTH, _TRACE_PAST = 2, 3, 4


# ----------------------------------------------------------------------------- graph modules


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, S, S] -> image_features [B, T, H] (tower + projector)."""

    def __init__(self, model: FastVLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class EmbedTokens(nn.Module):
    """input_ids [B, L] -> inputs_embeds [B, L, H]."""

    def __init__(self, model: FastVLM) -> None:
        super().__init__()
        self.embed_tokens = model.language_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class MergedDecoder(nn.Module):
    """The Qwen2 decoder with its KV cache as flat tensors: one graph for the first and later steps.

    ``past`` holds key, value, key, value ... per layer, each [B, kv_heads, P, head_dim]
    (P = 0 on the first step); the outputs are the logits [B, L, V] and the present
    tensors [B, kv_heads, P + L, head_dim] in the same order.
    """

    def __init__(self, model: FastVLM) -> None:
        super().__init__()
        self.language_model = model.language_model
        self.num_layers = model.config.text.num_hidden_layers

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        lm = self.language_model
        out = lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_argument(lm): cache},
        )
        present: list[torch.Tensor] = []
        for cached in cache.layers:  # full-attention layers: each holds its keys and values
            present += [cached.keys, cached.values]  # type: ignore[union-attr,list-item]
        return (out.logits, *present)


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """``{prefix}.{i}.key`` and ``{prefix}.{i}.value`` for each layer, in the graph's order."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def head_dim(model: FastVLM) -> int:
    text = model.config.text
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


# ----------------------------------------------------------------------------- checks


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output that is not an empty folder, unless ``overwrite``."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise OutputExistsError(f"{out} exists and is not an empty folder; pass --overwrite to replace it")


def check_image_size(model: FastVLM, image_size: int | None) -> int:
    """The input side to export at: ``image_size``, or the checkpoint's own; a multiple of the stride."""
    stride = model.config.vision.stride
    size = image_size or model.config.image_size
    if size <= 0 or size % stride:
        raise ConfigError(
            f"image size {size} is not a positive multiple of the vision tower's stride {stride}; "
            f"pick e.g. {max(stride, size // stride * stride)} or {(size // stride + 1) * stride}"
        )
    return size


# ----------------------------------------------------------------------------- export


def export_onnx(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    overwrite: bool = False,
    variants: Sequence[str] = (),
) -> Path:
    """Export the checkpoint at ``model_path`` (any format we read) to the folder ``out``.

    ``image_size`` re-sizes the vision encoder's input (a multiple of 64). ``variants``
    (``fp16``, ``int8``, ``uint8``, ``q4``, ``q4f16``) are written beside the fp32 graphs by
    :func:`fastvlm.export.quantize.write_variants`, inside the staging folder, so they
    too appear all at once or not at all. Returns ``out``.
    """
    from fastvlm.export.quantize import check_variants

    out = Path(out)
    check_output(out, overwrite)
    check_variants(variants)  # names first: the graphs take minutes to trace
    model = FastVLM.from_pretrained(model_path, fuse=True, dtype=torch.float32)
    size = check_image_size(model, image_size)
    if model.tokenizer is None:
        raise CheckpointError(f"{model_path} has no tokenizer files; the exported folder needs its tokenizer")
    placeholder_token_id(model.config, model.tokenizer)  # the image placeholder must exist before any tracing
    model.config.image_size = size
    model.image_processor.size = size
    with atomic_dir(out) as staging:
        write_graphs(model, staging)
        write_model_files(model, staging)
        if variants:
            from fastvlm.export.quantize import write_variants

            write_variants(staging, variants)
    return out


def write_graphs(model: FastVLM, folder: Path) -> list[Path]:
    """The three fp32 graphs of ``model`` in ``folder/onnx``."""
    (folder / ONNX_DIR).mkdir(parents=True, exist_ok=True)
    return [
        export_vision_encoder(model, graph_path(folder, "vision_encoder")),
        export_embed_tokens(model, graph_path(folder, "embed_tokens")),
        export_decoder(model, graph_path(folder, "decoder_model_merged")),
    ]


def export_vision_encoder(model: FastVLM, path: Path) -> Path:
    size = model.config.image_size
    pixels = torch.rand(_TRACE_BATCH, 3, size, size)
    batch = torch.export.Dim("batch_size")
    return _export(
        VisionEncoder(model),
        (pixels,),
        path,
        input_names=["pixel_values"],
        output_names=["image_features"],
        dynamic_shapes=({0: batch},),
    )


def export_embed_tokens(model: FastVLM, path: Path) -> Path:
    ids = torch.zeros(_TRACE_BATCH, _TRACE_LENGTH, dtype=torch.long)
    batch, length = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    return _export(
        EmbedTokens(model),
        (ids,),
        path,
        input_names=["input_ids"],
        output_names=["inputs_embeds"],
        dynamic_shapes=({0: batch, 1: length},),
    )


def export_decoder(model: FastVLM, path: Path) -> Path:
    text = model.config.text
    n = text.num_hidden_layers
    b, length, past = _TRACE_BATCH, _TRACE_LENGTH, _TRACE_PAST
    embeds = torch.zeros(b, length, text.hidden_size)
    mask = torch.ones(b, past + length, dtype=torch.long)
    positions = torch.arange(past, past + length).expand(b, length).contiguous()
    kv_heads = int(text.num_key_value_heads or text.num_attention_heads)
    cache = [torch.zeros(b, kv_heads, past, head_dim(model)) for _ in range(2 * n)]
    dim = torch.export.Dim
    batch, seq, past_len = dim("batch_size"), dim("sequence_length"), dim("past_sequence_length")
    total = dim.DYNAMIC  # past + current: derived, named after export
    return _export(
        MergedDecoder(model),
        (embeds, mask, positions, *cache),
        path,
        input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names(n)],
        output_names=["logits", *past_names(n, "present")],
        dynamic_shapes=(
            {0: batch, 1: seq},
            {0: batch, 1: total},
            {0: batch, 1: seq},
            tuple({0: batch, 2: past_len} for _ in range(2 * n)),
        ),
    )


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple[Any, ...],
) -> Path:
    """One graph with the dynamo exporter; weights beside it only when the graph passes 2 GB."""
    big = sum(p.numel() * p.element_size() for p in module.parameters()) >= EXTERNAL_DATA_BYTES
    # With autograd on, the fused tower takes its plain-PyTorch path (fastvlm.vision.kernels):
    # its oneDNN kernels have no ONNX counterpart. Tracing computes nothing, so this costs nothing.
    with torch.enable_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    assert program is not None  # the dynamo exporter returns its program
    program.save(str(path), external_data=big)
    _name_symbolic_dims(path)
    return path


def _name_symbolic_dims(path: Path) -> None:
    """Give the graph's inputs and outputs Transformers.js' dimension names where the exporter left its own
    (``s53``, ``past_sequence_length + sequence_length``); the weights, if stored beside it, stay where they are."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    names = {1: "sequence_length"}
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if not d.dim_param:
                continue
            if i == 0:
                d.dim_param = "batch_size"
            elif value.name.startswith("present.") and i == 2:
                d.dim_param = "total_sequence_length"
            elif value.name in ("logits", "inputs_embeds") and i in names:
                d.dim_param = names[i]
    for value in proto.graph.input:
        if value.name == "attention_mask":
            value.type.tensor_type.shape.dim[1].dim_param = "total_sequence_length"
    onnx.save(proto, str(path))


# ----------------------------------------------------------------------------- model files


def onnx_config(model: FastVLM, image_token: int) -> dict[str, Any]:
    """config.json: the authors' flat ``llava_qwen2`` config, readable by Transformers.js and our runner."""
    config = get_format(CheckpointFormat.LLAVA_QWEN2).config_to_json(model.config)
    text = model.config.text
    config.update(
        image_token_index=image_token,
        head_dim=head_dim(model),
        tokens_per_image=model.config.num_image_tokens(),
        image_size=model.config.image_size,
        image_mode=model.config.image_mode,
        vision_stride=model.config.vision.stride,
        context_length=model.config.context_length,
        eos_token_id=text.eos_token_id,
    )
    return config


def generation_config(model: FastVLM, stops: list[int]) -> dict[str, Any]:
    return {
        "bos_token_id": model.config.text.bos_token_id,
        "eos_token_id": stops,
        "do_sample": False,
        "max_new_tokens": 256,
    }


def preprocessor_config(size: int) -> dict[str, Any]:
    """CLIP-style settings Transformers.js reads: resize, crop, /255, no mean/std (see the module notes)."""
    return {
        "processor_class": "LlavaProcessor",
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "do_convert_rgb": True,
    }


def write_model_files(model: FastVLM, folder: Path) -> None:
    """config.json, generation_config.json, tokenizer and processor files beside ``onnx/``."""
    from fastvlm.generation import stop_token_ids

    image_token = placeholder_token_id(model.config, model.tokenizer)
    files = {
        "config.json": onnx_config(model, image_token),
        "generation_config.json": generation_config(model, sorted(stop_token_ids(model))),
        "preprocessor_config.json": preprocessor_config(model.config.image_size),
        "processor_config.json": {
            "processor_class": "LlavaProcessor",
            "image_token": DEFAULT_IMAGE_TOKEN,
            "patch_size": model.config.vision.stride,
            "num_additional_image_tokens": 0,
        },
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
        # Transformers.js reads the chat template from tokenizer_config.json only (transformers 5 saves
        # a template to chat_template.jinja): put ours there for apply_chat_template.
        tokenizer_config = folder / "tokenizer_config.json"
        settings = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
        settings["chat_template"] = CHAT_TEMPLATE
        tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
