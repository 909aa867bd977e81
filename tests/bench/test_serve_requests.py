"""The load test's requests: seeded images, exact shared fractions, and invalid bodies that really are invalid.

"Invalid" is checked against the server's own rules (its request parser and media policy),
so a soak that sees a 200 for one of them has found a server bug, not a generator bug.
"""

from __future__ import annotations

import json

import pytest

from fastvlm.bench.serve_requests import (
    INVALID_KINDS,
    TOO_MANY_IMAGES,
    Workload,
    is_shared,
    png_data_url,
    synthetic_image,
)
from fastvlm.serve.media import MediaPolicy, check_image_count, load_media
from fastvlm.serve.protocol import parse_chat_request


def _check_like_the_server(body: bytes) -> None:
    """Parse and load ``body`` as the server does before generating; raises what the server would refuse."""
    request = parse_chat_request(json.loads(body))
    policy = MediaPolicy()
    check_image_count(len(request.image_urls), policy)
    for url in request.image_urls:
        load_media(url, policy)


@pytest.mark.parametrize("kind", INVALID_KINDS)
def test_every_invalid_kind_is_refused_by_the_servers_own_rules(kind):
    planned = Workload(image_size=64, max_tokens=4).invalid(3, kind)
    assert not planned.valid and planned.kind == kind
    with pytest.raises(ValueError):  # JSONDecodeError, RequestError and MediaError are all ValueErrors
        _check_like_the_server(planned.body)


def test_too_many_images_is_more_than_the_default_limit():
    assert MediaPolicy().limit_images_per_prompt < TOO_MANY_IMAGES


def test_an_unknown_invalid_kind_is_named():
    with pytest.raises(ValueError, match="unknown invalid-request kind 'typo'"):
        Workload(image_size=64, max_tokens=4).invalid(0, "typo")


@pytest.mark.parametrize("stream", [True, False])
def test_valid_requests_pass_the_same_rules_with_the_asked_image_size_and_settings(stream):
    planned = Workload(image_size=96, max_tokens=7, model="m").valid(5, stream=stream)
    request = parse_chat_request(json.loads(planned.body))
    assert planned.valid and planned.stream is stream and planned.max_tokens == 7
    assert request.sampling.max_tokens == 7 and request.sampling.temperature == 0.0
    assert request.stream is stream and request.include_usage is stream and request.model == "m"
    image, _ = load_media(request.image_urls[0], MediaPolicy())
    assert image.size == (96, 96)


def test_shared_requests_are_the_asked_fraction_spread_evenly():
    for fraction in (0.0, 0.2, 0.25, 1 / 3, 1.0):
        flags = [is_shared(i, fraction) for i in range(300)]
        assert sum(flags) == int(300 * fraction)
        assert sum(flags[:30]) == int(30 * fraction)  # not bunched at one end


def test_shared_requests_carry_one_image_and_the_others_their_own():
    workload = Workload(image_size=64, max_tokens=4, shared_fraction=0.5)
    urls = [json.loads(workload.valid(i).body)["messages"][0]["content"][0]["image_url"]["url"] for i in range(6)]
    shared = [u for i, u in enumerate(urls) if is_shared(i, 0.5)]
    own = [u for i, u in enumerate(urls) if not is_shared(i, 0.5)]
    assert len(set(shared)) == 1 and len(set(own)) == len(own) == 3
    assert shared[0] not in own
    assert workload.valid(0, shared=True).shared_image and not workload.valid(1, shared=False).shared_image


def test_images_are_seeded():
    assert png_data_url(synthetic_image(64, 1)) == png_data_url(synthetic_image(64, 1))
    assert png_data_url(synthetic_image(64, 1)) != png_data_url(synthetic_image(64, 2))


def test_request_indices_start_at_zero():
    with pytest.raises(ValueError, match="start at 0"):
        Workload(image_size=64, max_tokens=4).valid(-1)


def test_ignore_eos_is_asked_for_only_when_wanted():
    plain = json.loads(Workload(image_size=32, max_tokens=5).valid(0).body)
    exact = json.loads(Workload(image_size=32, max_tokens=5, ignore_eos=True).valid(0).body)
    assert "ignore_eos" not in plain and exact["ignore_eos"] is True
    assert parse_chat_request(exact).sampling.ignore_eos
