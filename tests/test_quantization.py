"""Weight-only quantization of the decoder: ``FastVLM.from_pretrained(..., quantization=...)``.

int8 runs on our :class:`~fastvlm.linears.Int8WeightOnlyLinear` (our kernel, else ATen's) on CPU,
torchao's tensor with ``kernel="torchao"``; int4 is torchao's. Tolerances were set from the
tiny fixture's measured errors (fp32 activations, CPU): one decoder layer's output is off by
~0.6% (int8) and ~8% (int4, groups of 32); the first-step logits by 1.4% (int8) and 22-34%
(int4: two layers of 8% compound on random weights).
"""

from __future__ import annotations

import sys
from unittest.mock import MagicMock

import pytest
import torch
import torch.nn.functional as F

from fastvlm import native
from fastvlm.cli import main
from fastvlm.errors import CheckpointError, ConfigError
from fastvlm.linears import (
    KERNEL_MAX_ROWS,
    PACKED_KERNEL_MAX_ROWS,
    GemvLinear,
    Int8WeightOnlyLinear,
    quantize_rows_int8,
)
from fastvlm.model import FastVLM
from fastvlm.quantization import (
    decode_step_bytes,
    decoder_linears,
    is_quantized,
    quantize_decoder,
    use_gemv_decode,
    weight_bytes,
)
from tests.conftest import fixture_path

TINY = "apple_fastvlm_tiny"
IMAGE = TINY, "image.png"
PROMPT = "Describe the image."
FIXTURES = ("apple_fastvlm_tiny", "hf_fastvlm_tiny")
LAYER_TOLERANCE = {"int8": 0.015, "int8-head": 0.015, "int4": 0.15}  # measured 0.0072 / 0.086 at most
LOGITS_TOLERANCE = {"int8": 0.05, "int8-head": 0.05, "int4": 0.6}  # measured 0.015 / 0.33 at most
BYTES_RATIO = {"int8": 0.3, "int8-head": 0.3, "int4": 0.22}  # vs fp32; measured 0.26 / 0.1875 (scales included)
STEP_BYTES_RATIO = {"int8": 0.45, "int8-head": 0.27, "int4": 0.4}  # one decode step's reads vs fp32's (tied head)


@pytest.fixture(scope="module")
def reference() -> FastVLM:
    return FastVLM.from_pretrained(fixture_path(TINY))


@pytest.fixture(scope="module", params=["int8", "int8-head", "int4"])
def quantized(request: pytest.FixtureRequest) -> FastVLM:
    return FastVLM.from_pretrained(fixture_path(TINY), quantization=request.param)


def _first_logits(model: FastVLM) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model.language_model(ids).logits[0, -1].float()


def test_decoder_linears_are_int8_layers_or_torchao_tensors(quantized: FastVLM) -> None:
    linears = decoder_linears(quantized)
    head = quantized.quantization == "int8-head"  # the tied head's int8 copy is one more layer
    assert len(linears) == 2 * 7 + head  # q, k, v, o, gate, up, down in each of the two layers
    for name, module in linears.items():
        if quantized.quantization == "int4":
            assert type(module.weight).__name__ == "Int4OpaqueTensor" and is_quantized(module.weight), name
        else:
            assert isinstance(module, Int8WeightOnlyLinear), name
            assert module.qweight.dtype == torch.int8 and module.scales.dtype == torch.bfloat16


def test_int8_with_the_torchao_kernel_is_torchaos_tensor() -> None:
    model = quantize_decoder(FastVLM.from_pretrained(fixture_path(TINY)), "int8", kernel="torchao")
    for name, module in decoder_linears(model).items():
        assert type(module.weight).__name__ == "Int8Tensor" and is_quantized(module.weight), name


def test_int8_head_copies_a_tied_head_and_keeps_the_embedding(reference: FastVLM) -> None:
    model = FastVLM.from_pretrained(fixture_path(TINY), quantization="int8-head")
    lm = model.language_model
    embed = lm.model.embed_tokens.weight
    assert isinstance(lm.lm_head, Int8WeightOnlyLinear)
    assert torch.equal(embed, reference.language_model.model.embed_tokens.weight)
    error = (lm.lm_head.dequantized(torch.float32) - embed).abs() / lm.lm_head.scales.float()[:, None]
    assert error.max() <= 0.5 + 1e-3  # the copy is the embedding rounded to int8, row by row
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():  # the lookups read the untouched embedding
        assert torch.equal(lm.model.embed_tokens(ids), reference.language_model.model.embed_tokens(ids))


