"""torchao weight-only quantization of the decoder: ``FastVLM.from_pretrained(..., quantization=...)``.

Tolerances were set from the tiny fixture's measured errors (fp32 activations, CPU): one
decoder layer's output is off by ~0.6% (int8) and ~8% (int4, groups of 32); the first-step
logits by 1.4% (int8) and 22-34% (int4: two layers of 8% compound on random weights).
"""

from __future__ import annotations

import sys

import pytest
import torch

from fastvlm.cli import main
from fastvlm.errors import CheckpointError, ConfigError
from fastvlm.model import FastVLM
from fastvlm.quantization import decoder_linears, is_quantized, quantize_decoder, weight_bytes
from tests.conftest import fixture_path

TINY = "apple_fastvlm_tiny"
IMAGE = TINY, "image.png"
PROMPT = "Describe the image."
LAYER_TOLERANCE = {"int8": 0.015, "int4": 0.15}  # measured 0.0072 / 0.086 at most
LOGITS_TOLERANCE = {"int8": 0.05, "int4": 0.6}  # measured 0.015 / 0.33 at most
BYTES_RATIO = {"int8": 0.3, "int4": 0.22}  # vs fp32; measured 0.267 / 0.1875 (scales included)


@pytest.fixture(scope="module")
def reference() -> FastVLM:
    return FastVLM.from_pretrained(fixture_path(TINY))


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request: pytest.FixtureRequest) -> FastVLM:
    return FastVLM.from_pretrained(fixture_path(TINY), quantization=request.param)


def _first_logits(model: FastVLM) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model.language_model(ids).logits[0, -1].float()


def test_decoder_linears_are_torchao_tensors(quantized: FastVLM) -> None:
    assert quantized.quantization in ("int8", "int4")
    expected = "Int8Tensor" if quantized.quantization == "int8" else "Int4OpaqueTensor"
    linears = decoder_linears(quantized)
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    for name, module in linears.items():
        assert type(module.weight).__name__ == expected, name
        assert is_quantized(module.weight)


def test_tower_projector_and_embeddings_are_untouched(quantized: FastVLM, reference: FastVLM) -> None:
    for part in ("vision_tower", "projector"):
        ours, theirs = getattr(quantized, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == theirs.keys()
        for key, tensor in ours.items():
            assert type(tensor) is torch.Tensor and torch.equal(tensor, theirs[key]), f"{part}.{key}"
    embed = quantized.language_model.model.embed_tokens.weight
    assert type(embed) is torch.nn.Parameter and quantized.dtype == torch.float32
    assert quantized.language_model.lm_head.weight is embed  # tied: left as it was


def test_each_layer_stays_close_to_fp32(quantized: FastVLM, reference: FastVLM) -> None:
    torch.manual_seed(0)
    theirs = decoder_linears(reference)
    for name, module in decoder_linears(quantized).items():
        x = torch.randn(4, module.in_features)
        with torch.no_grad():
            want, got = theirs[name](x), module(x)
        error = ((got - want).norm() / want.norm()).item()
        assert error < LAYER_TOLERANCE[quantized.quantization], (name, error)


def test_first_step_logits_stay_close_to_fp32(quantized: FastVLM, reference: FastVLM) -> None:
    want, got = _first_logits(reference), _first_logits(quantized)
    error = ((got - want).norm() / want.norm()).item()
    assert error < LOGITS_TOLERANCE[quantized.quantization], error
    if quantized.quantization == "int8":  # int4's error on random tiny weights can flip near-ties
        assert got.argmax() == want.argmax()


def test_generate_runs(quantized: FastVLM, reference: FastVLM) -> None:
    result = quantized.generate(image=fixture_path(*IMAGE), prompt=PROMPT, max_new_tokens=6)
    assert len(result.token_ids) >= 1  # type: ignore[union-attr]
    if quantized.quantization == "int8":  # greedy answers agree with fp32's on the fixture
        want = reference.generate(image=fixture_path(*IMAGE), prompt=PROMPT, max_new_tokens=6)
        assert result.token_ids == want.token_ids  # type: ignore[union-attr]


def test_decoder_weight_bytes_shrink(quantized: FastVLM, reference: FastVLM) -> None:
    ratio = weight_bytes(quantized) / weight_bytes(reference)
    assert ratio < BYTES_RATIO[quantized.quantization], ratio


def test_int4_with_bf16_activations() -> None:
    model = FastVLM.from_pretrained(fixture_path(TINY), dtype=torch.bfloat16, quantization="int4")
    assert model.dtype == torch.bfloat16
    result = model.generate(image=fixture_path(*IMAGE), prompt=PROMPT, max_new_tokens=3)
    assert len(result.token_ids) >= 1  # type: ignore[union-attr]


def test_unknown_name_is_refused_before_loading(tmp_path) -> None:
    with pytest.raises(ConfigError, match="int8, int4"):
        FastVLM.from_pretrained(tmp_path / "not-there", quantization="int3")


def test_a_quantized_model_is_not_saved_nor_quantized_twice(quantized: FastVLM, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="quantization="):
        quantized.save_pretrained(tmp_path / "out")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_decoder(quantized, "int8")


def test_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    model = FastVLM.from_pretrained(fixture_path(TINY))
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"fastvlm\[export\]"):
        quantize_decoder(model, "int8")
    assert model.quantization is None


def test_cli_predict_quantization(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["predict", "--model", str(fixture_path(TINY)), "--image", str(fixture_path(*IMAGE))]
    assert main([*args, "--prompt", PROMPT, "--max-new-tokens", "3", "--quantization", "int8", "--json"]) == 0
    assert '"token_ids"' in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse lists the choices
        main([*args, "--prompt", PROMPT, "--quantization", "int2"])
