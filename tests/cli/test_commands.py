"""The ``fastvlm`` command line: info, convert-tower, bench-encoder; clean errors, no partial files."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from fastvlm.cli import main
from fastvlm.vision import FastViTHD
from tests.conftest import fixture_path


def test_info_describes_a_transformers_checkpoint(capsys):
    assert main(["info", str(fixture_path("hf_fastvlm_tiny", "model.safetensors"))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "timm"
    assert report["prefix"] == "model.vision_tower.timm_model."
    assert report["form"] == "inference"
    assert report["config"]["depths"] == [1, 2, 2, 1, 1]


def test_convert_tower_reparameterizes_and_renames(tmp_path, capsys):
    out = tmp_path / "tower_timm.safetensors"
    src = fixture_path("apple_tower_tiny_train", "model.safetensors")
    assert main(["convert-tower", str(src), str(out), "--layout", "timm", "--reparameterize"]) == 0
    converted = load_file(out)
    assert "final_conv.se.fc1.weight" in converted and "stem.0.reparam_conv.weight" in converted
    reference = load_file(fixture_path("apple_tower_tiny_train", "reparameterized.safetensors"))
    golden = load_file(fixture_path("apple_tower_tiny_train", "golden.safetensors"))
    a = FastViTHD.from_state_dict(converted)
    b = FastViTHD.from_state_dict(reference)
    with torch.no_grad():
        diff = (a(golden["pixel_values"]) - b(golden["pixel_values"])).abs().max().item()
    assert diff <= 1e-4 * max(1.0, golden["image_embeddings_reparameterized"].abs().max().item())


def test_convert_refuses_to_overwrite_and_leaves_no_partial_file(tmp_path, capsys):
    src = fixture_path("apple_tower_tiny", "model.safetensors")
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert-tower", str(src), str(out), "--layout", "apple"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"

    broken = tmp_path / "broken.safetensors"
    tensors = load_file(src)
    del tensors["conv_exp.se.reduce.bias"]
    from safetensors.torch import save_file

    save_file(tensors, broken)
    target = tmp_path / "never.safetensors"
    assert main(["convert-tower", str(broken), str(target), "--layout", "timm", "--reparameterize"]) == 2
    err = capsys.readouterr().err
    assert "missing tensors: conv_exp.se.reduce.bias" in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == sorted([out, broken])  # no output, no temporary left behind


def test_missing_file_is_one_line_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastvlm info: error: checkpoint file not found") and "Traceback" not in err


def test_bench_encoder_rejects_bad_resolution(capsys):
    assert main(["bench-encoder", "--resolutions", "100"]) == 2
    assert "not a positive multiple of 64" in capsys.readouterr().err


def test_corrupt_checkpoint_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint file" in err and "Traceback" not in err
    assert main(["info", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_convert_tower_reparameterize_keeps_the_clip_head(tmp_path):
    tensors = load_file(fixture_path("apple_tower_tiny_train", "model.safetensors"))
    tensors["head.proj"] = torch.randn(512, 8)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "with_head.safetensors")
    out = tmp_path / "out.safetensors"
    src = str(tmp_path / "with_head.safetensors")
    assert main(["convert-tower", src, str(out), "--layout", "apple", "--reparameterize"]) == 0
    assert torch.equal(load_file(out)["head.proj"], tensors["head.proj"])


def _tiny(*parts: str) -> str:
    """A file of the tiny authors'-format FastVLM fixture (the folder itself without parts)."""
    return str(fixture_path("apple_fastvlm_tiny", *parts))


def _predict_args(*extra: str) -> list[str]:
    return ["predict", "--model", _tiny(), "--image", _tiny("image.png"), *extra]


def test_predict_json_reproduces_golden_tokens(capsys):
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    assert main(_predict_args("--prompt", golden["question"], "--max-new-tokens", "12", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == golden["greedy_token_ids"]
    assert {"vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "visual_tokens"} <= set(out["timings"])
    assert out["timings"]["visual_tokens"] == 16


def test_predict_streams_text_and_reports_timings(capsys):
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    assert main(_predict_args("--prompt", golden["question"], "--max-new-tokens", "12")) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip("\n") == golden["greedy_text"]
    assert "TTFT" in captured.err


def test_predict_errors_are_one_line(tmp_path, capsys):
    missing = ["predict", "--model", _tiny(), "--image", str(tmp_path / "x.png"), "--prompt", "hi"]
    assert main(missing) == 2
    assert "image file not found" in capsys.readouterr().err
    assert main(_predict_args("--prompt", "<image>\n<image>\ncompare")) == 2
    err = capsys.readouterr().err
    assert "2 <image> placeholder(s) for 1 image(s)" in err and "Traceback" not in err
    assert main(_predict_args("--prompt", "word " * 5000)) == 2
    assert "context holds 4096" in capsys.readouterr().err


def test_convert_writes_each_format_and_nothing_on_failure(tmp_path, capsys):
    src = str(fixture_path("hf_fastvlm_tiny"))
    for fmt, model_type in (("apple", "llava_qwen2"), ("hf", "fast_vlm"), ("fastvlm", "fastvlm")):
        out = tmp_path / fmt
        assert main(["convert", src, str(out), "--format", fmt]) == 0
        assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    broken = tmp_path / "broken"
    shutil.copytree(fixture_path("apple_fastvlm_tiny"), broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.mm_projector.2.bias"]
    from safetensors.torch import save_file

    save_file(tensors, broken / "model.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", str(broken), str(tmp_path / "never"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "missing tensors: model.mm_projector.2.bias" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder left


def test_chat_answers_each_line(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is written on the sign?\nAnd now?\n"))
    args = ["chat", "--model", _tiny(), "--image", _tiny("image.png"), "--max-new-tokens", "12"]
    assert main(args) == 0
    out = capsys.readouterr().out
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    assert out.count("fastvlm> ") == 2 and golden["greedy_text"] in out


def test_bad_devices_and_benchmark_arguments_are_one_line_errors(capsys):
    assert main(_predict_args("--prompt", "hi", "--device", "bogus")) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_predict_args("--prompt", "hi", "--device", "cuda")) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    assert main(["bench-ttft", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_bench_command_writes_json_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--encoders", "fastvithd", "--resolutions", "64", "128", "--llms", "--repeats", "1"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| FastViTHD | 128 | 128 | 4 | 125.1 | 125.1 |" in printed
    # no TTFT without an LLM, so no Fig. 2
    figures = ["fig3_latency_vs_resolution.png", "fig4_ttft_vs_accuracy.png"]
    assert sorted(p.name for p in out.iterdir()) == [*figures, "results.json", "results.md"]
    saved = json.loads((out / "results.json").read_text())
    assert [e["tokens"] for e in saved["encoders"]] == [1, 4] and saved["prefill"] == []
