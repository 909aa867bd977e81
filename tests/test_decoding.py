"""Decode steps over preallocated KV buffers against transformers' Qwen2 forward on the same cache."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from fastvlm.decoding import CachedDecoder, DecodeSteps, KVBuffers, decoder_step, prefill, unsupported_reason
from fastvlm.generation import generate_tokens
from fastvlm.model import FastVLM
from fastvlm.quantization import quantize_decoder
from tests.bench.tiny import tiny_config
from tests.conftest import fixture_path

# The fixtures' tolerance (shared/fixtures/README.md): |a - b| <= 1e-4 * max(1, max |b|) in fp32
FIXTURE_RTOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"))


def _padded_prompts(model: FastVLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Two text prompts, the second left-padded by 5 positions."""
    ids = torch.randint(10, model.config.text.vocab_size - 10, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def _both_paths(model: FastVLM, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[list, list]:
    """The logits [B, V] of ``steps`` teacher-forced steps through CachedDecoder and through transformers."""
    with torch.inference_mode():
        inputs = model.prepare_inputs(ids, mask, padding_side="left")
        cache, logits = prefill(model, inputs)
        decoder = CachedDecoder.after_prefill(model.language_model, cache, capacity=ids.shape[1] + steps)
        reference_cache = copy.deepcopy(cache)
        tokens = logits.argmax(-1, keepdim=True)
        attention, position = inputs.attention_mask, inputs.position_ids[:, -1:] + 1
        ours, theirs = [], []
        for _ in range(steps):
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            ours.append(decoder.step(tokens, attention, position))
            theirs.append(
                decoder_step(model, reference_cache, input_ids=tokens, attention_mask=attention, position_ids=position)
            )
            tokens, position = theirs[-1].argmax(-1, keepdim=True), position + 1
    return ours, theirs


def test_steps_match_transformers_forward_within_the_fixture_tolerance(model):
    ids, mask = _padded_prompts(model)
    ours, theirs = _both_paths(model, ids, mask, steps=6)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        bound = FIXTURE_RTOL * max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= bound, f"step {step}: logits differ by more than {bound:.2e}"
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_bf16_steps_match_transformers_forward_within_bf16_rounding(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids, mask = _padded_prompts(bf16)
    ours, theirs = _both_paths(bf16, ids, mask, steps=4)
    for a, b in zip(ours, theirs, strict=True):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 4 * 2**-8 * scale  # a few bf16 steps of the largest


def test_generate_takes_the_buffered_path_and_gives_the_reference_greedy_tokens(model, monkeypatch):
    import json

    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    paths = []
    original = DecodeSteps.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        paths.append(self.path)

    monkeypatch.setattr(DecodeSteps, "__init__", recording)
    image = fixture_path("apple_fastvlm_tiny", "image.png")
    result = model.generate(image=image, prompt=golden["prompt"], max_new_tokens=12)
    assert paths == ["fastvlm"]
    assert result.token_ids == golden["greedy_token_ids"]
    model.lean_decode = False
    try:
        assert model.generate(image=image, prompt=golden["prompt"], max_new_tokens=12).token_ids == result.token_ids
    finally:
        model.lean_decode = True
    assert paths == ["fastvlm", "transformers"]


@pytest.mark.parametrize("switch", ["lean_decode", "native_decode"])  # off: transformers' forward; the Python loop
def test_a_left_padded_batch_decodes_the_same_on_either_step_path(model, switch):
    ids, mask = _padded_prompts(model)
    runs = {}
    try:
        for flag in (True, False):
            setattr(model, switch, flag)
            runs[flag] = [t.tolist() for t, _ in generate_tokens(model, ids, mask, max_new_tokens=10)]
    finally:
        setattr(model, switch, True)
    assert runs[True] == runs[False]


def test_a_quantized_decoder_runs_through_its_own_layers(model):
    int8 = quantize_decoder(copy.deepcopy(model), "int8", kernel="aten")
    ids, mask = _padded_prompts(int8)
    ours, theirs = _both_paths(int8, ids, mask, steps=3)
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max().item() <= FIXTURE_RTOL * max(1.0, b.abs().max().item())


def test_buffers_are_allocated_once_and_written_one_column_per_step(model):
    ids, mask = _padded_prompts(model)
    with torch.inference_mode():
        inputs = model.prepare_inputs(ids, mask, padding_side="left")
        cache, logits = prefill(model, inputs)
        steps = DecodeSteps(model, cache, capacity=ids.shape[1] + 3)
        buffers = steps.decoder.buffers
        pointers = [k.data_ptr() for k in buffers.keys]
        assert (buffers.length, buffers.capacity) == (ids.shape[1], ids.shape[1] + 3)
        attention, position = inputs.attention_mask, inputs.position_ids[:, -1:] + 1
        for _ in range(3):
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            steps(logits.argmax(-1, keepdim=True), attention, position)
            position = position + 1
        assert [k.data_ptr() for k in buffers.keys] == pointers
        assert buffers.length == ids.shape[1] + 3
        # the prefill's cache is left as it was: the steps wrote only into the buffers
        assert cache.get_seq_length() == ids.shape[1]
        cached = [k[:, :, : buffers.length].clone() for k in buffers.keys]
        steps(logits.argmax(-1, keepdim=True), torch.cat([attention, attention[:, :1]], -1), position)
        assert (buffers.capacity, buffers.length) == (2 * (ids.shape[1] + 3), ids.shape[1] + 4)  # doubled
        assert all(torch.equal(k[:, :, : len(c[0, 0])], c) for k, c in zip(buffers.keys, cached, strict=True))


def test_rewinding_one_step_repeats_it_exactly(model):
    ids = torch.randint(10, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        inputs = model.prepare_inputs(ids)
        cache, logits = prefill(model, inputs)
        steps = DecodeSteps(model, cache, capacity=10)
        args = (logits.argmax(-1, keepdim=True), torch.ones(1, 10, dtype=torch.long), torch.full((1, 1), 9))
        first = steps(*args)
        steps.rewind(1)
        assert torch.equal(steps(*args), first)
        with pytest.raises(ValueError, match="cannot rewind 11 of 10"):
            steps.rewind(11)


def test_wrong_step_inputs_are_named(model):
    with torch.inference_mode():
        cache, _ = prefill(model, model.prepare_inputs(torch.tensor([[5, 6, 7]])))
        decoder = CachedDecoder.after_prefill(model.language_model, cache, capacity=8)
        position = torch.tensor([[3]])
        with pytest.raises(ValueError, match="one token per row, got input_ids of shape \\(1, 2\\)"):
            decoder.step(torch.tensor([[1, 2]]), torch.ones(1, 4), position)
        with pytest.raises(ValueError, match="the attention mask covers 6 positions; expected the 3 cached"):
            decoder.step(torch.tensor([[1]]), torch.ones(1, 6), position)
        with pytest.raises(ValueError, match="capacity of 2 positions cannot hold the 3"):
            KVBuffers.from_cache(cache, capacity=2)
        with pytest.raises(ValueError, match="the cache is empty"):
            KVBuffers.from_cache(DynamicCache(), capacity=2)


def _small_qwen2(**changes) -> Qwen2ForCausalLM:
    """The benchmarks' tiny decoder (tests/bench/tiny.py) with ``changes`` to its config."""
    text = tiny_config().text.to_dict()
    text.pop("layer_types", None)  # derived from the sliding-window settings again
    return Qwen2ForCausalLM(Qwen2Config(**{**text, **changes})).eval()


def test_sliding_window_decoders_keep_transformers_forward(model):
    sliding = _small_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    reason = unsupported_reason(sliding)
    assert reason is not None and "sliding_attention" in reason
    assert unsupported_reason(_small_qwen2()) is None
    assert "not a Qwen2ForCausalLM" in (unsupported_reason(torch.nn.Linear(2, 2)) or "")
    with pytest.raises(ValueError, match="CachedDecoder cannot run this decoder: the decoder has layers"):
        CachedDecoder(sliding, KVBuffers([], [], 0))
    clone = copy.deepcopy(model)
    clone.language_model = sliding
    with torch.inference_mode():
        cache, _ = prefill(clone, clone.prepare_inputs(torch.tensor([[5, 6, 7]])))
        assert DecodeSteps(clone, cache, capacity=5).path == "transformers"


def test_a_long_answer_grows_the_buffers_it_started_small(model, monkeypatch):
    import fastvlm.generation as generation

    ids, mask = _padded_prompts(model)
    reference = [t.tolist() for t, _ in generate_tokens(model, ids, mask, max_new_tokens=9)]
    capacities = []
    original = KVBuffers.grow

    def recording(self, capacity):
        capacities.append(capacity)
        original(self, capacity)

    monkeypatch.setattr(generation, "ANSWER_ROOM", 2)
    monkeypatch.setattr(KVBuffers, "grow", recording)
    assert [t.tolist() for t, _ in generate_tokens(model, ids, mask, max_new_tokens=9)] == reference
    prompt = ids.shape[1]
    assert capacities == [prompt + 2, 2 * (prompt + 2)]  # room for 2 answer tokens, then doubled once
