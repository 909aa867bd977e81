"""``fastvlm bench-vs-transformers``: the one-line error without timm, the flags it refuses,
the rows and report built from measured rounds, and (where timm is installed, as in
.venv-hf) a real run of both models at toy sizes."""

from __future__ import annotations

import importlib.util
import json

import pytest

from fastvlm.bench import vs_transformers as vs
from fastvlm.bench.vs_transformers import (
    OURS,
    REPORT_JSON,
    REPORT_MD,
    THEIRS,
    CompareReport,
    CompareSettings,
    agreement,
    assemble_row,
    first_divergence,
    format_report,
    run_comparison,
    write_report,
)
from fastvlm.cli import main
from fastvlm.errors import CheckpointError, ConfigError

HAS_TIMM = importlib.util.find_spec("timm") is not None
ENV_COMMAND = "bash benchmarks/transformers_env.sh"
TINY_RUN = ["--size", "tiny", "--resolutions", "128", "--repeats", "1", "--new-tokens", "4", "--text-tokens", "8"]


def _times(encoder, prefill, ttft, generate, decode):
    return {"encoder": encoder, "prefill": prefill, "ttft": ttft, "generate": generate, "decode": decode}


def _row(**changes):
    """A row from three rounds of made-up times: theirs slower, the rounds' noise differing."""
    times = {
        OURS: _times([100, 120, 110], [50, 60, 40], [200, 220, 210], [500, 520, 510], [300, 310, 290]),
        THEIRS: _times([150, 130, 140], [70, 80, 60], [300, 440, 210], [800, 900, 700], [500, 310, 580]),
    }
    tokens = {OURS: [[1, 2, 3], [4, 5, 6], [7, 8, 9]], THEIRS: [[1, 2, 3], [4, 0, 6], [0, 8, 9]]}
    args = dict(dtype="float32", resolution=1024, visual_tokens=256, prompt_tokens=288, new_tokens=4)
    return assemble_row(**(args | {"times": times, "tokens": tokens} | changes))


# ------------------------------------------------------------------------------ without timm


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed here: the missing-timm error cannot happen")
def test_without_timm_the_command_says_in_one_line_how_to_get_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench-vs-transformers", *TINY_RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastvlm bench-vs-transformers: error: ")
    assert "timm" in err and ENV_COMMAND in err and ".venv-hf/bin/fastvlm bench-vs-transformers" in err
    assert not out.exists()  # stopped before writing a checkpoint or a report


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed here")
def test_the_library_call_raises_the_same_config_error():
    with pytest.raises(ConfigError, match="transformers_env.sh"):
        run_comparison(CompareSettings(size="tiny", resolutions=(128,)))


# ------------------------------------------------------------------------------ flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--warmup", "-1"], "--warmup at least 0"),
        (["--new-tokens", "1"], "--new-tokens must be at least 2"),
        (["--resolutions", "100"], "not a positive multiple of 64"),
        (["--model", "/nonexistent/model"], "is not a folder"),
        (["--device", "cuda:7"], "sees no CUDA device"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["bench-vs-transformers", *TINY_RUN, *flags, "--out", str(out)])
    assert status == 2 and message in capsys.readouterr().err and not out.exists()


def test_unknown_dtypes_and_too_few_rounds_are_config_errors():
    with pytest.raises(ConfigError, match="dtypes"):
        CompareSettings(dtypes=("float8",))
    with pytest.raises(ConfigError, match="repeats"):
        CompareSettings(repeats=0)


def test_a_checkpoint_in_another_format_is_refused_with_the_conversion_to_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_qwen2"}))
    with pytest.raises(CheckpointError, match="--format hf"):
        vs.check_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        vs.check_checkpoint(tmp_path / "empty")


# ------------------------------------------------------------------------------ rows and report


def test_a_row_holds_the_medians_the_ratios_and_their_spread_within_rounds():
    row = _row()
    assert (row.ours.encoder_ms, row.ours.prefill_ms, row.ours.ttft_ms, row.ours.generate_ms) == (110, 50, 210, 510)
    assert (row.theirs.encoder_ms, row.theirs.ttft_ms) == (140, 300)
    assert row.ours.decode_tokens_per_s == pytest.approx(3 / 0.300)  # 3 decode steps in the median 300 ms
    assert row.theirs.decode_tokens_per_s == pytest.approx(3 / 0.500)
    assert row.ttft_ratio == pytest.approx(300 / 210)
    assert row.ttft_ratio_range == pytest.approx((1.0, 2.0))  # round 3: 210 vs 210; round 2: 440 vs 220
    assert row.decode_ratio == pytest.approx(500 / 300)
    assert row.decode_ratio_range == pytest.approx((310 / 310, 580 / 290))
    assert row.rounds == 3 and row.first_divergence == [None, 1, 0]


