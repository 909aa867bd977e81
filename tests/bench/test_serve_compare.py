"""The engines-side-by-side report: one row per engine and level, from each engine's serve_load.json."""

from __future__ import annotations

import json

import pytest

from fastvlm.bench.serve_compare import comparison_markdown, comparison_payload, comparison_rows, read_run
from fastvlm.bench.serve_load import RequestResult, levels_payload, summarize_level

META = {"cpu": "Test CPU", "cpu_threads": 2, "torch": "2.13", "model": "/m/FastVLM", "image_size": 512}
META |= {"max_tokens": 32, "shared_image_fraction": 0.25, "ignore_eos": True, "load_average_before": [1.0, 0.5, 0.2]}
META |= {"load_average_after": [2.0, 1.0, 0.5]}


def _run(engine: str, seconds: float) -> dict:
    answer = {"kind": "valid", "status": 200, "ok": True, "ttft_s": seconds, "e2e_s": 2 * seconds}
    results = [RequestResult(index=i, completion_tokens=32, **answer) for i in range(4)]
    levels = [summarize_level(clients, results, 4 * seconds, stopped=False) for clients in (1, 4)]
    return levels_payload(levels, META | {"engine": engine, "serve_args": ["--dtype=bf16"]})


def test_rows_follow_the_engines_then_the_levels():
    rows = comparison_rows({"fastvlm": _run("fastvlm", 0.5), "vllm": _run("vllm", 0.25)})
    assert [(r[0], r[1]) for r in rows] == [("fastvlm", "1"), ("fastvlm", "4"), ("vllm", "1"), ("vllm", "4")]
    # 4 answers of 32 tokens in 2 s: 2 req/s, 64 tok/s; TTFT 500 ms
    assert rows[0][2:] == ["4", "4", "0", "2.00", "64.0", "500", "500", "1,000", "32.0"]
    assert rows[2][5:8] == ["4.00", "128.0", "250"]


def test_the_report_names_the_settings_machine_and_each_runs_flags_and_load(tmp_path):
    runs = {"fastvlm": _run("fastvlm", 0.5), "vllm": _run("vllm", 0.25)}
    runs["vllm"]["meta"]["vllm_args"] = ["--enforce-eager"]
    markdown = comparison_markdown(runs)
    assert "max_tokens 32, ignore_eos" in markdown and "Test CPU, 2 threads" in markdown
    assert "| fastvlm | 1 | 4 | 4 | 0 | 2.00 |" in markdown
    loads = "load average 1.00/0.50/0.20 before, 2.00/1.00/0.50 after"
    assert f"- fastvlm: fastvlm serve flags --dtype=bf16; {loads}" in markdown
    assert "- vllm: fastvlm serve flags --dtype=bf16 -- --enforce-eager; load" in markdown
    assert comparison_payload(runs)["engines"] == ["fastvlm", "vllm"]


def test_read_run_refuses_other_json(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_run("vllm", 1.0)))
    bad.write_text(json.dumps({"rows": []}))
    assert read_run(good)["meta"]["engine"] == "vllm"
    with pytest.raises(ValueError, match="not a serve_load.json"):
        read_run(bad)
