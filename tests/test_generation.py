"""Generation: batching, streaming, chat sessions, sampling, prompt errors."""

from __future__ import annotations

import json
import warnings

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


class ForcedTokens:
    """A forward hook on lm_head that makes chosen tokens win, per row and step (a scripted 'model')."""

    def __init__(self, model, script: list[list[int | None]]) -> None:
        self.script, self.step = script, 0
        self.vocab = model.config.text.vocab_size
        self.handle = model.language_model.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, out):
        out = out.clone()
        for row, tokens in enumerate(self.script):
            if self.step < len(tokens) and tokens[self.step] is not None:
                out[row, -1, tokens[self.step]] += 1e4
        self.step += 1
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_generation_stops_at_end_of_turn_per_row(model):
    end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    alone = model.generate(image=_image(), prompt="Hello there", max_new_tokens=6)
    with ForcedTokens(model, [[end], []]):
        stopped, running = model.generate(image=[_image(), _image()], prompt=["Hi", "Hello there"], max_new_tokens=6)
    assert stopped.token_ids == [] and stopped.finish_reason == "stop"
    assert running.token_ids == alone.token_ids and running.finish_reason == "length"
    with ForcedTokens(model, [[5, end]]):
        result = model.generate(image=_image(), prompt="Hi", max_new_tokens=6)
    assert result.token_ids == [5] and result.timings.new_tokens == 2  # no decoding past the stop


def test_streaming_never_splits_a_multibyte_character(model):
    text = "é€😀 ok"
    ids = model.tokenizer(text).input_ids
    assert len(ids) > len(text) // 2  # byte-level pieces: characters span several tokens
    with ForcedTokens(model, [ids]):
        stream = model.generate(image=_image(), prompt="Say it", max_new_tokens=len(ids), stream=True)
        pieces = list(stream)
    assert "".join(pieces) == text == stream.result.text
    assert not any("\ufffd" in p for p in pieces)


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


def test_sampling_is_seeded_random_and_top_p_narrows_it(model, golden):
    def sample(**kw):
        return model.generate(image=_image(), prompt=golden["prompt"], max_new_tokens=8, **kw).token_ids

    assert sample(temperature=1.0, seed=3) == sample(temperature=1.0, seed=3)
    draws = {tuple(sample(temperature=1.5, seed=s)) for s in range(4)}
    assert len(draws) > 1  # really sampling: different seeds, different answers
    assert tuple(golden["greedy_token_ids"][:8]) not in draws or len(draws) > 1
    assert sample(temperature=1.5, top_p=1e-6, seed=0) == golden["greedy_token_ids"][:8]  # only the top token


def test_chat_turn_that_fails_while_streaming_leaves_the_session_usable(model):
    session = model.chat(_image())
    long = "word " * (model.config.context_length + 10)
    with pytest.raises(PromptError):
        for _ in session.ask(long, stream=True, max_new_tokens=2):
            pass
    assert session.conversation.messages == []
    assert len(session.ask("hi", max_new_tokens=2).token_ids) == 2


def test_forward_keeps_left_padding_and_expands_labels(model):
    from fastvlm.processing import IGNORE_INDEX, IMAGE_TOKEN_INDEX, pad_sequences

    pixels = model.image_processor(_image())[None]
    short = [5, 6, IMAGE_TOKEN_INDEX, 7]
    longer = [5, 6, 8, 9, 10, IMAGE_TOKEN_INDEX, 7, 11]
    ids, mask = pad_sequences([short, longer], 0, "left")
    with torch.inference_mode():
        batch = model(ids, pixel_values=pixels.repeat(2, 1, 1, 1), attention_mask=mask).logits
        alone = model(torch.tensor([short]), pixel_values=pixels).logits
    assert torch.allclose(batch[0, -1], alone[0, -1], atol=1e-4)
    labels = torch.tensor([short]).clone()
    labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    with torch.inference_mode():
        out = model(torch.tensor([short]), pixel_values=pixels, labels=labels)
    logits = out.logits[0, :-1]
    expanded = [5, 6] + [IGNORE_INDEX] * 16 + [7]
    target = torch.tensor(expanded[1:])
    keep = target != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)


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


def test_generation_uses_the_cache_argument_this_transformers_supports(model):
    """No deprecation warning about past_key_values (transformers 5.24 renamed it to cache, removal in 5.40)."""
    from fastvlm.decoding import cache_argument

    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("error", message=".*past_key_values", category=category)
        result = model.generate(image=_image(), prompt="Hello there", max_new_tokens=3)
    assert len(result.token_ids) == 3
    assert cache_argument(model.language_model) in ("cache", "past_key_values")


def test_pixel_values_from_an_already_loaded_image_give_the_same_answer(model, golden, monkeypatch):
    """The command line decodes the image once (load_image) and hands the processor the PIL image."""
    import fastvlm.processing as processing

    image = processing.load_image(_image())
    from_path = model.generate(image=_image(), prompt=golden["prompt"], max_new_tokens=12)
    decodes = []
    original = processing.load_image
    monkeypatch.setattr(processing, "load_image", lambda *a, **k: decodes.append(1) or original(*a, **k))
    pixels = model.image_processor.preprocess(image)[None]
    loaded = model.generate(pixel_values=pixels, prompt=golden["prompt"], max_new_tokens=12)
    assert decodes == []
    assert loaded.token_ids == from_path.token_ids == golden["greedy_token_ids"]
