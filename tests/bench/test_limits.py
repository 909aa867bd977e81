"""The limit-relative benchmark: the work it counts per stage, its fractions, its report and command line."""

from __future__ import annotations

import json

import pytest
import torch

from fastvlm.bench.gpu_common import encoder_flops, model_config
from fastvlm.bench.limits import (
    FLOOR_HEAD_DIM,
    LimitSettings,
    copy_rate,
    decode_step_bytes,
    floor_config,
    matmul_rate,
    prefill_flops,
    read_rate,
    run_limits,
)
from fastvlm.bench.limits_report import REPORT_JSON, REPORT_MD, Sample, summarize
from fastvlm.cli import main
from fastvlm.dtypes import DTYPES
from fastvlm.model import FastVLM

CPU = torch.device("cpu")


def _tiny_text(tied: bool = True):
    text = model_config("tiny", 128).text
    text.tie_word_embeddings = tied
    return text


@pytest.mark.parametrize("tokens", [7, 20])
def test_prefill_flops_are_two_per_weight_and_token_plus_the_attention_products(tokens):
    text = _tiny_text()
    h, inter, layers, vocab = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    d = h // heads
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter  # q, k, v, o, gate/up/down
    linear = 2 * per_layer * layers * tokens
    attention = layers * 2 * (2 * heads * tokens * tokens * d)  # q k^T and the weighted sum of v, full L x L
    head = 2 * h * vocab  # the logits of the last position only
    assert prefill_flops(text, tokens) == linear + attention + head


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_bytes_are_every_weight_once_with_the_head_and_the_kv_cache(tied, dtype):
    config = model_config("tiny", 128)
    config.text.tie_word_embeddings = tied
    lm = FastVLM.from_config(config, device="cpu", dtype=dtype).language_model
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    embedding = lm.model.embed_tokens.weight
    others = sum(p.nbytes for p in lm.parameters() if p is not embedding)  # linears, biases, norms (and an untied head)
    weights = others + (embedding.nbytes if tied else 0)  # a tied table is read once, as the head
    text = config.text
    kv_heads, d = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * kv_heads * d * 30 * dtype.itemsize  # keys and values of 30 positions
    assert decode_step_bytes(text, dtype, 30) == weights + kv
    assert decode_step_bytes(text, dtype, 31) - decode_step_bytes(text, dtype, 30) == kv // 30


def test_the_ceilings_count_their_work():
    matmul = matmul_rate(32, torch.float32, CPU, warmup=0, repeats=1)
    assert matmul.work == 2 * 32**3 and matmul.per_s == pytest.approx(matmul.work / (matmul.ms / 1e3))
    assert read_rate(2**20, CPU, warmup=0, repeats=1).work == 2**20
    assert copy_rate(2**20, CPU, warmup=0, repeats=1).work == 2 * 2**20  # read + written


def _sample(round: int, stage: str, *, ms: float, work: float, limit: float | None, resolution: int | None = 256):
    per_s = work / (ms / 1e3)
    return Sample(
        round=round,
        device="cpu",
        stage=stage,
        dtype="fp32",
        resolution=resolution,
        tokens=None if resolution is None else 10,
        work=work,
        ms=ms,
        per_s=per_s,
        limit_per_s=limit,
        fraction=None if limit is None else per_s / limit,
    )


def test_the_floor_model_keeps_the_decoders_depth_and_heads_and_cuts_its_widths():
    config = model_config("0.5b", 1024)
    floor = floor_config(config)
    text, narrow = config.text, floor.text
    kept = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    assert all(getattr(narrow, k) == getattr(text, k) for k in kept)
    assert narrow.hidden_size == narrow.intermediate_size == text.num_attention_heads * FLOOR_HEAD_DIM
    assert narrow.vocab_size < 10_000 and narrow.bos_token_id < narrow.vocab_size
    assert floor.image_size == config.image_size and config.text.hidden_size == 896  # the original is untouched
    weights = sum(p.numel() for p in FastVLM.from_config(floor).language_model.parameters())
    assert weights < 494e6 / 200  # under a 200th of the 0.5B decoder's weights


def test_the_decode_bound_with_the_floor_adds_the_floors_time_to_the_bytes():
    samples = [
        _sample(0, "read", ms=100, work=1e9, limit=None, resolution=None),
        _sample(0, "decode", ms=200, work=1e9, limit=10e9),  # 100 ms of bytes at the bandwidth
    ]
    samples[1].floor_ms = 25.0
    _, (row,) = summarize(samples)
    assert row.bound_tokens_per_s == pytest.approx(10.0)
    assert row.floor_bound_tokens_per_s == pytest.approx(1 / 0.125)


