"""`fastvlm init`, `fastvlm train`, `fastvlm data score` and the training benchmark's pieces."""

from __future__ import annotations

import json

import pytest
import torch

from fastvlm.bench.tokenizer import byte_tokenizer
from fastvlm.bench.train_speed import FullLogitsLoss
from fastvlm.cli import main as cli_main
from fastvlm.model import FastVLM
from fastvlm.train.trainer import LossModule, Trainer
from tests.conftest import fixture_path
from tests.train.conftest import tiny_config


def test_init_writes_a_random_model_with_the_architecture_of_another(tmp_path):
    like = str(fixture_path("apple_fastvlm_tiny"))
    source = FastVLM.from_pretrained(like, fuse=False)
    out = tmp_path / "init"
    assert cli_main(["init", str(out), "--like", like, "--image-size", "128", "--tower-form", "inference"]) == 0
    fresh = FastVLM.from_pretrained(out, fuse=False)
    assert fresh.config.image_size == 128 and fresh.config.vision == source.config.vision
    assert fresh.state_dict().keys() == source.state_dict().keys()
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(fresh.state_dict()[name], source.state_dict()[name])
    assert fresh.tokenizer("red").input_ids == source.tokenizer("red").input_ids
    assert cli_main(["init", str(out), "--like", like]) == 2  # exists
    assert cli_main(["init", str(tmp_path / "x"), "--llm", "0.5b"]) == 2  # no tokenizer
    # by default the tower is in its training form (batch norms, branches), and the LLM can be resized
    wide = tmp_path / "wide"
    assert (
        cli_main(
            [
                "init",
                str(wide),
                "--like",
                like,
                "--hidden-size",
                "96",
                "--layers",
                "3",
                "--heads",
                "6",
                "--kv-heads",
                "2",
                "--intermediate-size",
                "192",
            ]
        )
        == 0
    )
    model = FastVLM.from_pretrained(wide, fuse=False)
    assert model.config.vision == source.config.vision.replace(inference_mode=False)
    text = model.config.text
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (
        96,
        3,
        6,
        192,
    )
    assert cli_main(["init", str(tmp_path / "bad"), "--like", like, "--hidden-size", "100", "--heads", "6"]) == 2


def test_train_cli_uses_preset_file_and_flags(tiny_init, tiny_data, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"stage": "1", "micro_batch_size": 2, "lr": 0.01, "global_batch_size": 4}))
    args = [
        "train",
        "--config",
        str(config),
        "--model",
        str(tiny_init),
        "--data",
        str(tiny_data / "train.jsonl"),
        "--output-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--no-progress",
        "--lr",
        "0.02",
    ]
    assert cli_main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["config"]["train"] == ["projector"] and start["config"]["lr"] == 0.02
    assert start["accumulation"] == 2 and start["total_steps"] == 2
    assert cli_main([*args[:-2], "--micro-batch-size", "3"]) == 2  # 4 is not a multiple of 3: one-line error


def test_data_score_counts_exact_matches(tiny_data, tmp_path, capsys):
    assert (
        cli_main(
            [
                "data",
                "score",
                "--model",
                str(fixture_path("apple_fastvlm_tiny")),
                str(tiny_data / "test.jsonl"),
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["n"] == 4 and scores["accuracy"] == 1 - len(scores["errors"]) / 4
    assert "exact match" in capsys.readouterr().out


def test_byte_tokenizer_round_trips_chat_text():
    tok = byte_tokenizer()
    text = "<|im_start|>user\nWhat colour? ünïcode<|im_end|>"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text and tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_full_logits_baseline_computes_the_same_loss(tiny_init, tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_init, tiny_data, tmp_path))
    batch = next(iter(trainer.loader()))
    inputs = (batch.input_ids, batch.attention_mask, batch.labels, batch.pixel_values)
    ours, n_ours = LossModule(trainer.model)(*inputs)
    base, n_base = FullLogitsLoss(trainer.model)(*inputs)
    assert int(n_ours) == int(n_base)
    torch.testing.assert_close(ours, base, rtol=1e-5, atol=1e-5)
    trainer.close()


@pytest.mark.parametrize("bad", [["--stage", "9"], ["--precision", "fp8"]])
def test_train_cli_rejects_bad_values(bad, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["train", "--model", "m", "--data", "d", "--output-dir", str(tmp_path), *bad])


def test_every_setting_is_a_flag_with_its_help_and_type():
    import argparse

    from fastvlm.cli.train import register
    from fastvlm.train.config import TrainConfig, settings

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--adam-betas", "0.8", "0.9", "--max-steps", "3", "--no-progress"])
    assert args.adam_betas == [0.8, 0.9] and args.max_steps == 3 and args.progress is False and args.lr is None
    assert [s.name for s in settings()] == list(TrainConfig.__dataclass_fields__)
    assert all(s.help for s in settings())
    assert {s.name: s.kind for s in settings()}["tower_lr"] is float
