"""Generation: batching, streaming, chat sessions, sampling, prompt errors."""

from __future__ import annotations

import json

import pytest
import torch

from fastvlm.model import FastVLM
from fastvlm.processing import PromptError
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def model():
    return FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"))


@pytest.fixture(scope="module")
def golden():
    return json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())


def _image():
    return fixture_path("apple_fastvlm_tiny", "image.png")


def test_batch_equals_one_by_one(model):
    flipped = torch.flip(model.image_processor(_image()), dims=[-1])  # a second, different image
    pairs = [
        (_image(), "What is written on the sign?"),
        (flipped, "Describe this picture in a few words, please, with care."),
        (None, "Hello there"),
    ]
    singles = [model.generate(image=i, prompt=p, max_new_tokens=8) for i, p in pairs]
    batch = model.generate(image=[i for i, _ in pairs], prompt=[p for _, p in pairs], max_new_tokens=8)
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]
    assert [r.text for r in batch] == [r.text for r in singles]


def test_streaming_yields_the_same_text(model, golden):
    whole = model.generate(image=_image(), prompt=golden["prompt"], max_new_tokens=12)
    stream = model.generate(image=_image(), prompt=golden["prompt"], max_new_tokens=12, stream=True)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == whole.text == stream.result.text
    assert stream.result.token_ids == golden["greedy_token_ids"]


def test_generation_stops_at_end_of_turn(model):
    """Forcing the end-of-turn token to win stops generation after zero text tokens."""
    end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    original = model.language_model.lm_head.weight.data.clone()
    bias = torch.zeros(model.config.text.vocab_size)
    bias[end] = 1e4
    head = model.language_model.lm_head
    hook = head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        result = model.generate(image=_image(), prompt="Hi", max_new_tokens=10)
    finally:
        hook.remove()
    assert torch.equal(model.language_model.lm_head.weight.data, original)
    assert result.token_ids == [] and result.finish_reason == "stop"


def test_chat_reuses_image_features_across_turns(model, golden, monkeypatch):
    session = model.chat(_image())
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = session.ask(golden["question"], max_new_tokens=12)
    assert first.token_ids == golden["greedy_token_ids"]  # turn 1 = the one-shot prompt
    second = session.ask("And what colour is it?", max_new_tokens=5)
    assert calls == []  # features were computed once, when the session started
    assert second.timings.vision_ms == 0
    prompt = session.conversation.prompt()
    assert prompt.count("<image>") == 1 and prompt.count("<|im_start|>assistant\n") == 3
    streamed = "".join(session.ask("Anything else?", stream=True, max_new_tokens=3))
    assert session.conversation.messages[-1] == ("assistant", streamed)


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(model, golden):
    a = model.generate(image=_image(), prompt=golden["prompt"], max_new_tokens=6, temperature=1.0, seed=3)
    b = model.generate(image=_image(), prompt=golden["prompt"], max_new_tokens=6, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids
    nucleus = model.generate(image=_image(), prompt=golden["prompt"], max_new_tokens=6, temperature=0.7,
                             top_p=1e-6, seed=0)  # fmt: skip
    assert nucleus.token_ids == golden["greedy_token_ids"][:6]


def test_two_placeholders_for_one_image_is_an_error(model):
    with pytest.raises(PromptError, match="2 <image> placeholder\\(s\\) for 1 image"):
        model.generate(image=_image(), prompt="<image>\n<image>\nCompare.", max_new_tokens=2)
    with pytest.raises(PromptError, match="1 <image> placeholder\\(s\\) for 0 image"):
        model.generate(prompt="<image>\nWhat is this?", max_new_tokens=2)


def test_prompt_longer_than_the_context_is_an_error(model):
    context = model.config.context_length
    with pytest.raises(PromptError, match=f"the model's context holds {context}"):
        model.generate(image=_image(), prompt="word " * (context + 10), max_new_tokens=2)


def test_generation_never_runs_past_the_context(model):
    context = model.config.context_length
    ids = model.tokenizer("go " * 20).input_ids
    room = 5
    prompt_ids = (ids * context)[: context - room]
    from fastvlm.generation import generate_tokens

    steps = list(generate_tokens(model, torch.tensor([prompt_ids]), max_new_tokens=50))
    assert len(steps) == room
