"""The TTFT benchmark's rows on a tiny configuration (schema and consistency, not timings)."""

from __future__ import annotations

import fastvlm.bench.ttft as ttft
from tests.bench.tiny import tiny_config


def test_ttft_rows_on_a_tiny_model(monkeypatch):
    monkeypatch.setattr(ttft, "fastvlm_config", tiny_config)
    rows = ttft.run_ttft_benchmark([64, 128], text_tokens=10, new_tokens=3, repeats=1, progress=False)
    assert [r.visual_tokens for r in rows] == [1, 4]
    assert [r.prompt_tokens for r in rows] == [11, 14]
    for r in rows:
        assert r.vision_ms > 0 and r.prefill_ms > 0 and r.decode_tokens_per_s > 0
        assert r.dtype == "float32" and r.device == "cpu"
    assert "| cpu | float32 | 0.5b | 128 | 4 | 14 |" in ttft.format_ttft_table(rows)
