"""The real server (uvicorn on 127.0.0.1) as clients see it: the openai client and raw HTTP.

Answers must be the library's: the same text as :meth:`FastVLM.generate` for the same
image and question, streamed or not, with usage counts that add the visual tokens to the
tokenizer's count, multi-turn conversations as :class:`~fastvlm.generation.ChatSession`
answers them, the feature cache reported on the second turn, and eight concurrent
streaming clients each getting exactly their answer alone.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from fastvlm.generation import prepare_prompt
from fastvlm.processing import Conversation, load_image, tokenize_prompt
from tests.conftest import fixture_path
from tests.serve.conftest import TINY, data_url, fixture_image_url, metric, png_bytes, user_turn
from tests.serve.live import live_server


@pytest.fixture(scope="module")
def server(tiny_model) -> str:
    with live_server(str(fixture_path(TINY)), model=tiny_model, max_batch_size=4) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0, timeout=120)


def reference(model, question: str, *, image: bool = True, max_new_tokens: int = 16):
    path = str(fixture_path(TINY, "image.png")) if image else None
    return model.generate(image=path, prompt=question, max_new_tokens=max_new_tokens)


def sse_events(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of a server-sent-event stream, JSON-decoded except ``[DONE]``."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected line in the event stream: {line!r}"
    return events


def test_an_image_question_gets_the_text_generate_gives(client, tiny_model, golden):
    expected = reference(tiny_model, golden["question"], max_new_tokens=12)
    answer = client.chat.completions.create(
        model=TINY, messages=[user_turn(golden["question"], fixture_image_url())], max_tokens=12
    )
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == expected.finish_reason == "length"
    assert answer.usage.completion_tokens == len(expected.token_ids) == 12
    assert expected.token_ids == golden["greedy_token_ids"][:12]


def test_usage_counts_the_tokenizers_tokens_plus_the_visual_tokens(client, tiny_model):
    question = "How many shapes are there?"
    answer = client.chat.completions.create(
        messages=[user_turn(question, fixture_image_url())], model=TINY, max_tokens=3
    )
    ids = tokenize_prompt(tiny_model.tokenizer, prepare_prompt(question, True))
    visual = tiny_model.config.num_image_tokens()
    assert answer.usage.prompt_tokens == len(ids) - 1 + visual  # the image marker becomes `visual` tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    text_only = client.chat.completions.create(messages=[user_turn(question)], model=TINY, max_tokens=3)
    assert text_only.usage.prompt_tokens == len(tokenize_prompt(tiny_model.tokenizer, prepare_prompt(question, False)))


def test_the_stream_carries_the_same_text_as_the_plain_answer(server, tiny_model):
    body = {"messages": [user_turn("Describe the picture.", fixture_image_url())], "max_tokens": 14}
    plain = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=stream_body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [plain["choices"][0]["finish_reason"]]  # exactly once
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"] | {
        "prompt_tokens_details": usage["usage"]["prompt_tokens_details"]
    }
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert (
        text
        == plain["choices"][0]["message"]["content"]
        == reference(tiny_model, "Describe the picture.", max_new_tokens=14).text
    )
    timings = [c for c in chunks if "timings" in c][0]["timings"]
    assert set(timings) >= {"queue_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s"}


def test_the_openai_client_streams_the_same_text(client, tiny_model):
    stream = client.chat.completions.create(
        model=TINY, messages=[user_turn("What colour is it?", fixture_image_url())], max_tokens=10, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reference(tiny_model, "What colour is it?", max_new_tokens=10).text


def test_a_multi_turn_conversation_is_answered_as_chat_session_answers_it(client, tiny_model):
    session = tiny_model.chat(str(fixture_path(TINY, "image.png")))
    first = session.ask("What is in the image?", max_new_tokens=6)
    second = session.ask("And what colour is it?", max_new_tokens=6)
    messages = [
        user_turn("What is in the image?", fixture_image_url()),
        {"role": "assistant", "content": first.text},
        user_turn("And what colour is it?"),
    ]
    answer = client.chat.completions.create(model=TINY, messages=messages, max_tokens=6)
    assert answer.choices[0].message.content == second.text


def test_the_second_turn_about_the_same_image_is_served_from_the_feature_cache(client, tiny_model):
    image = data_url(png_bytes((50, 40), color=(10, 120, 240)))  # an image no other test sends
    first = client.chat.completions.create(model=TINY, messages=[user_turn("What is it?", image)], max_tokens=4)
    messages = [
        user_turn("What is it?", image),
        {"role": "assistant", "content": first.choices[0].message.content},
        user_turn("Are you sure?"),
    ]
    second = client.chat.completions.create(model=TINY, messages=messages, max_tokens=4)
    visual = tiny_model.config.num_image_tokens()
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == visual
    # The cached features give the answer the encoder would have given.
    conversation = Conversation().add("user", "<image>\nWhat is it?").add("assistant", first.choices[0].message.content)
    conversation.add("user", "Are you sure?")
    pixels = tiny_model.image_processor.preprocess(load_image(png_bytes((50, 40), color=(10, 120, 240))))[None]
    expected = tiny_model.generate(prompt=conversation.prompt(), pixel_values=pixels, max_new_tokens=4)
    assert second.choices[0].message.content == expected.text


def test_a_request_arriving_while_another_decodes_reuses_its_image_features(server, client, tiny_model):
    image = data_url(png_bytes((30, 60), color=(90, 200, 30)))  # an image no other test sends
    body = {"messages": [user_turn("Story?", image)], "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as first:
        lines = first.iter_lines()  # kept open: the first request is still decoding
        next(lines)
        second = client.chat.completions.create(model=TINY, messages=[user_turn("What is it?", image)], max_tokens=2)
    assert second.usage.prompt_tokens_details.cached_tokens == tiny_model.config.num_image_tokens()


def test_eight_concurrent_streams_each_get_their_answer_alone(client, tiny_model):
    cases = [
        ("Describe the picture in detail.", True, 12),
        ("Write a long story about a cat.", False, 9),
        ("What colour is it?", True, 5),
        ("How many shapes?", True, 11),
        ("Hi", False, 3),
        ("What is in the image?", True, 8),
        ("Tell me a joke.", False, 10),
        ("Where is the square?", True, 7),
    ]
    expected = [reference(tiny_model, q, image=img, max_new_tokens=n).text for q, img, n in cases]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(cases))

    def stream(index: int) -> None:
        question, image, n = cases[index]
        try:
            start.wait(timeout=30)
            message = user_turn(question, fixture_image_url()) if image else user_turn(question)
            chunks = client.chat.completions.create(model=TINY, messages=[message], max_tokens=n, stream=True)
            results[index] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert [results[i] for i in range(len(cases))] == expected


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    body = {"messages": [user_turn("Write a long story.")], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(server, "fastvlm_num_requests_running") == 1
    deadline = time.monotonic() + 10
    while metric(server, "fastvlm_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "fastvlm_num_requests_running") == 0


def test_stop_sequences_end_the_answer_before_them(client, tiny_model):
    full = reference(tiny_model, "Describe the picture.", max_new_tokens=14).text
    stop = full[5:8]
    answer = client.chat.completions.create(
        model=TINY, messages=[user_turn("Describe the picture.", fixture_image_url())], max_tokens=14, stop=[stop]
    )
    assert answer.choices[0].message.content == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [TINY]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{server}/metrics").text
    for name in (
        "fastvlm_time_to_first_token_seconds_count",
        "fastvlm_vision_encoder_seconds_count",
        "fastvlm_prefill_seconds_count",
        "fastvlm_inter_token_latency_seconds_count",
        "fastvlm_e2e_request_latency_seconds_count",
        "fastvlm_request_queue_time_seconds_count",
        "fastvlm_prompt_tokens_total",
        "fastvlm_generation_tokens_total",
        "fastvlm_num_requests_waiting",
    ):
        value = re.search(rf"^{name} (\S+)$", metrics, re.M)
        assert value is not None, name
    assert re.search(r'^fastvlm_requests_total\{status="200"\} [1-9]', metrics, re.M)
    assert float(re.search(r"^fastvlm_generation_tokens_total (\S+)$", metrics, re.M).group(1)) > 0
