"""The efficiency study: published configurations (tokens, parameters) and the result schema."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

import fastvlm.bench.study as study
from fastvlm.bench.baselines import ENCODERS, build_encoder
from fastvlm.bench.paper import PUBLISHED_PARAMS_M
from fastvlm.bench.report import _pareto, write_report
from fastvlm.vision import FastViT, FastViTConfig


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_published_parameter_counts_within_one_percent(name):
    model = build_encoder(name, device="meta", fused=False)
    params = ENCODERS[name].num_parameters(model) / 1e6
    assert abs(params / PUBLISHED_PARAMS_M[name] - 1) < 0.01, f"{name}: {params:.2f}M"


@pytest.mark.parametrize(
    "name,side,tokens",
    [
        ("fastvithd", 256, 16),
        ("fastvithd", 512, 64),
        ("fastvithd", 768, 144),
        ("fastvithd", 1024, 256),
        ("vit_l14", 336, 576),
        ("siglip_so400m", 384, 729),
        ("convnext_l", 512, 256),
        ("fastvit_mci2", 768, 576),
    ],
)
def test_visual_token_counts_match_the_real_forward(name, side, tokens):
    spec = ENCODERS[name]
    assert spec.tokens(side) == tokens
    model = build_encoder(name, device="meta", fused=False)
    with torch.no_grad():
        out = spec.encode(model, torch.empty(1, 3, spec.input_side(side), spec.input_side(side), device="meta"))
    assert out.shape[1] == tokens


def _tiny_registry(monkeypatch):
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config

    tiny_hd = FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128))
    registry = {
        "fastvithd": replace(ENCODERS["fastvithd"], build=lambda: FastViT(tiny_hd)),
        "vit_l14": replace(
            ENCODERS["vit_l14"],
            build=lambda: CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    patch_size=14,
                    image_size=336,
                )
            ),
        ),
    }
    monkeypatch.setattr(study, "ENCODERS", registry)
    monkeypatch.setattr("fastvlm.bench.baselines.ENCODERS", registry)
    monkeypatch.setattr("fastvlm.bench.report.ENCODERS", registry)
    llm = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=100,
        max_position_embeddings=8192,
    )
    return {"qwen2-0.5b": llm}


def test_study_schema_ratios_and_files(monkeypatch, tmp_path):
    llms = _tiny_registry(monkeypatch)
    results = study.run_study(
        ["fastvithd", "vit_l14"],
        [256, 1024],
        ["qwen2-0.5b"],
        repeats=1,
        tiling=True,
        progress=False,
        llm_configs=llms,
        meta={"cpu": "test"},
    )
    sides = {(e.encoder, e.resolution, e.tiles): e for e in results.encoders}
    expected = {
        ("fastvithd", 256, 1),
        ("fastvithd", 1024, 1),
        ("fastvithd", 2048, 5),
        ("vit_l14", 256, 1),
        ("vit_l14", 336, 1),
        ("vit_l14", 1024, 1),
        ("vit_l14", 2048, 5),
    }
    assert set(sides) == expected
    assert sides[("fastvithd", 1024, 1)].tokens == 256 and sides[("fastvithd", 2048, 5)].tokens == 1280
    assert sides[("vit_l14", 336, 1)].tokens == 576 and sides[("fastvithd", 1024, 1)].paper_latency_ms == 116.3
    for e in results.encoders:
        assert e.latency_ms > 0 and e.gflops > 0 and e.params_m > 0
    assert {p.tokens for p in results.prefill} == {e.tokens for e in results.encoders}
    for t in results.ttft:
        assert t.ttft_ms == pytest.approx(t.vision_ms + t.prefill_ms)
    r = {x.claim: x for x in results.ratios}
    vit = r["ViT-L/14@336 / FastViTHD@1024 TTFT"]
    ttft = {(t.encoder, t.resolution): t.ttft_ms for t in results.ttft if t.tiles == 1}
    assert vit.ours == round(ttft[("vit_l14", 336)] / ttft[("fastvithd", 1024)], 2) and vit.paper == 2.25
    assert r["ViT-L/14@336 / FastViTHD@1024 visual tokens"].ours == 2.25
    assert vit.note == "ours with qwen2-0.5b; the paper's is with vicuna-7b"
    params = r["ViT-L/14 / FastViTHD parameters"]
    assert params.ours == round(sides[("vit_l14", 336, 1)].params_m / sides[("fastvithd", 1024, 1)].params_m, 2)
    assert r["ConvNeXt-L@512 / FastViTHD@512 encoder latency"].ours is None
    assert "not measured" in r["ConvNeXt-L@512 / FastViTHD@512 encoder latency"].note
    qwen_point = [t for t in results.ttft if (t.encoder, t.resolution, t.llm) == ("fastvithd", 1024, "qwen2-0.5b")]
    assert qwen_point[0].published_avg5 == 66.6 and qwen_point[0].paper_ttft_ms == 166
    assert qwen_point[0].recipe == "scaled recipe (15M+1.1M)"
    tiled = [t for t in results.ttft if t.tiles == 5 and t.encoder == "fastvithd"]
    assert tiled[0].paper_ttft_ms == 918 and sides[("fastvithd", 2048, 5)].paper_latency_ms == 581.5

    files = write_report(results, tmp_path)
    assert [f.name for f in files] == [
        "results.json",
        "results.md",
        "fig3_latency_vs_resolution.png",
        "fig2_ttft_breakdown.png",
        "fig4_ttft_vs_accuracy.png",
    ]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"meta", "encoders", "prefill", "ttft", "ratios", "skipped"}
    assert "| ViT-L/14 (CLIP) | 336 | 336 | 576 |" in (tmp_path / "results.md").read_text()
    for png in files[2:]:
        with Image.open(png) as img:
            assert img.size[0] >= 800 and img.size[1] >= 500


def test_llm_skipped_with_a_message_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(study, "_available_memory_bytes", lambda: 2**30)
    out = study.build_llm("qwen2-7b", device=torch.device("cpu"), dtype=torch.bfloat16)
    assert isinstance(out, str) and "qwen2-7b skipped" in out and "GiB" in out


def test_pareto_front():
    assert _pareto([(100, 60), (50, 55), (200, 58), (300, 65), (40, 50)]) == [(40, 50), (50, 55), (100, 60), (300, 65)]


def test_ttft_ratio_uses_the_claims_llm_when_measured():
    def enc(name, side, ms):
        return study.EncoderResult(name, name, side, side, 1, 1, 1.0, None, 1.0, ms, None, None, None, "cpu", "fp32")

    def ttft(name, side, llm, ms):
        return study.TTFTResult(name, side, 1, llm, 1, 0.0, ms, ms, None, None, None, None)

    results = study.StudyResults(
        meta={},
        encoders=[enc("vit_l14", 336, 10.0), enc("fastvithd", 1024, 5.0)],
        ttft=[
            ttft("vit_l14", 336, "qwen2-0.5b", 100.0),
            ttft("fastvithd", 1024, "qwen2-0.5b", 10.0),
            ttft("vit_l14", 336, "vicuna-7b", 60.0),
            ttft("fastvithd", 1024, "vicuna-7b", 30.0),
        ],
    )
    ratios = {r.claim: r for r in study.compute_ratios(results, ["qwen2-0.5b", "vicuna-7b"])}
    vit = ratios["ViT-L/14@336 / FastViTHD@1024 TTFT"]
    assert vit.ours == 2.0 and vit.note == "ours with vicuna-7b"
    assert ratios["ViT-L/14@336 / FastViTHD@1024 encoder latency"].ours == 2.0
