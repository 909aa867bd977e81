"""``serve --dtype auto``: each stage loads as tuning chose, is listed, and answers as that model does.

The tuning the server reads from its cache is done here first, with a timer under which bf16
is fastest for both stages and the quality bound waived: on the random-weight fixture bf16's
top-1 agreement sits near the 99% bound and moves across it with the thread count, and the
bound is tested in tests/test_precision.py. What is tested here is the server's side: it
loads the stages as the cache says, lists them, and answers as that model answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import httpx
import pytest
import torch

from fastvlm.model import FastVLM
from fastvlm.precision import apply_precision, default_cache_path, tune, tune_precision
from fastvlm.precision.cache import CACHE_DIR_ENV
from tests.conftest import fixture_path
from tests.serve.conftest import TINY, fixture_image_url, user_turn
from tests.serve.live import live_server

QUESTION = "What is in the image?"


def bf16_fastest(fns: Mapping[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Milliseconds per candidate as if bf16 took half fp32's time and int8 twice it."""
    ms = {"fp32": 10.0, "bf16": 5.0}
    return {name: ms.get(name.split("/")[0], 20.0) for name in fns}


@pytest.fixture
def tuned_cache(monkeypatch, tmp_path) -> FastVLM:
    """The cache (in a temporary folder) holding bf16/bf16 for the fixture; returns that model converted by hand."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    measured = tune.check_quality
    monkeypatch.setattr(tune, "check_quality", lambda *a, **k: dataclasses.replace(measured(*a, **k), admissible=True))
    folder = fixture_path(TINY)
    choice = tune_precision(FastVLM.from_pretrained(folder), cache_path=default_cache_path(), timer=bf16_fastest)
    assert (choice.encoder, choice.decoder) == ("bf16", "bf16")
    return apply_precision(FastVLM.from_pretrained(folder), choice)


def test_the_server_loads_what_auto_chose_and_answers_like_that_model(tuned_cache: FastVLM):
    expected = tuned_cache.generate(image=fixture_path(TINY, "image.png"), prompt=QUESTION, max_new_tokens=8)
    with live_server(str(fixture_path(TINY)), dtype="auto") as url:  # loads from the folder, reads the cache
        card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        assert card["precision"] == {"encoder": "bf16", "decoder": "bf16"}
        body = {"model": TINY, "messages": [user_turn(QUESTION, fixture_image_url())], "max_tokens": 8}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["usage"]["completion_tokens"] == len(expected.token_ids)


def test_a_server_without_auto_lists_its_single_dtype(tiny_model):
    with live_server(str(fixture_path(TINY)), model=tiny_model) as url:
        card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert card["precision"] == {"encoder": "fp32", "decoder": "fp32"}
