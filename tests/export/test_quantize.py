"""The quantized and half-precision ONNX variants: written, loadable, made of the expected ops,
and close to the fp32 graphs on small graphs shaped like FastVLM's three (a strided-conv
vision encoder with MLP layers, an embedding table, a decoder of MatMuls)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fastvlm.errors import ConfigError
from fastvlm.export.quantize import GRAPHS, VARIANTS, graph_bytes, variant_path, write_variants

ort = pytest.importorskip("onnxruntime")

VOCAB, WIDTH = 1000, 128


class VisionEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 64, kernel_size=4, stride=4)
        self.up = nn.Linear(64, WIDTH * 2)
        self.down = nn.Linear(WIDTH * 2, WIDTH)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, N, 64)
        return self.down(nn.functional.gelu(self.up(patches)))  # (B, N, WIDTH)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, WIDTH * 2)
        self.down = nn.Linear(WIDTH * 2, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        hidden = inputs_embeds + self.down(nn.functional.gelu(self.up(inputs_embeds)))
        return self.head(hidden)  # (B, T, VOCAB)


def example_inputs() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "vision_encoder": {"pixel_values": rng.random((1, 3, 64, 64), dtype=np.float32)},
        "embed_tokens": {"input_ids": rng.integers(0, VOCAB, (1, 8), dtype=np.int64)},
        "decoder_model_merged": {"inputs_embeds": rng.standard_normal((1, 8, WIDTH), dtype=np.float32) * 0.02},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the three fp32 graphs, and every variant written beside them."""
    folder = tmp_path_factory.mktemp("exported")
    (folder / "onnx").mkdir()
    torch.manual_seed(0)
    modules = {
        "vision_encoder": VisionEncoder(),
        "embed_tokens": nn.Embedding(VOCAB, WIDTH),
        "decoder_model_merged": Decoder(),
    }
    for graph, inputs in example_inputs().items():
        torch.onnx.export(
            modules[graph].eval(),
            tuple(torch.from_numpy(value) for value in inputs.values()),
            str(variant_path(folder, graph, None)),
            input_names=list(inputs),
            output_names=["output"],
            dynamo=False,
        )
    write_variants(folder, VARIANTS)
    return folder


def run(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def op_types(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(path).graph.node)


def float16_initializers(path: Path) -> int:
    return sum(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(path).graph.initializer)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_of_each_graph_is_written_smaller_and_loads(exported: Path, variant: str) -> None:
    for graph in GRAPHS:
        path = variant_path(exported, graph, variant)
        assert path.name == f"{graph}_{variant}.onnx"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # Callers feed every variant the fp32 graph's tensors: float32 in, float32 out.
        fp32 = ort.InferenceSession(str(variant_path(exported, graph, None)))
        assert [(i.name, i.type) for i in session.get_inputs()] == [(i.name, i.type) for i in fp32.get_inputs()]
        assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
        if not (variant == "q4" and graph == "embed_tokens"):  # no MatMul to quantize there
            assert graph_bytes(path) < 0.6 * graph_bytes(variant_path(exported, graph, None))


def test_variants_are_made_of_the_ops_their_method_writes(exported: Path) -> None:
    decoder = {variant: variant_path(exported, "decoder_model_merged", variant) for variant in VARIANTS}
    assert float16_initializers(decoder["fp16"]) >= 3 and "MatMul" in op_types(decoder["fp16"])
    for variant in ("int8", "uint8"):
        ops = op_types(decoder[variant])
        assert ops["MatMulInteger"] == 3 and ops["DynamicQuantizeLinear"] > 0 and not ops["MatMul"]
        embed = op_types(variant_path(exported, "embed_tokens", variant))
        assert embed["DequantizeLinear"] == 1
        # The convolution stays float32 (no int8 ConvInteger kernel on onnxruntime's CPU provider).
        assert op_types(variant_path(exported, "vision_encoder", variant))["Conv"] == 1
    weight_types = {
        variant: {t.data_type for t in onnx.load(decoder[variant]).graph.initializer if len(t.dims) == 2}
        for variant in ("int8", "uint8")
    }
    assert onnx.TensorProto.INT8 in weight_types["int8"] and onnx.TensorProto.UINT8 in weight_types["uint8"]
    for variant in ("q4", "q4f16"):
        ops = op_types(decoder[variant])
        assert ops["MatMulNBits"] == 3 and not ops["MatMul"]
        assert op_types(variant_path(exported, "vision_encoder", variant))["MatMulNBits"] == 2
    assert float16_initializers(decoder["q4f16"]) > 0 and float16_initializers(decoder["q4"]) == 0


# Largest |variant - fp32| / max |fp32| over the three graphs, measured with onnxruntime 1.32:
# fp16 5.1e-4, int8 1.2e-2, uint8 1.4e-2, q4 8.3e-2, q4f16 8.3e-2. Each bound leaves about 2x,
# and each is below the next coarser variant's measured error, so a wrong variant would fail.
RELATIVE_ERROR = {"fp16": 1.5e-3, "int8": 3e-2, "uint8": 3e-2, "q4": 0.15, "q4f16": 0.15}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_outputs_stay_near_fp32(exported: Path, variant: str) -> None:
    for graph, inputs in example_inputs().items():
        reference = run(variant_path(exported, graph, None), inputs)
        actual = run(variant_path(exported, graph, variant), inputs)
        error = np.abs(actual - reference).max() / np.abs(reference).max()
        assert error <= RELATIVE_ERROR[variant], (graph, error)


def test_quantized_decoder_still_picks_the_fp32_top_token_mostly(exported: Path) -> None:
    inputs = example_inputs()["decoder_model_merged"]
    reference = run(variant_path(exported, "decoder_model_merged", None), inputs).argmax(-1)
    for variant in VARIANTS:
        actual = run(variant_path(exported, "decoder_model_merged", variant), inputs).argmax(-1)
        assert (actual == reference).mean() >= 0.75, variant


def test_unknown_variant_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'int3'.*fp16, int8, uint8, q4, q4f16"):
        write_variants(tmp_path, ["int8", "int3"])
    assert not any(tmp_path.iterdir())


def test_missing_fp32_graphs_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="decoder_model_merged.onnx"):
        write_variants(tmp_path, ["q4"])
