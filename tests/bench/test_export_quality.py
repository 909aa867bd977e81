"""The measurements behind the quantized-variant table: agreement and KL, medians, the table."""

from __future__ import annotations

import numpy as np
import pytest

from fastvlm.bench.export_quality import Row, agreement_and_kl, make_samples, markdown_table, median_ms
from fastvlm.processing import IMAGE_TOKEN_INDEX
from tests.conftest import fixture_path


def test_identical_distributions_agree_fully_with_zero_kl() -> None:
    logits = [np.random.default_rng(0).standard_normal((5, 50)).astype(np.float32)]
    assert agreement_and_kl(logits, logits) == (1.0, pytest.approx(0.0, abs=1e-12))


def test_kl_is_the_reference_weighted_log_ratio_and_agreement_counts_top1() -> None:
    p = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]))
    q = np.log(np.array([[0.5, 0.4, 0.1], [0.6, 0.3, 0.1]]))
    agreement, kl = agreement_and_kl([p], [q])
    expected = np.mean([(np.exp(p[i]) * (p[i] - q[i])).sum() for i in range(2)])
    assert agreement == 0.5 and kl == pytest.approx(expected)


def test_samples_are_seeded_prompts_with_one_image_each() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture_path("apple_fastvlm_tiny"))
    first, again = make_samples(tokenizer, 64, 3), make_samples(tokenizer, 64, 3)
    for a, b in zip(first, again, strict=True):
        assert a.ids == b.ids and a.ids.count(IMAGE_TOKEN_INDEX) == 1
        assert a.pixel_values.shape == (1, 3, 64, 64) and np.array_equal(a.pixel_values, b.pixel_values)
    assert first[0].ids != first[1].ids


def test_median_ms_times_each_call() -> None:
    calls: list[int] = []
    assert median_ms(lambda: calls.append(1), repeats=5, warmup=2) >= 0 and len(calls) == 7


def test_table_has_one_line_per_row() -> None:
    rows = [Row("q4", "onnxruntime", 317_000_000, 120.0, 15.5, 0.912, 0.0831)]
    assert markdown_table(rows).splitlines()[-1] == "| q4 | onnxruntime | 317.0 | 120.0 | 15.5 | 0.912 | 0.0831 |"
