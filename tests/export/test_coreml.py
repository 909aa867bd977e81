"""`fastvlm export coreml`: the vision encoder as a Core ML program, inspected from its spec.

coremltools converts on Linux but runs models on macOS only, so the program is checked
from ``get_spec()`` (inputs, outputs, weight types, the MIL op set) everywhere and run
against PyTorch only on macOS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fastvlm.errors import CheckpointError, CheckpointNotFoundError, ConfigError, OutputExistsError
from fastvlm.files import leftover_dirs
from fastvlm.model import FastVLM
from tests.conftest import fixture_path

ct = pytest.importorskip("coremltools", reason="the Core ML export needs coremltools (the export extra)")

from fastvlm.export import coreml  # noqa: E402  # after the importorskip

# coremltools 9 calls its own deprecated registry on every op it converts
pytestmark = pytest.mark.filterwarnings("ignore:Function _TORCH_OPS_REGISTRY:DeprecationWarning")

APPLE = "apple_fastvlm_tiny"
HF = "hf_fastvlm_tiny"
# MIL data types (coremltools' MIL.proto) and feature types (FeatureTypes.proto).
MIL_FP16, MIL_FP32 = 10, 11
ARRAY_FP32 = 65568
# Every op the fused encoder may become: convolutions, the projections, attention spelt out
# (iOS 16 has no fused attention op), the normalisations and activations, and the reshapes
# between them. Anything else is a surprise worth looking at.
ALLOWED_OPS = {
    "add",
    "cast",
    "const",
    "conv",
    "expand_dims",
    "gelu",
    "layer_norm",
    "linear",
    "matmul",
    "mul",
    "real_div",
    "reduce_mean",
    "relu",
    "reshape",
    "sigmoid",
    "softmax",
    "split",
    "squeeze",
    "sub",
    "tile",
    "transpose",
}
KEY_OPS = {"conv", "linear", "matmul", "softmax", "gelu", "layer_norm"}

EXPORTS = {  # name -> (fixture, precision, input kind)
    "apple-fp16-image": (APPLE, "fp16", "image"),
    "hf-fp32-tensor": (HF, "fp32", "tensor"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[coreml.CoreMLExport, Any]]:
    """Each export of EXPORTS, converted once: its result and the saved package's spec."""
    results = {}
    for name, (fixture, precision, kind) in EXPORTS.items():
        out = tmp_path_factory.mktemp("coreml") / name
        result = coreml.export_coreml(fixture_path(fixture), out, precision=precision, input_kind=kind)
        spec = ct.utils.load_spec(str(out / coreml.ENCODER_FILE))
        results[name] = (result, spec)
    return results


def mil_operations(spec: Any) -> list[Any]:
    """Every operation of the program's functions, nested blocks included."""
    found: list[Any] = []

    def walk(block: Any) -> None:
        for op in block.operations:
            found.append(op)
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return found


def weight_types(spec: Any) -> set[int]:
    """The MIL data types of the weights of every conv and linear op."""
    ops = mil_operations(spec)
    const_types = {
        output.name: output.type.tensorType.dataType for op in ops if op.type == "const" for output in op.outputs
    }
    return {const_types[op.inputs["weight"].arguments[0].name] for op in ops if op.type in ("conv", "linear")}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_the_program_takes_the_checkpoint_resolution_and_gives_projected_tokens(exported, name):
    result, spec = exported[name]
    fixture, precision, kind = EXPORTS[name]
    model = FastVLM.from_pretrained(fixture_path(fixture))
    size, tokens, hidden = model.config.image_size, model.config.num_image_tokens(), model.config.hidden_size
    assert (result.image_size, result.tokens, result.hidden_size) == (size, tokens, hidden)

    (inp,) = spec.description.input
    assert inp.name == coreml.INPUT_NAME
    if kind == "image":
        assert inp.type.WhichOneof("Type") == "imageType"
        assert (inp.type.imageType.width, inp.type.imageType.height) == (size, size)
        assert inp.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    else:
        assert list(inp.type.multiArrayType.shape) == [1, 3, size, size]
    (out,) = spec.description.output
    assert out.name == coreml.OUTPUT_NAME
    assert list(out.type.multiArrayType.shape) == [1, tokens, hidden]
    assert out.type.multiArrayType.dataType == ARRAY_FP32

    assert weight_types(spec) == {MIL_FP16 if precision == "fp16" else MIL_FP32}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_the_program_uses_only_the_expected_ops(exported, name):
    ops = {op.type for op in mil_operations(exported[name][1])}
    assert ops <= ALLOWED_OPS, f"unexpected ops: {sorted(ops - ALLOWED_OPS)}"
    assert ops >= KEY_OPS, f"missing ops: {sorted(KEY_OPS - ops)}"


def test_the_folder_holds_the_package_and_its_description(exported):
    result, _ = exported["apple-fp16-image"]
    out = Path(result.out)
    assert sorted(p.name for p in out.iterdir()) == sorted([coreml.ENCODER_FILE, coreml.INFO_FILE])
    info = json.loads((out / coreml.INFO_FILE).read_text())
    assert info["input"] == {
        "name": "images",
        "kind": "image",
        "shape": [1, 3, result.image_size, result.image_size],
        "color_layout": "RGB",
        "scale": "1/255",
        "preprocessing": f"pad to square, bicubic resize to {result.image_size}, outside the model",
    }
    assert info["output"] == {
        "name": "image_features",
        "shape": [1, result.tokens, result.hidden_size],
        "dtype": "float32",
    }
    assert info["precision"] == "fp16"
    assert Path(info["source"]) == fixture_path(APPLE)
    assert leftover_dirs(out.parent) == []


