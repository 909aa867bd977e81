"""The load test: percentiles, level figures and ratios, the host guard, and one run against a live server.

Timing goals (tokens/s at 16 clients vs 1) are measured by ``fastvlm bench-serve``, not
asserted here: a test on a shared machine can only check that the figures are computed
from what the server answered.
"""

from __future__ import annotations

import asyncio
import os
import random

import numpy as np
import pytest

from fastvlm.bench.serve_load import (
    LoadSettings,
    RequestResult,
    add_ratios,
    check_local_url,
    format_level_table,
    percentile,
    run_load_test,
    served_model_id,
    summarize_level,
)
from fastvlm.bench.serve_process import rss_reader
from fastvlm.bench.serve_requests import Workload
from fastvlm.bench.serve_soak import plan_soak, run_soak
from fastvlm.errors import ConfigError, UsageError
from tests.conftest import fixture_path


def test_percentiles_match_numpys_linear_interpolation():
    rng = random.Random(0)
    for n in (1, 2, 5, 17, 100):
        values = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _ok(index: int, *, ttft: float, e2e: float, tokens: int, finish: str = "length", cached: int = 0):
    return RequestResult(
        index=index,
        kind="valid",
        status=200,
        ok=True,
        ttft_s=ttft,
        e2e_s=e2e,
        completion_tokens=tokens,
        cached_tokens=cached,
        finish_reason=finish,
        timings={"queue_ms": 5.0 * index},
    )


def test_level_figures_come_from_the_successful_requests_over_the_wall_time():
    results = [
        _ok(0, ttft=0.1, e2e=1.0, tokens=64),
        _ok(1, ttft=0.3, e2e=2.0, tokens=32, finish="stop", cached=16),
        RequestResult(index=2, kind="valid", status=429, error="the server is at capacity"),
        RequestResult(index=3, kind="valid", status=0, error="ConnectError: refused"),
    ]
    level = summarize_level(4, results, wall_s=2.0, stopped=False)
    assert (level.requests, level.ok, level.errors) == (4, 2, {"0": 1, "429": 1})
    assert level.requests_per_s == 1.0 and level.output_tokens == 96 and level.output_tokens_per_s == 48.0
    assert level.ttft_p50_ms == pytest.approx(200.0) and level.ttft_p99_ms == pytest.approx(298.0)
    assert level.e2e_p50_ms == pytest.approx(1500.0) and level.mean_completion_tokens == 48.0
    assert (level.early_stops, level.cache_hits, level.server_queue_p50_ms) == (1, 1, 2.5)
    assert level.error_examples == ["429: the server is at capacity", "0: ConnectError: refused"]


def test_ratios_are_relative_to_the_one_client_level():
    levels = [
        summarize_level(n, [_ok(0, ttft=0.1, e2e=1.0, tokens=tokens)], wall_s=1.0, stopped=False)
        for n, tokens in ((1, 10), (4, 35), (16, 52))
    ]
    add_ratios(levels)
    assert [lv.tokens_per_s_vs_1_client for lv in levels] == [1.0, 3.5, 5.2]
    table = format_level_table(levels)
    assert "| 16 | 1 | 1 | 0 | 1.00 | 52.0 | 5.20 | 100 |" in table

    without_one = levels[1:]
    add_ratios(without_one)
    assert all(lv.tokens_per_s_vs_1_client is None for lv in without_one)
    assert "| – |" in format_level_table(without_one)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://[::1]:9"])
def test_local_servers_are_accepted(url):
    assert check_local_url(url) == url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://example.com:8000", "only servers on this machine"),
        ("http://10.0.0.5:8000", "only servers on this machine"),
        ("http://localhost:8000", "only servers on this machine"),  # a name could resolve anywhere
        ("http://127.0.0.1.nip.io:8000", "only servers on this machine"),
        ("https://127.0.0.1:8000", "http://"),
        ("127.0.0.1:8000", "http://"),
        ("http://127.0.0.1:8000/v1/chat/completions", "base URL"),
    ],
)
def test_other_hosts_and_urls_are_refused_with_a_clear_error(url, why):
    with pytest.raises(UsageError, match=why):
        check_local_url(url)


def test_requests_per_client_are_one_count_or_one_per_level():
    assert [LoadSettings(levels=(1, 4), requests_per_client=(3,)).requests_at(i) for i in (0, 1)] == [3, 3]
    assert [LoadSettings(levels=(1, 4), requests_per_client=(3, 1)).requests_at(i) for i in (0, 1)] == [3, 1]
    with pytest.raises(ConfigError, match="one count or one per level"):
        LoadSettings(levels=(1, 4, 16), requests_per_client=(3, 1))


def test_a_load_test_and_a_soak_against_a_live_server():
    """A couple of clients and a short soak against the real app serving the tiny fixture model."""
    from tests.serve.live import live_server

    with live_server(str(fixture_path("apple_fastvlm_tiny")), max_batch_size=4) as base_url:
        model_id = served_model_id(base_url)
        workload = Workload(image_size=64, max_tokens=4, shared_fraction=0.5, model=model_id)
        settings = LoadSettings(levels=(1, 2), requests_per_client=(3, 2), time_limit_s=120)
        levels = asyncio.run(run_load_test(base_url, workload, settings, progress=False))
        plans = plan_soak(workload, 30, invalid_fraction=0.2)
        rss = rss_reader(os.getpid())  # the test server runs in this process
        soak = asyncio.run(run_soak(base_url, plans, clients=3, rss_mib=rss, progress=False))
    assert model_id == "apple_fastvlm_tiny"
    assert [(lv.clients, lv.requests, lv.ok, lv.errors) for lv in levels] == [(1, 3, 3, {}), (2, 4, 4, {})]
    for level in levels:
        assert level.output_tokens == level.ok * level.mean_completion_tokens > 0
        assert 0 < level.ttft_p50_ms <= level.e2e_p50_ms and level.ttft_p99_ms is not None
    assert levels[0].tokens_per_s_vs_1_client == 1.0 and levels[1].tokens_per_s_vs_1_client is not None
    assert levels[1].cache_hits >= 1  # the shared image was encoded once
    assert (soak.valid, soak.invalid) == (24, 6) and soak.failures == []
    assert soak.valid_ok == 24 and soak.invalid_refused == 6
    assert len(soak.rss_samples_mib) == 30 and soak.rss_growth_pct is not None
