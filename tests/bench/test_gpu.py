"""The GPU benchmark on a CPU: every step at toy sizes, the report's fields, the decode bound,
the static-cache decode against the generation API, and the child process's time limit."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import torch

from fastvlm.bench import gpu, gpu_decode
from fastvlm.bench.gpu import REPORT_JSON, REPORT_MD, GpuReport, GpuSettings, run_gpu_benchmark
from fastvlm.bench.gpu_common import (
    DecodeRow,
    LatencyRow,
    batch_prompt,
    build_fastvlm,
    decode_bound_tokens_per_s,
    decode_weight_bytes,
    kv_bytes_per_row,
    prompt_inputs,
    random_pixels,
)
from fastvlm.bench.gpu_report import target_lines
from fastvlm.cli import main
from fastvlm.generation import generate_tokens
from fastvlm.presets import qwen2_config

HAS_TIMM = importlib.util.find_spec("timm") is not None


def _in_this_process(job: dict, **_: object) -> dict:
    written: list[dict] = []
    gpu_decode.compare_static_decodes(job, written.append)
    return written[-1]


def test_the_smoke_run_fills_every_part_of_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "run_isolated", _in_this_process)  # the child process has its own test
    lines: list[str] = []
    report = run_gpu_benchmark(GpuSettings.smoke(), tmp_path, log=lines.append)
    assert report.complete and sorted(p.name for p in tmp_path.iterdir()) == [REPORT_JSON, REPORT_MD]
    assert report.ceilings is not None and report.ceilings.copy_gb_per_s and report.ceilings.matmul_tflops

    ours = [r for r in report.latency if r.impl == "fastvlm"]
    assert [(r.llm, r.resolution, r.visual_tokens, r.prompt_tokens) for r in ours] == [("tiny", 128, 4, 12)]
    row = ours[0]
    assert row.encoder_ms and row.prefill_ms and row.ttft_ms and row.encoder_gflops and row.encoder_tflops_per_s
    assert row.encoder_graph_ms is None and "CUDA" in row.notes["encoder_graph"]

    decode = [r for r in report.decode if r.impl == "fastvlm"]
    assert [(r.batch, r.kv_tokens) for r in decode] == [(1, 16), (2, 16)]
    for r in decode:
        assert r.tokens_per_s and r.bound_tokens_per_s and r.bound_fraction and r.weights_gib
        assert r.peak_gib is None  # GPU memory only

    (compiled,) = report.compiled_decode
    assert compiled.eager_static_tokens_per_s and compiled.generate_tokens_per_s
    assert compiled.compiled_tokens_per_s is None and "CUDA only" in compiled.notes["compiled"]

    theirs = [r for r in report.latency if r.impl == "transformers"]
    if HAS_TIMM:
        assert theirs and theirs[0].encoder_ms
    else:  # transformers' FastVLM tower is timm's: reported, not fatal
        assert not theirs and any("transformers tiny: unavailable: " in s and "timm" in s for s in report.skipped)

    saved = json.loads((tmp_path / REPORT_JSON).read_text())
    assert set(saved) == set(GpuReport.__dataclass_fields__) and saved["complete"]
    assert saved["latency"][0]["ttft_ms"] == row.ttft_ms and "gpu" not in saved["meta"]
    markdown = (tmp_path / REPORT_MD).read_text()
    assert "| fastvlm | tiny | 128 | 4 | 12 |" in markdown
    assert markdown.startswith("# FastVLM on cpu, random weights, float32")
    assert any("fastvlm tiny batch 2" in line for line in lines)


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    settings = GpuSettings.smoke(budget_s=0.0, transformers=True)
    report = run_gpu_benchmark(settings, tmp_path, log=lambda line: None)
    assert report.complete and not report.latency and not report.decode and not report.compiled_decode
    assert any(s.startswith("fastvlm tiny: not run, past the 0 s budget") for s in report.skipped)
    assert any(s.startswith("static/compiled decode tiny: not run") for s in report.skipped)
    assert "INCOMPLETE" not in (tmp_path / REPORT_MD).read_text()


def test_the_command_refuses_to_run_without_a_gpu_unless_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench-gpu", "--out", str(tmp_path)]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert main(["bench-gpu", "--smoke", "--out", str(tmp_path), "--new-tokens", "1"]) == 2
    assert not list(tmp_path.iterdir())


def test_the_decode_bound_counts_each_weight_once_and_every_rows_kv_cache():
    bf16 = torch.bfloat16
    # Qwen2-0.5B: 494,032,768 parameters, the embedding doubling as the LM head (read once).
    assert decode_weight_bytes(qwen2_config("0.5b"), bf16) == 2 * 494_032_768
    # Qwen2-7B: 7,615,616,512 parameters; a step reads its head but only one row of its embedding table.
    assert decode_weight_bytes(qwen2_config("7b"), bf16) == 2 * (7_615_616_512 - 152_064 * 3_584)
    # 24 layers x 2 KV heads x 64 dims, keys and values, 300 positions, 2 bytes each.
    assert kv_bytes_per_row(qwen2_config("0.5b"), bf16, 300) == 2 * 24 * 2 * 64 * 300 * 2
    text = qwen2_config("0.5b")
    one = decode_bound_tokens_per_s(text, bf16, batch=1, kv_tokens=300, copy_bytes_per_s=4e12)
    many = decode_bound_tokens_per_s(text, bf16, batch=32, kv_tokens=300, copy_bytes_per_s=4e12)
    assert one == pytest.approx(4e12 / (2 * 494_032_768 + 2 * 24 * 2 * 64 * 300 * 2))
    assert 20 * one < many < 32 * one  # the weights are shared by the batch, the KV caches are not


def test_static_decode_repeats_the_generation_apis_greedy_tokens():
    device = torch.device("cpu")
    model = build_fastvlm("tiny", 128, device=device, dtype=torch.float32)
    with torch.no_grad():  # sharper logits than the default init, so that the tokens vary
        for name, p in model.language_model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.5)
    pixels = random_pixels(1, 128, device)
    ids = batch_prompt(8, model.config.text.vocab_size, 1)
    api = [int(t[0]) for t, _ in generate_tokens(model, ids, pixel_values=pixels, max_new_tokens=10)]
    inputs = prompt_inputs(model, 128, text_tokens=8, batch=1)
    static = gpu_decode.static_decode(model, inputs, new_tokens=5)
    start = 1 + gpu_decode.WARMUP_STEPS  # the prefill's token, then the untimed steps
    assert len(set(api)) > 3 and static.tokens == api[start : start + 5]
    assert not static.compiled and static.tokens_per_s > 0


def test_the_child_process_hands_back_its_figures(tmp_path):
    job = {
        "size": "tiny",
        "resolution": 128,
        "device": "cpu",
        "dtype": "float32",
        "text_tokens": 8,
        "new_tokens": 3,
        "compile_mode": None,
    }
    result = gpu_decode.run_isolated(job, timeout_s=120, result_path=tmp_path / "result.json")
    assert "error" not in result and result["job"] == job
    assert result["eager_static"]["tokens_per_s"] > 0 and len(result["eager_static"]["tokens"]) == 3


def test_a_child_past_its_time_limit_is_ended_and_reported(tmp_path, monkeypatch):
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    real_popen = gpu_decode.subprocess.Popen
    monkeypatch.setattr(gpu_decode.subprocess, "Popen", lambda command, **kw: real_popen(slow, **kw))
    start = time.perf_counter()
    result = gpu_decode.run_isolated({"size": "tiny"}, timeout_s=0.5, result_path=tmp_path / "r.json")
    assert time.perf_counter() - start < 10
    assert list(result) == ["error"] and result["error"].startswith("timed out after")


def test_the_targets_are_read_off_our_rows():
    report = GpuReport(meta={}, settings={"dtype": "bfloat16"})
    report.latency.append(
        LatencyRow(
            impl="fastvlm",
            llm="0.5b",
            resolution=1024,
            dtype="bfloat16",
            visual_tokens=256,
            prompt_tokens=288,
            encoder_ms=6.0,
            encoder_graph_ms=4.0,
            ttft_ms=25.0,
        )
    )
    report.decode.append(
        DecodeRow(
            impl="fastvlm",
            llm="7b",
            resolution=1024,
            dtype="bfloat16",
            batch=1,
            kv_tokens=352,
            new_tokens=64,
            bound_fraction=0.6,
        )
    )
    lines = target_lines(report)
    assert lines[0].startswith("encoder < 5 ms (0.5b projector): 4.00 ms at best, met")
    assert lines[1] == "0.5B TTFT < 20 ms: 25.00 ms, NOT met"
    assert lines[2].startswith("7b batch-1 decode within 2x of the bandwidth bound: 60%") and lines[2].endswith(" met")