def test_tower_projector_and_embeddings_are_untouched(quantized: FastVLM, reference: FastVLM) -> None:
    for part in ("vision_tower", "projector"):
        ours, theirs = getattr(quantized, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == theirs.keys()
        for key, tensor in ours.items():
            assert type(tensor) is torch.Tensor and torch.equal(tensor, theirs[key]), f"{part}.{key}"
    embed = quantized.language_model.model.embed_tokens.weight
    assert type(embed) is torch.nn.Parameter and quantized.dtype == torch.float32
    if quantized.quantization != "int8-head":
        assert quantized.language_model.lm_head.weight is embed  # tied: left as it was


def test_each_layer_stays_close_to_fp32(quantized: FastVLM, reference: FastVLM) -> None:
    torch.manual_seed(0)
    theirs = decoder_linears(reference) | {"lm_head": reference.language_model.lm_head}
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
    if quantized.quantization != "int4":  # int4's error on random tiny weights can flip near-ties
        assert got.argmax() == want.argmax()


def test_generate_runs(quantized: FastVLM) -> None:
    result = quantized.generate(image=fixture_path(*IMAGE), prompt=PROMPT, max_new_tokens=6)
    assert len(result.token_ids) >= 1  # type: ignore[union-attr]


def _fixture_model(fixture: str, variant: str) -> FastVLM:
    if variant.startswith("bf16"):
        model = FastVLM.from_pretrained(fixture_path(fixture), dtype=torch.bfloat16)  # one-row steps via torch.mv
        return use_gemv_decode(model, enabled=False) if variant == "bf16 F.linear" else model
    return FastVLM.from_pretrained(fixture_path(fixture), quantization=variant)


@pytest.mark.parametrize("variant", ["int8", "int8-head", "bf16", "bf16 F.linear"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_greedy_tokens_equal_fp32s_on_the_fixtures(fixture: str, variant: str) -> None:
    kwargs = dict(image=fixture_path(*IMAGE), prompt=PROMPT, max_new_tokens=12)
    want = FastVLM.from_pretrained(fixture_path(fixture)).generate(**kwargs)
    got = _fixture_model(fixture, variant).generate(**kwargs)
    assert got.token_ids == want.token_ids  # type: ignore[union-attr]


@pytest.mark.parametrize("variant", ["int8", "int8-head", "bf16", "bf16 F.linear"])
def test_teacher_forced_top1_mostly_equals_fp32s(variant: str) -> None:
    # 65 text positions, each a next-token prediction; the tiny fixture's random weights give
    # near-tied logits, where int8's rounding flips one or two (measured: 64/65 for int8)
    ids = torch.arange(5, 200, 3).reshape(1, -1)
    with torch.no_grad():
        want = FastVLM.from_pretrained(fixture_path(TINY)).language_model(ids).logits[0]
        got = _fixture_model(TINY, variant).language_model(ids).logits[0].float()
    agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, agreement


def test_decoder_weight_bytes_shrink(quantized: FastVLM, reference: FastVLM) -> None:
    ratio = weight_bytes(quantized) / weight_bytes(reference)
    if quantized.quantization == "int8-head":  # the head copy is counted: compare with fp32's linears + head
        ratio = weight_bytes(quantized) / decode_step_bytes(reference)
    assert ratio < BYTES_RATIO[quantized.quantization], ratio


def test_decode_step_reads_fewer_bytes(quantized: FastVLM, reference: FastVLM) -> None:
    ratio = decode_step_bytes(quantized) / decode_step_bytes(reference)
    assert ratio < STEP_BYTES_RATIO[quantized.quantization], ratio
    lm = reference.language_model
    norms_and_biases = sum(p.numel() for n, p in lm.named_parameters() if n.endswith(("bias", "norm.weight")))
    every_tensor = sum(p.numel() * 4 for p in lm.parameters())  # the tied head is the embedding: listed once
    assert decode_step_bytes(reference) == every_tensor
    embedding = lm.model.embed_tokens.weight.numel()
    assert decode_step_bytes(reference) == weight_bytes(reference) + (embedding + norms_and_biases) * 4


def test_int4_with_bf16_activations() -> None:
    model = FastVLM.from_pretrained(fixture_path(TINY), dtype=torch.bfloat16, quantization="int4")
    assert model.dtype == torch.bfloat16
    result = model.generate(image=fixture_path(*IMAGE), prompt=PROMPT, max_new_tokens=3)
    assert len(result.token_ids) >= 1  # type: ignore[union-attr]


def test_unknown_name_is_refused_before_loading(tmp_path) -> None:
    with pytest.raises(ConfigError, match="int8, int8-head, int4"):
        FastVLM.from_pretrained(tmp_path / "not-there", quantization="int3")


def test_unknown_kernel_is_refused_and_the_model_left_alone(reference: FastVLM) -> None:
    model = FastVLM.from_pretrained(fixture_path(TINY))
    with pytest.raises(ConfigError, match="auto, fastvlm, aten, torchao"):
        quantize_decoder(model, "int8", kernel="fbgemm")
    assert model.quantization is None and all(type(m) is GemvLinear for m in decoder_linears(model).values())


def test_a_quantized_model_is_not_saved_nor_quantized_twice(quantized: FastVLM, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="quantization="):
        quantized.save_pretrained(tmp_path / "out")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_decoder(quantized, "int8")


def test_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    model = FastVLM.from_pretrained(fixture_path(TINY))
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # makes the import fail
    for name, kernel in (("int8", "torchao"), ("int8-head", "torchao"), ("int4", "auto")):
        with pytest.raises(ConfigError, match=r"fastvlm\[export\]"):
            quantize_decoder(model, name, kernel=kernel)
        assert model.quantization is None
    assert type(model.language_model.lm_head) is GemvLinear  # refused before the head was copied
    assert quantize_decoder(model, "int8").quantization == "int8"  # our int8 layer needs no torchao


# ------------------------------------------------------------------ the layers themselves


def test_int8_rows_round_to_the_nearest_step_of_their_bf16_scale() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 40)
    weight[2] = 0  # an all-zero row gets scale 1, not a division by zero
    q, scales = quantize_rows_int8(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and q.abs().max() <= 127
    assert scales[2] == 1 and not q[2].any()
    assert torch.equal(q.abs().amax(1)[[0, 1, 3, 4, 5]] >= 126, torch.ones(5, dtype=torch.bool))  # rows use the range
    steps = (q.float() * scales.float()[:, None] - weight).abs() / scales.float()[:, None]
    assert steps.max() <= 0.5 + 1e-3  # plus the clamp of a max rounded against a slightly small bf16 scale


@pytest.mark.parametrize("pack", [False, True], ids=["aten", "fastvlm"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 64), (1, KERNEL_MAX_ROWS, 64), (2, 20, 64), (1, PACKED_KERNEL_MAX_ROWS + 1, 64)]
)
def test_int8_layer_matches_its_dequantized_weight(shape: tuple[int, ...], pack: bool) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(99, 64), torch.randn(99)  # 99 rows: the packed layout pads its last group
    layer = Int8WeightOnlyLinear.from_weight(weight, bias, pack=pack)
    assert layer.packed == pack and torch.equal(layer.int8_weight(), quantize_rows_int8(weight)[0])
    x = torch.randn(shape)
    got = layer(x)
    assert got.shape == (*shape[:-1], 99) and got.dtype == torch.float32
    dequantized = layer.dequantized(torch.float32)
    if x.numel() // 64 <= KERNEL_MAX_ROWS and not pack:  # ATen's kernel: bf16 input rows, bf16 output
        want = F.linear(x.bfloat16().float(), dequantized, bias)
        torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-3 * float(want.abs().max()))
    else:  # our kernel (fp32 rows) or, prefill-sized, the dequantized weight in the input's dtype
        torch.testing.assert_close(got, F.linear(x, dequantized, bias), rtol=1e-5, atol=1e-5)


def test_int8_layer_runs_in_bf16_and_refuses_a_float_weight() -> None:
    layer = Int8WeightOnlyLinear.from_weight(torch.randn(32, 16))
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        Int8WeightOnlyLinear(torch.randn(32, 16), torch.ones(32), None)
    with pytest.raises(ValueError, match=r"\[out\] scales"):
        Int8WeightOnlyLinear(torch.zeros(32, 16, dtype=torch.int8), torch.ones(16), None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_linear_gives_linears_result_with_the_same_parameters(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(dtype)
    gemv = GemvLinear.from_linear(linear)
    assert gemv.weight is linear.weight and gemv.state_dict().keys() == linear.state_dict().keys()
    for shape in [(1, 1, 64), (64,), (3, 5, 64)]:
        x = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            got, want = gemv(x), linear(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("in_features", [24, 0])  # not a multiple of 16, and empty: never our kernel
def test_gemv_linear_sends_widths_our_kernel_cannot_take_to_aten(
    in_features: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = MagicMock(side_effect=AssertionError("our kernel was called"))
    monkeypatch.setattr(native, "float16_kernel", lambda: kernel)
    mv = MagicMock(wraps=torch.mv)
    monkeypatch.setattr(torch, "mv", mv)
    linear = torch.nn.Linear(in_features, 8).to(torch.bfloat16)
    gemv = GemvLinear.from_linear(linear)
    with torch.no_grad():
        for rows in (1, 3):
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            torch.testing.assert_close(gemv(x).float(), linear(x).float(), rtol=2**-7, atol=1e-2)
    assert not kernel.called
    assert mv.call_count == (1 if in_features else 0)  # one row of a non-empty width: torch.mv; three rows: F.linear


def test_gemv_linear_keeps_autograd_where_a_gradient_is_wanted() -> None:
    """Our kernel has no backward: a one-row bf16 input with gradients on takes ATen's ops, and their gradients."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    gemv = GemvLinear.from_linear(torch.nn.Linear(64, 48).to(torch.bfloat16))
    gemv.load_state_dict(linear.state_dict())
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    for layer in (linear, gemv):
        layer(x).float().square().sum().backward()
    assert gemv.weight.grad is not None and gemv.bias is not None and gemv.bias.grad is not None
    torch.testing.assert_close(gemv.weight.grad.float(), linear.weight.grad.float(), rtol=2**-6, atol=1e-2)
    torch.testing.assert_close(gemv.bias.grad.float(), linear.bias.grad.float(), rtol=2**-6, atol=1e-2)


@pytest.mark.parametrize("path", ["kernel", "mv"])
def test_every_model_decodes_one_row_through_the_gemv_path_keeping_the_head_tied_and_the_state_dict(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One row takes our bf16 kernel where it is built (``kernel``), else torch.mv (``mv``: as without one)."""
    kernel = native.float16_kernel()
    if path == "kernel" and kernel is None:
        pytest.skip("fastvlm's CPU kernels did not build")
    gemv = MagicMock(wraps=kernel if path == "kernel" else torch.mv)
    monkeypatch.setattr(native, "float16_kernel", lambda: gemv if path == "kernel" else None)
    if path == "mv":
        monkeypatch.setattr(torch, "mv", gemv)
    model = FastVLM.from_pretrained(fixture_path(TINY), dtype=torch.bfloat16)
    lm = model.language_model
    assert isinstance(lm.lm_head, GemvLinear) and lm.lm_head.weight is lm.model.embed_tokens.weight
    assert all(isinstance(m, GemvLinear) and m.use_mv for m in decoder_linears(model).values())
    keys = model.state_dict().keys()
    layers = [m for m in lm.modules() if isinstance(m, GemvLinear)]  # decoder_linears leaves out a tied head
    one_row = torch.tensor([[5]])  # one token: every linear layer sees one row, the GEMV path
    with torch.no_grad():
        gemv_logits = lm(one_row).logits
        assert gemv.call_count == len(layers)  # each layer, the tied head included, took the path
        use_gemv_decode(model, enabled=False)  # every input through F.linear: the same function
        assert not any(m.use_mv for m in layers)
        linear_logits = lm(one_row).logits
        assert gemv.call_count == len(layers)  # no further call
    # the same function up to the order of the fp32 sums, each layer's output rounded to bf16
    # (steps of 2**-7 relative): a few such steps at the scale of the largest logit, same argmax
    scale = gemv_logits.float().abs().max().item()
    torch.testing.assert_close(linear_logits.float(), gemv_logits.float(), rtol=0, atol=4 * 2**-7 * scale)
    assert torch.equal(linear_logits.argmax(-1), gemv_logits.argmax(-1))
    assert model.state_dict().keys() == keys and lm.lm_head.weight is lm.model.embed_tokens.weight


def test_cli_predict_quantization(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["predict", "--model", str(fixture_path(TINY)), "--image", str(fixture_path(*IMAGE))]
    assert main([*args, "--prompt", PROMPT, "--max-new-tokens", "3", "--quantization", "int8", "--json"]) == 0
    assert '"token_ids"' in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse lists the choices
        main([*args, "--prompt", PROMPT, "--quantization", "int2"])


def test_the_model_names_each_stage_form(quantized: FastVLM) -> None:
    assert quantized.stage_precision() == {"encoder": "fp32", "decoder": quantized.quantization}
