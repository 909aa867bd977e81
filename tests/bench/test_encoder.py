"""The encoder benchmark's rows and the measurement helpers (behaviour, not timings)."""

from __future__ import annotations

import json
import time

import torch

from fastvlm import native
from fastvlm.bench.encoder import format_table, run_encoder_benchmark
from fastvlm.measure import count_flops, median_latency_ms, peak_memory_mb, write_rows_json
from fastvlm.vision import FastViTConfig, kernels


def test_encoder_benchmark_rows_on_a_small_tower(tmp_path):
    config = FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128))
    rows = run_encoder_benchmark([64, 128], ["cpu"], config=config, repeats=1, warmup=0, progress=False)
    assert kernels.NATIVE_DEPTHWISE  # the torch-depthwise variant switched it back on
    assert [r.resolution for r in rows] == [64, 128]
    assert [r.tokens for r in rows] == [1, 4]
    for r in rows:
        assert r.unfused_ms > 0 and r.fused_ms > 0 and r.speedup == r.unfused_ms / r.fused_ms
        assert r.gflops > 0 and r.max_rel_diff < 1e-4
        if native.depthwise_conv_kernel() is not None:  # the fused tower runs it: timed against torch's too
            assert r.torch_depthwise_ms is not None and r.torch_depthwise_ms > 0
        else:
            assert r.torch_depthwise_ms is None
    assert rows[1].gflops > 3.5 * rows[0].gflops  # FLOPs grow with the pixel count
    assert "| cpu | float32 | 128 | 4 |" in format_table(rows)
    write_rows_json(rows, tmp_path / "out" / "enc.json", {"cpu": "test"})
    saved = json.loads((tmp_path / "out" / "enc.json").read_text())
    assert saved["meta"] == {"cpu": "test"} and saved["rows"][1]["tokens"] == 4


def test_flop_count_of_a_matmul_on_meta():
    a = torch.empty(8, 16, device="meta")
    b = torch.empty(16, 4, device="meta")
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_full_size_fastvithd_flops_match_the_published_macs():
    """About 243 GMACs per 1024 px image (ARCHITECTURE.md), i.e. about 487 GFLOPs."""
    from fastvlm.vision import FastViTHD

    with torch.device("meta"):
        tower = FastViTHD().eval()
        flops = count_flops(lambda: tower(torch.empty(1, 3, 1024, 1024)))
    assert abs(flops / 2e9 - 243) < 2.5


def test_median_latency_runs_every_variant_interleaved():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = median_latency_ms(fns, torch.device("cpu"), warmup=1, repeats=3)
    assert set(timings) == {"a", "b"} and all(t >= 0 for t in timings.values())
    assert calls == ["a", "b"] + ["a", "b"] * 3


def test_peak_memory_sees_a_large_temporary():
    def allocate():
        x = torch.ones(64, 2**20)  # 256 MiB, touched
        time.sleep(0.05)
        return x.sum()

    peak = peak_memory_mb(allocate, torch.device("cpu"))
    assert peak is not None and 200 < peak < 400