def test_the_summary_gives_the_median_fraction_and_its_range_over_rounds():
    samples = [
        _sample(0, "read", ms=100, work=1e9, limit=None, resolution=None),
        _sample(1, "read", ms=50, work=1e9, limit=None, resolution=None),
        _sample(2, "read", ms=80, work=1e9, limit=None, resolution=None),
        _sample(0, "decode", ms=200, work=1e9, limit=10e9),  # 5 GB/s of 10: 50%
        _sample(1, "decode", ms=250, work=1e9, limit=20e9),  # 4 of 20: 20%
        _sample(2, "decode", ms=125, work=1e9, limit=12.5e9),  # 8 of 12.5: 64%
    ]
    (ceiling,), (row,) = summarize(samples)
    assert (ceiling.kind, ceiling.per_s, ceiling.min_per_s, ceiling.max_per_s) == ("read", 12.5e9, 10e9, 20e9)
    assert ceiling.median_ms == 80
    assert (row.stage, row.limit, row.median_ms) == ("decode", "read", 200)
    assert row.fraction == pytest.approx(0.5) and row.min_fraction == pytest.approx(0.2)
    assert row.max_fraction == pytest.approx(0.64)
    assert row.tokens_per_s == pytest.approx(5.0)  # 1000 / median ms
    assert row.bound_tokens_per_s == pytest.approx(12.5)  # median of 10, 20, 12.5 steps/s at the bandwidth


def test_every_fraction_is_the_achieved_rate_over_its_rounds_ceiling():
    settings = LimitSettings.smoke(dtypes=("fp32",), rounds=2, quantizations=())
    report = run_limits(settings, progress=False)
    ceilings = {(s.round, s.stage, s.dtype): s.per_s for s in report.samples if s.resolution is None}
    assert sorted(ceilings) == [(r, kind, "fp32") for r in (0, 1) for kind in ("floor", "matmul", "read")]
    stages = [s for s in report.samples if s.resolution is not None]
    assert [(s.round, s.stage) for s in stages] == [(r, st) for r in (0, 1) for st in ("encoder", "prefill", "decode")]
    for s in stages:
        kind = "read" if s.stage == "decode" else "matmul"
        assert s.per_s == pytest.approx(s.work / (s.ms / 1e3))
        assert s.limit_per_s == ceilings[(s.round, kind, "fp32")]
        assert s.fraction == pytest.approx(s.per_s / s.limit_per_s)
        floor_ms = 1e3 / ceilings[(s.round, "floor", "fp32")]
        assert s.floor_ms == (pytest.approx(floor_ms) if s.stage == "decode" else None)
    for row in report.rows:
        fractions = [s.fraction for s in stages if s.stage == row.stage]
        assert row.min_fraction == min(fractions) and row.max_fraction == max(fractions)


