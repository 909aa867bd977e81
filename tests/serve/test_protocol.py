"""Chat-completions requests become our conversation; every bad field is a 400 naming it."""

from __future__ import annotations

import pytest

from fastvlm.processing import build_prompt
from fastvlm.serve.protocol import (
    RequestError,
    Usage,
    completion_chunk,
    completion_response,
    error_body,
    parse_chat_request,
    usage_chunk,
)

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def _body(**fields: object) -> dict:
    messages = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "What is it?"}]}]
    return {"model": "fastvlm", "messages": messages, **fields}


def test_an_image_then_a_question_is_the_prompt_the_model_was_trained_on():
    request = parse_chat_request(_body())
    assert request.prompt == build_prompt("What is it?", with_image=True)
    assert request.image_urls == ["data:image/png;base64,AAAA"]
    assert request.sampling.temperature == 0.0 and request.sampling.max_tokens == 256
    assert not request.stream and not request.include_usage


def test_multi_turn_keeps_the_image_in_its_turn_and_the_system_prompt_first():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And its colour?"},
    ]
    request = parse_chat_request({"messages": messages})
    assert request.conversation.system == "Be brief."
    assert request.conversation.messages == [
        ("user", "<image>\nWhat is it?"),
        ("assistant", "A cat."),
        ("user", "And its colour?"),
    ]
    assert request.prompt.endswith("<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\n")
    assert len(request.image_urls) == 1


def test_sampling_fields_and_their_synonyms():
    request = parse_chat_request(
        _body(max_tokens=5, max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop="\n")
    )
    assert request.sampling.max_tokens == 7  # the newer name wins
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.seed) == (0.5, 0.9, 3)
    assert request.sampling.stop == ("\n",)
    streamed = parse_chat_request(_body(stream=True, stream_options={"include_usage": True}))
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}]},
            "messages[0].content[0].image_url",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "<image> sneak"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "assistant", "content": [IMAGE]}, {"role": "user", "content": "hi"}]},
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "messages[1].role",
        ),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
        (_body(n=2), "n"),
        (_body(max_tokens=0), "max_tokens"),
        (_body(max_completion_tokens=-3), "max_completion_tokens"),
        (_body(max_tokens=True), "max_tokens"),
        (_body(temperature=-1), "temperature"),
        (_body(temperature="hot"), "temperature"),
        (_body(top_p=0), "top_p"),
        (_body(top_p=1.5), "top_p"),
        (_body(seed=1.5), "seed"),
        (_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (_body(stop=[""]), "stop"),
        (_body(stream="yes"), "stream"),
        (_body(model=3), "model"),
    ],
)
def test_each_bad_field_is_a_400_that_names_it(body, param):
    with pytest.raises(RequestError) as caught:
        parse_chat_request(body)
    assert caught.value.status == 400 and caught.value.error_type == "invalid_request_error"
    assert caught.value.param == param, caught.value.message


def test_responses_have_the_openai_shapes():
    usage = Usage(prompt_tokens=300, completion_tokens=5, cached_tokens=256)
    done = completion_response(completion_id="c1", model="m", text="A cat.", finish_reason="stop", usage=usage)
    assert done["object"] == "chat.completion" and done["choices"][0]["message"] == {
        "role": "assistant",
        "content": "A cat.",
    }
    assert done["usage"] == {
        "prompt_tokens": 300,
        "completion_tokens": 5,
        "total_tokens": 305,
        "prompt_tokens_details": {"cached_tokens": 256},
    }
    chunk = completion_chunk(completion_id="c1", model="m", created=1, delta={"role": "assistant"}, include_usage=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert chunk["choices"] == [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]
    last = usage_chunk(completion_id="c1", model="m", created=1, usage=usage)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 305
    assert error_body("bad", error_type="invalid_request_error", param="n") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }
