"""Every layer of a decode step in one compiled call (``fastvlm.decoding.NativeLayers``) against the Python loop.

The op makes the same ATen calls in the same order as :class:`CachedDecoder`'s loop, so the
comparisons here are ``torch.equal``, not a tolerance: logits and the key/value buffers.
"""

from __future__ import annotations

import copy
import json
from unittest.mock import MagicMock

import pytest
import torch

from fastvlm import native
from fastvlm.decoding import FLOAT16, MV, CachedDecoder, DecodeSteps, NativeLayers, prefill
from fastvlm.linears import FLOAT16_KERNEL_MAX_ROWS
from fastvlm.model import FastVLM
from fastvlm.quantization import quantization_kernel, quantize_decoder
from tests.conftest import fixture_path

pytestmark = pytest.mark.skipif(native.decode_layers_kernel() is None, reason="fastvlm's CPU kernels did not build")


@pytest.fixture(scope="module")
def model() -> FastVLM:
    return FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"))


def _variant(model: FastVLM, name: str) -> FastVLM:
    """fp32, bf16 (its few-row steps through our bf16 kernel), or int8 / int8-head on our kernel, in fp32 or bf16."""
    dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
    converted = copy.deepcopy(model).to(dtype)
    quantization = name.removeprefix("bf16").removeprefix("fp32").strip("+") or None
    if quantization is not None:
        quantize_decoder(converted, quantization, kernel="fastvlm")
        assert quantization_kernel(converted) == "fastvlm"
    return converted