@pytest.mark.skipif(sys.platform != "darwin", reason="coremltools runs models on macOS only")
def test_the_program_computes_what_pytorch_computes(exported):
    from PIL import Image

    for name, (fixture, precision, kind) in EXPORTS.items():
        result, _ = exported[name]
        model = FastVLM.from_pretrained(fixture_path(fixture))
        pixels = model.image_processor(fixture_path(APPLE, "image.png")).unsqueeze(0)
        expected = model.encode_images(pixels).numpy()
        mlmodel = ct.models.MLModel(str(Path(result.out) / coreml.ENCODER_FILE))
        if kind == "image":
            rgb = (pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            feed: Any = Image.fromarray(rgb, "RGB")
        else:
            feed = pixels.numpy()
        got = mlmodel.predict({coreml.INPUT_NAME: feed})[coreml.OUTPUT_NAME]
        tolerance = 5e-2 if precision == "fp16" else 1e-3
        scale = float(np.abs(expected).max())
        assert np.abs(got - expected).max() <= tolerance * scale, name


# ----------------------------------------------------------------------------- refusals


def test_an_image_size_off_the_stride_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="not a multiple of the vision tower's stride 64; use e.g. 256 or 320"):
        coreml.export_coreml(fixture_path(APPLE), out, image_size=300)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_or_unknown_checkpoint_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointNotFoundError):
        coreml.export_coreml(tmp_path / "nowhere", out)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError):
        coreml.export_coreml(unknown, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unknown"]


def test_bad_options_and_an_existing_folder_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of fp16, fp32"):
        coreml.export_coreml(fixture_path(APPLE), tmp_path / "a", precision="int8")
    with pytest.raises(ConfigError, match="input kind"):
        coreml.export_coreml(fixture_path(APPLE), tmp_path / "a", input_kind="video")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        coreml.export_coreml(fixture_path(APPLE), tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


class FakePackage:
    """Stands in for a converted model (the real conversion is tested above): saves a folder."""

    def save(self, path: str) -> None:
        Path(path).mkdir()
        (Path(path) / "Manifest.json").write_text("{}")


def test_an_interrupted_export_leaves_no_folder(tmp_path, monkeypatch):
    def interrupted(path: Path, result: coreml.CoreMLExport) -> None:
        assert (path.parent / coreml.ENCODER_FILE).is_dir()  # the package is already written
        raise KeyboardInterrupt

    monkeypatch.setattr(coreml, "convert", lambda *args, **kwargs: FakePackage())
    monkeypatch.setattr(coreml, "write_info", interrupted)
    with pytest.raises(KeyboardInterrupt):
        coreml.export_coreml(fixture_path(HF), tmp_path / "out", precision="fp32")
    assert list(tmp_path.iterdir()) == []


def test_the_captured_program_computes_what_encode_images_computes():
    """The first half of the route, checked everywhere: the fp32 encoder that is captured, and the
    ExportedProgram coremltools converts, give PyTorch's features (the second half runs on macOS)."""
    model = FastVLM.from_pretrained(fixture_path(HF))
    encoder, config, source = coreml.load_encoder(fixture_path(HF))
    assert (config.image_size, source) == (model.config.image_size, str(fixture_path(HF)))
    pixels = torch.rand(1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.encode_images(pixels)
        torch.testing.assert_close(encoder(pixels), expected, atol=1e-4, rtol=1e-4)
        program = coreml.capture(encoder, config.image_size)
        torch.testing.assert_close(program.module()(pixels), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- command line


def test_the_command_line_choices_are_the_exporters():
    from fastvlm.cli import export_coreml as command

    assert command.PRECISIONS == coreml.PRECISIONS
    assert command.INPUT_KINDS == coreml.INPUT_KINDS


def test_fastvlm_export_coreml_writes_the_folder_at_the_size_asked(tmp_path, capsys):
    from fastvlm.cli import main

    out = tmp_path / "out"
    argv = ["export", "coreml", str(fixture_path(APPLE)), str(out), "--image-size", "128"]  # fp32 by default
    assert main(argv) == 0
    assert "image_features 1x4x64, fp32" in capsys.readouterr().out
    info = json.loads((out / coreml.INFO_FILE).read_text())
    assert (info["image_size"], info["tokens"], info["precision"]) == (128, 4, "fp32")
    assert main(argv) == 2  # the folder exists now
    assert "already exists" in capsys.readouterr().err


def test_fastvlm_export_coreml_refuses_a_size_off_the_stride_in_one_line(tmp_path, capsys):
    from fastvlm.cli import main

    out = tmp_path / "out"
    assert main(["export", "coreml", str(fixture_path(APPLE)), str(out), "--image-size", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastvlm export: error: image size 100 is not a multiple") and err.count("\n") == 1
    assert not out.exists()