def test_rounds_of_different_lengths_are_a_bug_not_a_row():
    times = {OURS: _times([1], [1], [1], [2], [1]), THEIRS: _times([1, 2], [1], [1], [2], [1])}
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        assemble_row(
            dtype="float32",
            resolution=128,
            visual_tokens=4,
            prompt_tokens=12,
            new_tokens=4,
            times=times,
            tokens={OURS: [[1]], THEIRS: [[1]]},
        )


def test_first_divergence_counts_a_shorter_sequence_as_differing_where_it_ends():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2


def test_the_agreement_column_counts_identical_rounds_and_names_the_first_differences():
    assert agreement(_row()) == "1/3 (first difference at token 1, 0)"
    same = _row(tokens={OURS: [[1], [2], [3]], THEIRS: [[1], [2], [3]]})
    assert agreement(same) == "3/3"


def test_the_report_has_the_table_the_targets_and_the_versions_in_markdown_and_json(tmp_path):
    meta = {
        "cpu": "Test CPU",
        "cpu_threads": 2,
        "torch": "2.14.1",
        "python": "3.11",
        "transformers": "5.24.0",
        "timm": "1.0.31",
        "model": "random FastVLM-0.5B weights",
        "warmup": 1,
    }
    rows = [_row(), _row(dtype="bfloat16")]
    report = CompareReport(meta=meta, settings={"repeats": 3}, rows=rows, elapsed_s=12.0)
    files = write_report(report, tmp_path / "out")
    assert [f.name for f in files] == [REPORT_JSON, REPORT_MD]
    markdown = (tmp_path / "out" / REPORT_MD).read_text()
    assert markdown == format_report(report)
    assert (
        "| dtype | px | ours TTFT ms | theirs TTFT ms | TTFT ratio | ours decode tok/s | theirs decode tok/s "
        "| decode ratio | greedy tokens identical |" in markdown
    )
    assert "| float32 | 1024 | 210 | 300 | 1.43x (1.00-2.00) | 10.0 | 6.0 | 1.67x (1.00-2.00) | 1/3 (" in markdown
    assert "| bfloat16 | 1024 | 210 | 300 |" in markdown
    assert "float32, 1024 px: TTFT 1.43x shorter (target 1.4x: met)" in markdown
    assert "bfloat16, 1024 px: TTFT 1.43x shorter (target 2.0x: not met), decode 1.67x (target 1.2x: met)" in markdown
    assert "transformers 5.24.0, timm 1.0.31" in markdown and "Test CPU, 2 threads, torch 2.14.1" in markdown
    assert "Our greedy decode steps read an int8 copy of the LM head" in markdown
    full_head = CompareReport(meta=meta, settings={"repeats": 3, "full_head": True}, rows=rows)
    assert "Our greedy decode steps read the whole LM head (--full-head)." in format_report(full_head)
    saved = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert saved["meta"] == meta and len(saved["rows"]) == 2
    first = saved["rows"][0]
    assert first["ttft_ratio"] == pytest.approx(rows[0].ttft_ratio) and first["first_divergence"] == [None, 1, 0]
    assert first["ours"]["ttft_ms"] == 210 and first["theirs"]["decode_tokens_per_s"] == pytest.approx(6.0)


# ------------------------------------------------------------------------------ both models (needs timm)


@pytest.mark.skipif(not HAS_TIMM, reason="needs timm and transformers' FastVLM: bash benchmarks/transformers_env.sh")
def test_both_models_run_on_the_same_weights_and_agree_in_fp32(tmp_path, capsys):
    out = tmp_path / "out"
    flags = [*TINY_RUN, "--repeats", "2", "--warmup", "0", "--dtypes", "fp32", "bf16", "--out", str(out)]
    assert main(["bench-vs-transformers", *flags]) == 0
    saved = json.loads((out / REPORT_JSON).read_text())
    fp32, bf16 = saved["rows"]
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert (fp32["resolution"], fp32["visual_tokens"], fp32["prompt_tokens"], fp32["rounds"]) == (128, 4, 12, 2)
    assert fp32["first_divergence"] == [None, None]  # same weights, greedy: the same tokens
    assert saved["settings"]["full_head"] is False  # ours through the int8-screened head, as generate runs
    for row in (fp32, bf16):
        for side in (row["ours"], row["theirs"]):
            assert all(side[k] > 0 for k in ("encoder_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s"))
    assert saved["meta"]["timm"] and saved["meta"]["transformers"]
    assert "| float32 | 128 |" in capsys.readouterr().out
