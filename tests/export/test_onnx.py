"""`fastvlm export onnx` and the onnxruntime runner against PyTorch on the fixture checkpoints.

Each fixture (the authors' llava_qwen2 format and transformers' fast_vlm format) is
exported once per module; the graphs must reproduce PyTorch's vision features and the
logits of every decoding step within the fixtures' rule (1e-4 relative), and greedy
decoding must pick the same tokens. Bad exports fail before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from fastvlm.cli import main
from fastvlm.decoding import decoder_step, prefill
from fastvlm.errors import CheckpointError, CheckpointNotFoundError, ConfigError, OutputExistsError
from fastvlm.export import onnx as onnx_export
from fastvlm.export.onnx import export_onnx
from fastvlm.export.runner import OnnxFastVLM
from fastvlm.files import leftover_dirs
from fastvlm.generation import GenerationResult, Timings, prepare_prompt
from fastvlm.model import FastVLM
from fastvlm.processing import CHAT_TEMPLATE, tokenize_prompt
from tests.conftest import assert_close_to_reference, fixture_path

FORMATS = ("apple_fastvlm_tiny", "hf_fastvlm_tiny")
IMAGE = fixture_path("apple_fastvlm_tiny", "image.png")


@pytest.fixture(scope="module", params=FORMATS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[FastVLM, Path]:
    """(the PyTorch model, its exported folder) for each fixture format."""
    source = fixture_path(request.param)
    out = tmp_path_factory.mktemp(request.param) / "onnx_model"
    export_onnx(source, out)
    return FastVLM.from_pretrained(source), out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The fixture image (300x180) and two more: a tall noise image and a small square gradient."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    tall = folder / "tall.png"
    Image.fromarray(rng.integers(0, 256, (240, 90, 3), dtype=np.uint8)).save(tall)
    square = folder / "square.png"
    ramp = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    Image.fromarray(ramp).save(square)
    return [IMAGE, tall, square]


def _relative_diff(actual: np.ndarray, reference: torch.Tensor) -> float:
    ref = reference.float().numpy()
    return float(np.abs(actual - ref).max() / max(1.0, np.abs(ref).max()))


# ----------------------------------------------------------------------------- the folder


def test_the_folder_has_the_graphs_and_files_transformers_js_loads(exported: tuple[FastVLM, Path]) -> None:
    model, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json"} <= names
    assert "tokenizer.json" in names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_qwen2"
    assert config["architectures"] == ["LlavaQwen2ForCausalLM"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert model.tokenizer is not None
    assert config["image_token_index"] == model.tokenizer.convert_tokens_to_ids("<image>") == 3
    decoder = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in decoder.graph.input}
    text = model.config.text
    head_dim = text.hidden_size // text.num_attention_heads
    assert dims["past_key_values.0.key"] == ["batch_size", text.num_key_value_heads, "past_sequence_length", head_dim]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["inputs_embeds"] == ["batch_size", "sequence_length", text.hidden_size]
    outputs = [v.name for v in decoder.graph.output]
    assert outputs[0] == "logits" and f"present.{text.num_hidden_layers - 1}.value" in outputs


# ----------------------------------------------------------------------------- numbers


def test_vision_features_match_pytorch(exported: tuple[FastVLM, Path], images: list[Path]) -> None:
    model, out = exported
    runner = OnnxFastVLM.from_pretrained(out)
    pixels = model.image_processor.batch(images)  # a batch of 3: the batch axis is dynamic
    with torch.inference_mode():
        reference = model.encode_images(pixels)
    features = runner.encode_images(pixels)
    assert_close_to_reference(torch.from_numpy(features), reference)
    print(f"vision max relative diff {_relative_diff(features, reference):.2e}")


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_every_decoding_steps_logits_match_pytorch(exported: tuple[FastVLM, Path], with_image: bool) -> None:
    model, out = exported
    runner = OnnxFastVLM.from_pretrained(out)
    pixels = model.image_processor(IMAGE)[None] if with_image else None
    prompt = "What is in the picture?"
    features = runner.encode_images(pixels) if pixels is not None else None
    steps = list(runner.steps(runner.prompt_ids(prompt, with_image), features, 12, Timings()))
    assert len(steps) >= 2
    assert model.tokenizer is not None
    ids = torch.tensor([tokenize_prompt(model.tokenizer, prepare_prompt(prompt, with_image))])
    worst = 0.0
    with torch.inference_mode():
        inputs = model.prepare_inputs(ids, pixel_values=pixels)
        cache, logits = prefill(model, inputs)
        mask, position = inputs.attention_mask, inputs.position_ids[:, -1:] + 1
        for step in steps:
            assert_close_to_reference(torch.from_numpy(step.logits), logits[0])
            worst = max(worst, _relative_diff(step.logits, logits[0]))
            assert step.token == int(logits[0].argmax())
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            token = torch.tensor([[step.token]])
            logits = decoder_step(model, cache, input_ids=token, attention_mask=mask, position_ids=position)
            position = position + 1
    print(f"{len(steps)} steps, logits max relative diff {worst:.2e}")


def test_greedy_tokens_match_pytorch_for_images_and_prompts(exported: tuple[FastVLM, Path], images: list[Path]) -> None:
    model, out = exported
    runner = OnnxFastVLM.from_pretrained(out)
    cases = [
        (images[0], "Describe the image."),
        (images[1], "What colour is the top left corner?"),
        (images[2], "How many objects are there? Answer briefly."),
        (None, "Write a haiku about the sea."),
    ]
    for image, prompt in cases:
        ours = runner.generate(image, prompt, max_new_tokens=16)
        reference = model.generate(image, prompt, max_new_tokens=16)
        assert isinstance(reference, GenerationResult)
        assert ours.token_ids == reference.token_ids, (image, prompt)
        assert ours.text == reference.text and ours.finish_reason == reference.finish_reason
        assert ours.timings.new_tokens > 0 and ours.timings.prefill_ms > 0


def test_predict_with_the_onnx_backend_gives_the_torch_answer(
    exported: tuple[FastVLM, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, out = exported
    common = ["--image", str(IMAGE), "--prompt", "Describe it.", "--max-new-tokens", "8", "--json"]
    assert main(["predict", "--backend", "onnx", "--model", str(out), *common]) == 0
    onnx_answer = json.loads(capsys.readouterr().out)
    reference = model.generate(IMAGE, "Describe it.", max_new_tokens=8)
    assert isinstance(reference, GenerationResult)
    assert onnx_answer["token_ids"] == reference.token_ids
    assert onnx_answer["timings"]["vision_ms"] > 0


def test_a_missing_variant_is_named(exported: tuple[FastVLM, Path]) -> None:
    with pytest.raises(CheckpointNotFoundError, match="vision_encoder_q4.onnx"):
        OnnxFastVLM.from_pretrained(exported[1], variant="q4")


# ----------------------------------------------------------------------------- errors


def test_an_image_size_off_the_stride_fails_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="multiple of the vision tower's stride 64"):
        export_onnx(fixture_path("apple_fastvlm_tiny"), out, image_size=200)
    assert not out.exists() and not leftover_dirs(tmp_path)
    assert main(["export", "onnx", str(fixture_path("hf_fastvlm_tiny")), str(out), "--image-size", "100"]) == 2
    assert not out.exists() and not leftover_dirs(tmp_path)


def test_an_unknown_variant_fails_before_any_tracing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was loaded before the variant names were checked")

    monkeypatch.setattr(FastVLM, "from_pretrained", no_loading)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="unknown ONNX variant.*'int3'"):
        export_onnx(fixture_path("apple_fastvlm_tiny"), out, variants=["int8", "int3"])
    assert not out.exists() and not leftover_dirs(tmp_path)


def test_a_folder_that_is_no_fastvlm_checkpoint_fails_before_anything_is_written(tmp_path: Path) -> None:
    foreign = tmp_path / "bert"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="model_type 'bert' is not a FastVLM checkpoint"):
        export_onnx(foreign, out)
    with pytest.raises(CheckpointNotFoundError):
        export_onnx(tmp_path / "missing", out)
    assert not out.exists() and not leftover_dirs(tmp_path)


def test_an_existing_output_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_onnx(fixture_path("apple_fastvlm_tiny"), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_interrupted_export_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_vision(model: FastVLM, path: Path) -> Path:  # the slowest graph: its bytes do not matter here
        path.write_bytes(b"not a graph")
        return path

    def interrupted(model: FastVLM, path: Path) -> Path:
        path.write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_vision_encoder", fake_vision)
    monkeypatch.setattr(onnx_export, "export_decoder", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(fixture_path("hf_fastvlm_tiny"), out)
    assert not out.exists() and not leftover_dirs(tmp_path)


def test_the_command_lines_variant_choices_are_the_runners() -> None:
    from fastvlm.cli.export import ONNX_VARIANTS, QUANTIZED_VARIANTS
    from fastvlm.export.runner import VARIANT_SUFFIXES

    assert list(ONNX_VARIANTS) == list(VARIANT_SUFFIXES)
    assert set(QUANTIZED_VARIANTS) == set(VARIANT_SUFFIXES) - {"fp32", "fp16"}


def test_overwrite_replaces_an_existing_folder_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_graph(model: FastVLM, path: Path) -> Path:  # the folder's handling is under test, not the graphs
        path.write_bytes(b"graph")
        return path

    for name in ("export_vision_encoder", "export_embed_tokens", "export_decoder"):
        monkeypatch.setattr(onnx_export, name, fake_graph)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    export_onnx(fixture_path("apple_fastvlm_tiny"), out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "onnx" / "decoder_model_merged.onnx").is_file()
    assert (out / "config.json").is_file() and not leftover_dirs(tmp_path)
