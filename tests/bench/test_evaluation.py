"""The training throughput benchmark on a tiny configuration (rows, not timings)."""

from __future__ import annotations

import fastvlm.bench.train as bench_train
from tests.bench.tiny import tiny_config


def test_training_benchmark_times_both_losses(monkeypatch):
    monkeypatch.setattr(bench_train, "fastvlm_config", tiny_config)
    rows = bench_train.measure_training_step(resolution=128, steps=1)
    assert [r.loss for r in rows] == ["targets only", "full logits"]
    assert all(r.samples_per_s > 0 and r.tokens_per_s > 0 and r.step_s > 0 for r in rows)