def _steps(
    model: FastVLM, native_layers: bool, steps: int = 5, batch: int = 2, native_attention: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of ``steps`` teacher-forced steps of a left-padded batch (every other row padded), and the key buffers."""
    vocab = model.config.text.vocab_size
    ids = torch.randint(10, vocab - 10, (batch, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1::2, :4] = 0
    with torch.inference_mode():
        inputs = model.prepare_inputs(ids, mask, padding_side="left")
        cache, logits = prefill(model, inputs)
        decoder = CachedDecoder.after_prefill(
            model.language_model,
            cache,
            ids.shape[1] + steps,
            native_layers=native_layers,
            native_attention=native_attention,
        )
        assert (decoder.native is not None) == native_layers
        tokens = logits.argmax(-1, keepdim=True)
        attention, position = inputs.attention_mask, inputs.position_ids[:, -1:] + 1
        out = []
        for step in range(steps):
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            out.append(decoder.step(tokens, attention, position))
            tokens = torch.randint(10, vocab - 10, (batch, 1), generator=torch.Generator().manual_seed(step))
            position = position + 1
    return out, [k.clone() for k in decoder.buffers.keys]


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "int8-head", "bf16+int8"])
def test_one_call_gives_the_python_loops_logits_and_cache_bit_for_bit(model: FastVLM, name: str) -> None:
    converted = _variant(model, name)
    assert NativeLayers.unsupported_reason(converted.language_model) is None
    loop_logits, loop_keys = _steps(converted, native_layers=False)
    one_logits, one_keys = _steps(converted, native_layers=True)
    assert all(torch.equal(a, b) for a, b in zip(loop_logits, one_logits, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(loop_keys, one_keys, strict=True))


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_both_paths_agree_with_atens_attention_too_and_our_kernel_runs_by_default(model: FastVLM, name: str) -> None:
    """``native_attention=False`` sends both paths to ATen's attention, still bit for bit alike; by default both
    take our kernel (fastvlm_native.decode_attention), whose last bits differ from ATen's on these padded batches."""
    converted = _variant(model, name)
    loop_logits, loop_keys = _steps(converted, native_layers=False, native_attention=False)
    one_logits, one_keys = _steps(converted, native_layers=True, native_attention=False)
    assert all(torch.equal(a, b) for a, b in zip(loop_logits, one_logits, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(loop_keys, one_keys, strict=True))
    kernel_logits, _ = _steps(converted, native_layers=True)
    assert not all(torch.equal(a, b) for a, b in zip(kernel_logits, one_logits, strict=True))
    # the same attention to rounding: fp32 within the fixtures' tolerance, bf16 within a few bf16 steps of the largest
    # logit (a bf16 output rounded the other way moves the next layers by a step), as the transformers comparison
    for ours, aten in zip(kernel_logits, one_logits, strict=True):
        scale = aten.float().abs().max().item()
        assert (ours.float() - aten.float()).abs().max().item() <= (1e-4 if name == "fp32" else 4 * 2**-8) * scale


@pytest.mark.parametrize("kernel", [True, False], ids=["our kernel", "torch.mv"])
@pytest.mark.parametrize("batch", [1, 17])  # one row; more rows than FLOAT16_KERNEL_MAX_ROWS (F.linear)
def test_bf16_steps_match_the_loop_on_either_gemv_path_and_past_its_row_limit(
    model: FastVLM, monkeypatch: pytest.MonkeyPatch, kernel: bool, batch: int
) -> None:
    """The kinds decode_layers runs bf16 layers as (FLOAT16, or MV where our kernel cannot run) against the loop."""
    assert FLOAT16_KERNEL_MAX_ROWS < 17  # the premise of batch 17
    if kernel and native.float16_kernel() is None:
        pytest.skip("our bf16 kernel does not run on this CPU")
    if not kernel:
        monkeypatch.setattr(native, "float16_kernel", lambda: None)  # as on a CPU without AVX2
    converted = _variant(model, "bf16")
    assert set(NativeLayers.build(converted.language_model).kinds) == {FLOAT16 if kernel else MV}  # type: ignore[union-attr]
    mv = MagicMock(wraps=torch.mv)
    monkeypatch.setattr(torch, "mv", mv)
    loop_logits, loop_keys = _steps(converted, native_layers=False, batch=batch)
    assert mv.called == (not kernel and batch == 1)  # the loop took torch.mv exactly where it should
    one_logits, one_keys = _steps(converted, native_layers=True, batch=batch)
    assert all(torch.equal(a, b) for a, b in zip(loop_logits, one_logits, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(loop_keys, one_keys, strict=True))


def test_each_layer_keeps_its_own_attention_scaling(model: FastVLM) -> None:
    scaled = copy.deepcopy(model)
    scaled.language_model.model.layers[1].self_attn.scaling *= 0.5
    loop_logits, _ = _steps(scaled, native_layers=False, steps=2)
    one_logits, _ = _steps(scaled, native_layers=True, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(loop_logits, one_logits, strict=True))
    assert not torch.equal(loop_logits[0], _steps(model, native_layers=False, steps=1)[0][0])  # the change mattered


def test_generate_takes_it_and_gives_the_reference_greedy_tokens(model: FastVLM, monkeypatch) -> None:
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    calls = []
    original = NativeLayers.__call__

    def recording(self, *args):
        calls.append(args[0].shape[0])
        return original(self, *args)

    monkeypatch.setattr(NativeLayers, "__call__", recording)
    image = fixture_path("apple_fastvlm_tiny", "image.png")
    result = model.generate(image=image, prompt=golden["prompt"], max_new_tokens=len(golden["greedy_token_ids"]))
    assert result.token_ids == golden["greedy_token_ids"]
    assert calls == [1] * (len(golden["greedy_token_ids"]) - 1)  # every step after the prefill's token
    model.native_decode = False
    try:
        calls.clear()
        assert model.generate(image=image, prompt=golden["prompt"], max_new_tokens=4).token_ids == result.token_ids[:4]
        assert calls == []
    finally:
        model.native_decode = True


def test_layers_it_cannot_mirror_keep_the_python_loop(model: FastVLM) -> None:
    aten = quantize_decoder(copy.deepcopy(model), "int8", kernel="aten")  # unpacked int8: ATen's kernel
    reason = NativeLayers.unsupported_reason(aten.language_model)
    assert reason == "layer 0 has a Int8WeightOnlyLinear as q_proj, which decode_layers does not run"
    hooked = copy.deepcopy(model)
    hooked.language_model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: o * 2)
    assert NativeLayers.unsupported_reason(hooked.language_model) == "layer 1 has forward hooks"
    with torch.inference_mode():
        cache, _ = prefill(hooked, hooked.prepare_inputs(torch.tensor([[5, 6, 7]])))
        assert DecodeSteps(hooked, cache, capacity=5).decoder.native is None  # the hook still runs
    gelu = copy.deepcopy(model)
    gelu.language_model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert NativeLayers.unsupported_reason(gelu.language_model) == "layer 0 has a GELU activation, not SiLU"
    replaced = copy.deepcopy(model)
    mlp = replaced.language_model.model.layers[1].mlp
    mlp.forward = lambda x: x  # on the instance, as accelerate's hooks and some patches do
    reason = NativeLayers.unsupported_reason(replaced.language_model)
    assert reason == "layer 1 has a Qwen2MLP whose forward is replaced"
    subclassed = copy.deepcopy(model)
    layer = subclassed.language_model.model.layers[0]
    layer.mlp.__class__ = type("Qwen2MLP", (type(layer.mlp),), {"forward": lambda self, x: 2 * x})  # same name
    reason = NativeLayers.unsupported_reason(subclassed.language_model) or ""
    assert reason.startswith("layer 0 is built from") and "not exactly transformers' Qwen2 modules" in reason
    offloaded = copy.deepcopy(model)
    offloaded.language_model.model.layers[1].mlp.up_proj.to("meta")  # as an offloading hook leaves it
    reason = NativeLayers.unsupported_reason(offloaded.language_model) or ""
    assert reason == "layers.1.mlp.up_proj.weight is on meta, not the CPU"


def test_without_the_library_the_loop_runs(model: FastVLM, monkeypatch) -> None:
    monkeypatch.setattr(native, "decode_layers_kernel", lambda: None)
    assert "not built" in (NativeLayers.unsupported_reason(model.language_model) or "")
    assert NativeLayers.build(model.language_model) is None
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    image = fixture_path("apple_fastvlm_tiny", "image.png")
    assert (
        model.generate(image=image, prompt=golden["prompt"], max_new_tokens=3).token_ids
        == golden["greedy_token_ids"][:3]
    )


def test_steps_with_gradients_or_too_many_int8_rows_take_the_loop(model: FastVLM) -> None:
    layers = NativeLayers.build(model.language_model)
    int8_layers = NativeLayers.build(_variant(model, "int8").language_model)
    assert layers is not None and int8_layers is not None
    hidden = torch.zeros(257, 1, model.config.text.hidden_size)
    with torch.inference_mode():
        assert layers.takes(hidden) and not int8_layers.takes(hidden)  # the int8 layers dequantize above 256 rows
        assert int8_layers.takes(hidden[:256])
    with torch.enable_grad():
        assert not layers.takes(hidden[:1])


def test_the_op_names_inputs_that_do_not_fit(model: FastVLM) -> None:
    layers = NativeLayers.build(model.language_model)
    assert layers is not None
    text = model.config.text
    kv_heads, head_dim = layers.kv_heads, layers.head_dim
    hidden = torch.zeros(1, 1, text.hidden_size)
    cos = sin = torch.ones(1, 1, head_dim)
    count = text.num_hidden_layers
    full = [torch.zeros(1, kv_heads, 4, head_dim) for _ in range(count)]
    call = layers.kernel
    args = (layers.kinds, layers.eps, layers.heads, kv_heads, head_dim, layers.scaling, FLOAT16_KERNEL_MAX_ROWS, True)
    assert len(layers.scaling) == count  # one per layer
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="no room for position 4"):
            call(hidden, cos, sin, None, full, full, 4, layers.tensors, *args)
        with pytest.raises(RuntimeError, match=f"expected {23 * count} tensors for {count} layers, got 3"):
            call(hidden, cos, sin, None, full, full, 1, layers.tensors[:3], *args)
        with pytest.raises(RuntimeError, match="hidden must be \\[B, 1, H\\]"):
            call(hidden[0], cos, sin, None, full, full, 1, layers.tensors, *args)
        kinds = [7, *layers.kinds[1:]]
        with pytest.raises(RuntimeError, match="layer 0 linear 0 has kind 7"):
            call(hidden, cos, sin, None, full, full, 1, layers.tensors, kinds, *args[1:])
        with pytest.raises(RuntimeError, match="layer 0 lacks tensor 3"):  # k_proj's weight
            call(hidden, cos, sin, None, full, full, 1, [*layers.tensors[:3], None, *layers.tensors[4:]], *args)
