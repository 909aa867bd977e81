"""The TTFT benchmark's rows on a tiny configuration (schema and consistency, not timings)."""

from __future__ import annotations

import fastvlm.bench.ttft as ttft
from fastvlm.model import fastvlm_config
from fastvlm.vision import FastViTConfig


def test_ttft_rows_on_a_tiny_model(monkeypatch):
    def tiny(llm: str):
        config = fastvlm_config("0.5b")
        config.vision = FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128))
        for key, value in dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=64, vocab_size=3000).items():  # fmt: skip
            setattr(config.text, key, value)
        return config

    monkeypatch.setattr(ttft, "fastvlm_config", tiny)
    rows = ttft.run_ttft_benchmark([64, 128], text_tokens=10, new_tokens=3, repeats=1, progress=False)
    assert [r.visual_tokens for r in rows] == [1, 4]
    assert [r.prompt_tokens for r in rows] == [11, 14]
    for r in rows:
        assert r.vision_ms > 0 and r.prefill_ms > 0 and r.decode_tokens_per_s > 0
        assert r.dtype == "float32" and r.device == "cpu"
    assert "| cpu | float32 | 0.5b | 128 | 4 | 14 |" in ttft.format_ttft_table(rows)