def test_the_smoke_command_writes_the_table_and_the_json(tmp_path, capsys):
    out = tmp_path / "limits"
    assert main(["bench-limits", "--smoke", "--dtypes", "fp32", "bf16", "--rounds", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [REPORT_JSON, REPORT_MD]
    saved = json.loads((out / REPORT_JSON).read_text())
    assert set(saved) == {"meta", "settings", "ceilings", "rows", "samples"}
    assert saved["meta"]["torch"] == torch.__version__ and saved["meta"]["cpu_threads"] == torch.get_num_threads()
    assert saved["settings"]["llm"] == "tiny" and saved["settings"]["rounds"] == 2
    ceilings = [(c["kind"], c["dtype"]) for c in saved["ceilings"]]
    floors = [("floor", "fp32"), ("floor", "bf16"), ("floor", "int8-head")]  # int8-head: the default quantization
    assert ceilings == [("matmul", "fp32"), ("matmul", "bf16"), ("read", "fp32"), *floors]
    assert len(saved["samples"]) == 2 * (6 + 2 * 3 + 1)  # ceilings and floors, 3 stages per dtype, int8-head decode

    rows = {(r["stage"], r["dtype"]): r for r in saved["rows"]}
    stages = [(st, dt) for st in ("encoder", "prefill", "decode") for dt in ("fp32", "bf16")]
    assert sorted(rows) == sorted([*stages, ("decode", "int8-head")])
    config = model_config("tiny", 128)
    prompt = 8 + config.num_image_tokens(128)  # the smoke prompt's text tokens + the visual tokens
    assert rows[("encoder", "fp32")]["work"] == encoder_flops(config, 128)
    assert rows[("encoder", "fp32")]["tokens"] == config.num_image_tokens(128)
    assert rows[("prefill", "bf16")]["tokens"] == prompt
    assert rows[("prefill", "bf16")]["work"] == prefill_flops(config.text, prompt)
    kv = prompt + 1 + 2 // 2 + 1  # one warm-up step, then the middle of two timed steps
    assert rows[("decode", "bf16")]["tokens"] == kv
    # greedy steps read the head's int8 screen (fastvlm.greedy_head) instead of the head: an int8 copy, bf16
    # scales and fp32 bounds per row, and every (vocab // 64)-th row checked for changes, for the [vocab, hidden] weight
    vocab, hidden = config.text.vocab_size, config.text.hidden_size
    sampled = len(range(0, vocab, max(1, vocab // 64)))
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        screened = vocab * hidden + vocab * (2 + 4) + sampled * hidden * size - vocab * hidden * size
        assert rows[("decode", dtype)]["work"] == decode_step_bytes(config.text, DTYPES[dtype], kv) + screened
    for row in saved["rows"]:
        assert row["min_fraction"] <= row["fraction"] <= row["max_fraction"]
        assert (row["tokens_per_s"] is not None) == (row["stage"] == "decode")
        if row["stage"] == "decode":  # the floor costs time, so the bound with it is lower
            assert row["floor_bound_tokens_per_s"] < row["bound_tokens_per_s"]
    assert "| decode step floor (same depth and heads, tiny weights) | bf16 | 1 step |" in (out / REPORT_MD).read_text()

    markdown = (out / REPORT_MD).read_text()
    assert markdown in capsys.readouterr().out
    assert "| cpu | matmul 128² | bf16 |" in markdown and "| cpu | read (sum over 8 MiB) | fp32 |" in markdown
    assert f"| cpu | prefill | 128 | fp32 | {prompt} |" in markdown
    assert f"| cpu | decode | 128 | bf16 | {kv} |" in markdown
    assert torch.__version__ in markdown


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resolutions", "256", "100"], "resolution 100 is not a positive multiple of 64"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--matmul-n", "-4"], "--matmul-n must be at least 1"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--device", "cuda"], "sees no CUDA device"),
    ],
)
def test_bad_arguments_fail_before_anything_is_built(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(FastVLM, "from_config", lambda *a, **k: pytest.fail("a model was built"))
    out = tmp_path / "limits"
    assert main(["bench-limits", "--smoke", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_quantized_decode_is_held_against_the_read_rate_with_its_stored_bytes():
    from fastvlm.bench.gpu_common import kv_bytes_per_row
    from fastvlm.bench.limits import build_quantized
    from fastvlm.quantization import decode_step_bytes as stored_step_bytes

    settings = LimitSettings.smoke(dtypes=("fp32",), rounds=1)
    assert settings.quantizations == ("int8-head",)
    report = run_limits(settings, progress=False)
    by_kind = {(s.stage, s.dtype): s for s in report.samples}
    decode, fp32 = by_kind[("decode", "int8-head")], by_kind[("decode", "fp32")]
    model = build_quantized(settings.llm, settings.resolutions[0], "int8-head")
    assert model.quantization == "int8-head"
    assert decode.work == stored_step_bytes(model) + kv_bytes_per_row(model.config.text, torch.float32, decode.tokens)
    full_fp32 = decode_step_bytes(model.config.text, torch.float32, decode.tokens)
    assert decode.work < full_fp32 / 2  # int8 weights (and the head's copy) against fp32 ones
    assert decode.work < fp32.work  # ... and against fp32 layers with the head's int8 screen
    assert decode.limit_per_s == by_kind[("read", "fp32")].per_s
    assert decode.floor_ms == pytest.approx(1e3 / by_kind[("floor", "int8-head")].per_s)
    assert ("decode", 128, "int8-head") in {(r.stage, r.resolution, r.dtype) for r in report.rows}


def test_no_quantizations_leaves_the_quantized_rows_out(tmp_path):
    out = tmp_path / "limits"
    args = ["bench-limits", "--smoke", "--dtypes", "fp32", "--rounds", "1", "--quantizations", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / REPORT_JSON).read_text())
    assert saved["settings"]["quantizations"] == []
    assert {s["dtype"] for s in saved["samples"]} == {"fp32"}
