"""The decode-precision benchmark's rows on a tiny configuration (schema and consistency, not timings)."""

from __future__ import annotations

import pytest
import torch

import fastvlm.bench.decode_precision as decode_precision
from fastvlm.linears import GemvLinear, Int8WeightOnlyLinear
from tests.bench.tiny import tiny_config


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_precision, "fastvlm_config", tiny_config)


def test_rows_on_a_tiny_model(tiny: None) -> None:
    rows = decode_precision.run_decode_precision(visual_tokens=4, text_tokens=6, steps=4, rounds=2)
    assert [r.variant for r in rows] == [v.name for v in decode_precision.VARIANTS]
    by_name = {r.variant: r for r in rows}
    fp32 = by_name["fp32"]
    assert fp32.vs_fp32 == 1 and fp32.greedy_agreement == 1 and fp32.top1_agreement == 1
    assert fp32.max_logit_diff == 0
    for r in rows:
        assert len(r.runs) == 2 and r.tokens_per_s > 0 and r.step_weight_mb > 0
        assert r.vs_fp32 == pytest.approx(r.tokens_per_s / fp32.tokens_per_s)
        assert 0 <= r.greedy_agreement <= 1 and 0 <= r.top1_agreement <= 1
    full = by_name["fp32 full head"]
    assert by_name["bf16 full head"].step_weight_mb == pytest.approx(full.step_weight_mb / 2)
    assert fp32.step_weight_mb < full.step_weight_mb  # the screen reads an int8 copy of the head, not the head
    assert full.greedy_agreement == 1  # the screen's tokens are the whole head's
    int8_head = by_name["int8-head"].step_weight_mb  # the tiny vocabulary's head is most of the bytes here
    assert int8_head < by_name["int8"].step_weight_mb and int8_head < by_name["bf16"].step_weight_mb
    table = decode_precision.format_decode_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| fp32 |" in table and "| int8-head |" in table


def test_each_variant_is_built_as_named(tiny: None) -> None:
    by_name = {v.name: v for v in decode_precision.VARIANTS}
    lm = decode_precision.build_variant(by_name["int8-head bf16"], "0.5b").language_model
    assert isinstance(lm.lm_head, Int8WeightOnlyLinear) and lm.model.embed_tokens.weight.dtype == torch.bfloat16
    lm = decode_precision.build_variant(by_name["bf16"], "0.5b").language_model
    assert isinstance(lm.lm_head, GemvLinear) and lm.lm_head.use_mv
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    lm = decode_precision.build_variant(by_name["bf16 F.linear"], "0.5b").language_model
    assert isinstance(lm.lm_head, GemvLinear) and not lm.lm_head.use_mv
    assert decode_precision.build_variant(by_name["bf16"], "0.5b").lean_decode
    assert not decode_precision.build_variant(by_name["bf16 transformers step"], "0.5b").lean_decode
    assert decode_precision.build_variant(by_name["fp32"], "0.5b").screen_greedy_head
    assert not decode_precision.build_variant(by_name["fp32 full head"], "0.5b").screen_greedy_head
    lm = decode_precision.build_variant(by_name["int8 torchao"], "0.5b").language_model
    assert type(lm.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"


def test_the_reference_must_be_plain_fp32(tiny: None) -> None:
    by_name = {v.name: v for v in decode_precision.VARIANTS}
    firsts = ("bf16", "fp32 python layers", "fp32 transformers step")
    for variants in [(by_name[name], by_name["fp32"]) for name in firsts]:
        with pytest.raises(ValueError, match="reference"):
            decode_precision.run_decode_precision(variants=variants, visual_tokens=2, text_tokens=2, steps=2, rounds=1)
