"""The evaluation throughput benchmark on a tiny configuration (rows, not timings)."""

from __future__ import annotations

import json

import fastvlm.bench.eval_speed as bench_eval
from tests.bench.tiny import tiny_config


def test_eval_benchmark_runs_every_batch_size_over_the_whole_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_eval, "fastvlm_config", tiny_config)
    rows = bench_eval.measure_eval_throughput(resolution=128, samples=3, batch_sizes=(1, 2), max_new_tokens=2)
    assert [r.batch_size for r in rows] == [1, 2] and rows[0].speedup == 1.0
    assert all(r.samples == 3 and r.samples_per_s > 0 and r.resolution == 128 for r in rows)
    assert "| cpu | 0.5b | 128 | 2 | 3 | 2 |" in bench_eval.format_eval_table(rows)
    bench_eval.write_gqa_folder(tmp_path, 2, 64)
    questions = [json.loads(line) for line in (tmp_path / "llava_gqa_testdev_balanced.jsonl").read_text().splitlines()]
    answers = json.loads((tmp_path / "testdev_balanced_questions.json").read_text())
    assert [q["question_id"] for q in questions] == list(answers) == ["0", "1"]
    assert all((tmp_path / "images" / q["image"]).is_file() for q in questions)
