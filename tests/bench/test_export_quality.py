"""The measurements behind the quantized-variant table: agreement and KL, medians, the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastvlm.bench.export_quality import (
    OnnxGraphs,
    Row,
    Sample,
    agreement_and_kl,
    make_samples,
    markdown_table,
    measure,
    median_ms,
)
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


# ----------------------------------------------------------------------------- on a real export


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The authors'-format tiny fixture exported to ONNX, with every quantized variant."""
    from fastvlm.export.onnx import export_onnx
    from fastvlm.export.quantize import VARIANTS, write_variants

    folder = export_onnx(fixture_path("apple_fastvlm_tiny"), tmp_path_factory.mktemp("tiny") / "onnx")
    write_variants(folder, VARIANTS)
    return folder


def test_the_graphs_driven_here_reproduce_the_fixtures_greedy_tokens(tiny_export: Path) -> None:
    from transformers import AutoTokenizer

    from fastvlm.processing import ImageProcessor, tokenize_prompt

    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_export)
    pixels = ImageProcessor(256, "pad")(fixture_path("apple_fastvlm_tiny", "image.png"))[None].numpy()
    sample = Sample(ids=tokenize_prompt(tokenizer, golden["prompt"]), pixel_values=pixels)
    greedy = OnnxGraphs(tiny_export, "fp32").greedy(sample, len(golden["greedy_token_ids"]))
    assert greedy == golden["greedy_token_ids"]


# Measured on the tiny fixture (4 prompts x 8 tokens, onnxruntime 1.32): top-1 agreement /
# mean KL: fp16 1.000 / 2e-6, int8 0.938 / 0.0019, uint8 0.938 / 0.0016, q4 and q4f16 0.781 /
# 0.072. The bounds leave room above each, and the 8-bit bounds would reject the 4-bit rows.
BOUNDS = {"fp16": (0.95, 1e-3), "int8": (0.85, 0.01), "uint8": (0.85, 0.01), "q4": (0.6, 0.25), "q4f16": (0.6, 0.25)}


def test_every_variant_stays_near_fp32_on_the_tiny_model(tiny_export: Path) -> None:
    from transformers import AutoTokenizer

    samples = make_samples(AutoTokenizer.from_pretrained(tiny_export), 256, 4)
    rows, _ = measure(tiny_export, list(BOUNDS), samples, steps=8, repeats=1, log=lambda line: None)
    assert [row.variant for row in rows] == ["fp32", *BOUNDS]
    assert (rows[0].top1_agreement, rows[0].kl) == (1.0, 0.0)
    for row in rows[1:]:
        agreement, kl = BOUNDS[row.variant]
        assert row.top1_agreement >= agreement and row.kl <= kl, row
        assert row.bytes < rows[0].bytes
