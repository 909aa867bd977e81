"""The soak's plan, its verdict on each answer, and the memory-growth figure (no server needed)."""

from __future__ import annotations

from collections import Counter

import pytest

from fastvlm.bench.serve_load import RequestResult
from fastvlm.bench.serve_requests import INVALID_KINDS, Workload
from fastvlm.bench.serve_soak import judge, plan_soak, rss_by_window, rss_growth, soak_markdown, summarize_soak


def test_a_fifth_of_the_plan_is_invalid_with_every_kind_and_both_stream_modes():
    plans = plan_soak(Workload(image_size=32, max_tokens=4), 100, invalid_fraction=0.2, seed=1)
    kinds = Counter(p.kind for p in plans)
    assert kinds["valid"] == 80 and sum(kinds.values()) == 100
    assert set(kinds) - {"valid"} == set(INVALID_KINDS)
    assert sorted(p.index for p in plans) == list(range(100))
    assert plans != sorted(plans, key=lambda p: p.index)  # shuffled, so invalid ones are spread in time
    for valid in (True, False):
        streams = Counter(p.stream for p in plans if p.valid is valid)
        assert streams[True] > 0 and streams[False] > 0


def test_the_plan_is_seeded():
    workload = Workload(image_size=32, max_tokens=4)
    first, again = (plan_soak(workload, 20, invalid_fraction=0.2, seed=3) for _ in range(2))
    assert first == again


def _result(status: int, *, ok: bool = False, error: str | None = None) -> RequestResult:
    return RequestResult(index=0, kind="", status=status, ok=ok, error=error)


def test_judge_wants_complete_answers_for_valid_requests_and_4xx_json_errors_for_invalid_ones():
    workload = Workload(image_size=32, max_tokens=4)
    valid, invalid = workload.valid(0), workload.invalid(1, "bad_role")
    assert judge(valid, _result(200, ok=True)) is None
    assert "ended without" in judge(valid, _result(200, error="the stream ended without usage"))
    assert judge(invalid, _result(400, error="messages[0].role 'robot' is not one of ...")) is None
    assert "expected a 4xx" in judge(invalid, _result(200, ok=True))
    assert "expected a 4xx" in judge(invalid, _result(500, error="boom"))
    assert "without an OpenAI error object" in judge(invalid, _result(422, error="not an OpenAI error object: b''"))


def test_the_memorys_course_is_the_mean_of_each_hundred():
    samples = [100.0] * 100 + [200.0] * 100 + [300.0] * 50
    assert rss_by_window(samples) == [100.0, 200.0]  # a last, partial hundred is left out
    assert rss_by_window([1.0, 3.0, 5.0]) == [1.0, 3.0, 5.0]  # short soaks: windows of half or less
    assert rss_by_window([1.0]) == []


def test_rss_growth_compares_the_first_and_last_hundred():
    samples = [100.0] * 100 + [500.0] * 300 + [110.0] * 100
    first, last, growth = rss_growth(samples)
    assert (first, last) == (100.0, 110.0) and growth == pytest.approx(10.0)
    assert rss_growth([100.0, 120.0]) == (100.0, 120.0, pytest.approx(20.0))  # short soaks: halves
    assert rss_growth([100.0]) == (None, None, None)


def test_summary_counts_losses_and_the_verdict():
    workload = Workload(image_size=32, max_tokens=4)
    done = [
        (workload.valid(0), _result(200, ok=True)),
        (workload.valid(1), _result(0, error="ReadTimeout: ")),
        (workload.invalid(2, "zero_max_tokens"), _result(400, error="'max_tokens' must be a positive integer")),
    ]
    result = summarize_soak(done, [100.0, 101.0, 102.0, 103.0], 1.0, max_growth_pct=10.0)
    assert (result.valid, result.valid_ok, result.invalid, result.invalid_refused) == (2, 1, 1, 1)
    assert not result.passed and result.failures == ["request 1 (valid, stream=True): 0: ReadTimeout: "]
    assert result.statuses == {"valid": {"0": 1, "200": 1}, "zero_max_tokens": {"400": 1}}
    assert result.rss_window == 2 and result.rss_growth_pct == pytest.approx(2 / 100.5 * 100)
    report = soak_markdown(result, {"model": "m", "soak_clients": 2})
    assert "**FAILED**: 1 of 2 valid" in report and "| zero_max_tokens | 1x 400 |" in report
    assert "no uncounted warm-up requests" in report and "RSS by 2 completions (MiB): 100, 102" in report

    lost_memory = summarize_soak(done[:1], [100.0, 120.0], 1.0, max_growth_pct=10.0)
    assert lost_memory.valid_ok == lost_memory.valid and not lost_memory.passed  # 20 % growth
