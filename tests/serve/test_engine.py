"""The engine thread: concurrent requests each get their own greedy tokens; cancel, full queue, context."""

from __future__ import annotations

import json
import threading

import pytest

from fastvlm.errors import PromptError
from fastvlm.generation import prepare_prompt
from fastvlm.model import FastVLM
from fastvlm.processing import tokenize_prompt
from fastvlm.serve.engine import Engine, GenerationRequest, QueueFullError
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def model() -> FastVLM:
    return FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"))


def _request(model: FastVLM, question: str, image: str | None, max_new: int) -> GenerationRequest:
    assert model.tokenizer is not None
    ids = tokenize_prompt(model.tokenizer, prepare_prompt(question, image is not None))
    pixels = None if image is None else model.image_processor(image)[None]
    return GenerationRequest(input_ids=ids, pixel_values=pixels, max_new_tokens=max_new)


def test_concurrent_requests_each_get_the_tokens_they_get_alone(model):
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    image = str(fixture_path("apple_fastvlm_tiny", "image.png"))
    cases = [
        (golden["question"], image, 12),
        ("Write a long story about a cat.", None, 9),
        ("What colour is it?", image, 4),
        (golden["question"], image, 7),
        ("Hi", None, 3),
        ("Describe the picture in detail.", image, 10),
    ]
    alone = [model.generate(image=img, prompt=q, max_new_tokens=n) for q, img, n in cases]
    engine = Engine(model, max_batch_size=4).start()
    results: dict[int, tuple[list[int], str | None]] = {}

    def client(index: int) -> None:
        handle = engine.submit(_request(model, *cases[index]))
        results[index] = (handle.tokens(), handle.finish_reason)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        engine.stop()
    assert results[0][0] == golden["greedy_token_ids"]
    for index, expected in enumerate(alone):
        assert results[index] == (expected.token_ids, expected.finish_reason), index
    assert engine.running == 0 and engine.peak_running >= 2  # requests really shared the batch


def test_a_cancelled_request_leaves_the_batch(model):
    engine = Engine(model).start()
    try:
        handle = engine.submit(_request(model, "Write a long story about a cat.", None, 200))
        first = next(iter(handle))
        handle.cancel()
        rest = handle.tokens()
        assert isinstance(first, int) and len(rest) < 199 and handle.finish_reason == "cancelled"
    finally:
        engine.stop()
    assert engine.running == 0


def test_a_full_queue_and_a_prompt_past_the_context_are_refused(model):
    engine = Engine(model, max_queue=1)  # not started: nothing leaves the queue
    engine.submit(_request(model, "Hi", None, 4))
    with pytest.raises(QueueFullError):
        engine.submit(_request(model, "Hi", None, 4))
    with pytest.raises(PromptError, match="exceeds the model's context"):
        engine.submit(_request(model, "Hi", None, model.config.context_length))


def test_a_burst_is_admitted_in_slices_of_the_prefill_budget(model):
    def burst(engine: Engine) -> list:
        handles = [engine.submit(_request(model, q, None, 3)) for q in ("Hi", "Hello there", "What?")]
        engine.start()
        try:
            tokens = [h.tokens() for h in handles]
        finally:
            engine.stop()
        return [(h.times.admitted, t) for h, t in zip(handles, tokens, strict=True)]

    together = burst(Engine(model))
    sliced = burst(Engine(model, max_prefill_tokens=1))  # one request per step, however small
    assert len({admitted for admitted, _ in together}) == 1
    assert len({admitted for admitted, _ in sliced}) == 3
    assert [t for _, t in sliced] == [t for _, t in together]


def test_greedy_batches_step_through_the_screened_head_and_mixed_ones_do_not(model):
    image = str(fixture_path("apple_fastvlm_tiny", "image.png"))
    engine = Engine(model, max_batch_size=4)
    greedy = _request(model, "What colour is it?", image, 6)
    sampled = _request(model, "What colour is it?", image, 6)
    sampled.temperature, sampled.seed = 0.8, 1
    model.greedy_head = None
    handles = [engine.submit(greedy), engine.submit(sampled)]  # queued before the engine starts: one batch
    engine.start()
    try:
        mixed = handles[0].tokens()
        handles[1].tokens()
        assert engine.peak_running == 2
        assert model.greedy_head is None  # a row that samples needs every logit: no screen was made or used
        alone = engine.submit(greedy).tokens()
        assert alone == mixed
        screen = model.greedy_head
        assert screen is not None and screen.calls == len(alone) - 1  # every step after the prefill's token
    finally:
        engine.stop()
