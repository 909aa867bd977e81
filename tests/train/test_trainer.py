"""The trainer: presets, batching, loss normalisation, checkpoints, resume, adapters, torchrun."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvlm.cli import main as cli_main
from fastvlm.files import leftover_dirs, staging_dir
from fastvlm.model import FastVLM
from fastvlm.train.checkpointing import list_checkpoints
from fastvlm.train.config import STAGES, make_config
from fastvlm.train.dataset import BatchPlan, RecordIndex
from fastvlm.train.setup import warmup_cosine
from fastvlm.train.trainer import Trainer, train
from tests.conftest import fixture_path
from tests.train.conftest import tiny_config


def _log_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if "loss" in e}


# ------------------------------------------------------------------------------ settings


def test_stage_presets_follow_the_paper():
    one = make_config(stage="1", model="m", data="d", output_dir="o")
    assert one.train == ("projector",) and one.lr == 1e-3 and one.global_batch_size == 256
    for stage in ("1.5", "2", "3"):
        cfg = make_config(stage=stage, model="m", data="d", output_dir="o")
        assert set(cfg.train) == {"tower", "projector", "llm"} and cfg.lr == 2e-5 and cfg.global_batch_size == 128
        assert cfg.warmup_ratio == 0.03 and cfg.epochs == 1.0
    assert set(STAGES) == {"1", "1.5", "2", "3"}


def test_config_file_then_flags_override_the_preset(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('stage = "1"\nlr = 5e-4\nmicro_batch_size = 2\ntrain = ["projector", "tower"]\n')
    cfg = make_config(file=toml, model="m", data="d", output_dir="o", micro_batch_size=8, lr=None)
    assert cfg.stage == "1" and cfg.lr == 5e-4 and cfg.micro_batch_size == 8 and cfg.global_batch_size == 256
    assert cfg.train == ("projector", "tower")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 1e-3}))
    with pytest.raises(ValueError, match="unknown setting.*learning_rate"):
        make_config(file=bad, model="m", data="d", output_dir="o")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train": ("projector", "vision")}, "must name some of"),
        ({"stage": "4"}, "unknown stage"),
        ({"precision": "fp16"}, "precision"),
        ({"qlora": True}, "lora_rank"),
        ({"lora_rank": 8, "train": ("projector",)}, "add 'llm'"),
        ({"model": ""}, "'model' must be set"),
        ({"grad_clip": -1.0}, "grad_clip must be >= 0"),
        ({"train": "llm"}, "'train' must be a list"),
        ({"lr": "1e-3"}, "'lr' must be float"),
        ({"adam_betas": (0.9,)}, "two numbers"),
        ({"lora_rank": 4, "lora_targets": ("embed_tokens",)}, "linear layers"),
        ({"lora_rank": 4, "qlora": True, "strategy": "fsdp"}, "cannot be sharded"),
    ],
)
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        make_config(**{"model": "m", "data": "d", "output_dir": "o", **changes})


def test_warmup_then_cosine():
    f = warmup_cosine(100, 0.03, 0.0)
    assert [round(f(s), 4) for s in range(3)] == [0.25, 0.5, 0.75]
    assert f(3) == 1.0 and math.isclose(f(3 + 97 // 2), 0.5, abs_tol=0.02) and f(99) < 0.01
    assert warmup_cosine(100, 0.0, 0.1)(100) == pytest.approx(0.1)


# ------------------------------------------------------------------------------ data order


def test_any_split_of_a_global_batch_sees_the_same_samples():
    one = BatchPlan(100, 8, 4, world_size=1, rank=0, seed=3)
    two = [BatchPlan(100, 8, 2, world_size=2, rank=r, seed=3) for r in range(2)]
    assert one.steps_per_epoch == 12 and one.total_steps == 12 and one.accumulation == 2 and two[0].accumulation == 2
    for step in range(12):
        single = sorted(i for mb in one.micro_batches(step) for i in mb)
        split = sorted(i for plan in two for mb in plan.micro_batches(step) for i in mb)
        assert single == split and len(set(single)) == 8
    every = [i for s in range(12) for i in one.global_batch(s)]
    assert len(set(every)) == 96  # one epoch: no sample twice
    assert one.global_batch(12) != one.global_batch(0)  # epoch 2 is a new permutation
    with pytest.raises(ValueError, match="not a multiple"):
        BatchPlan(100, 8, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan(5, 8, 4)


def test_record_index_reads_records_back_by_offset(tiny_data):
    index = RecordIndex(tiny_data / "train.jsonl")
    lines = (tiny_data / "train.jsonl").read_text().splitlines()
    assert len(index) == len(lines) == 24
    for i in (0, 7, 23):
        assert index[i].id == json.loads(lines[i])["id"] and index[i].image.is_file()


# ------------------------------------------------------------------------------ the loss


def test_training_loss_is_the_token_sum_of_the_usual_loss(tiny_init, tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_init, tiny_data, tmp_path))
    batch = next(iter(trainer.loader()))
    model = trainer.model
    total, count = model.training_loss(batch.input_ids, batch.labels, batch.attention_mask, batch.pixel_values)
    mean = model(batch.input_ids, batch.pixel_values, batch.attention_mask, labels=batch.labels).loss
    assert int(count) == batch.num_label_tokens > 0
    torch.testing.assert_close(total / count, mean, rtol=1e-5, atol=1e-6)
    trainer.close()


def test_stage_one_trains_only_the_projector(tiny_init, tiny_data, tmp_path):
    result = train(tiny_config(tiny_init, tiny_data, tmp_path, stage="1", lr=1e-2, global_batch_size=8, max_steps=2))
    before, after = load_file(tiny_init / "model.safetensors"), load_file(result.final_model / "model.safetensors")
    for key in before:  # the authors' layout in the init folder vs ours in the trained one
        ours = {"model.mm_projector.0.weight": "projector.linear_1.weight"}.get(key)
        if ours:
            assert not torch.equal(before[key], after[ours])
    frozen = [k for k in after if not k.startswith("projector.")]
    fresh = FastVLM.from_pretrained(tiny_init, fuse=False).state_dict()
    assert all(torch.equal(after[k], fresh[k]) for k in frozen)
    assert not torch.equal(after["projector.linear_2.weight"], fresh["projector.linear_2.weight"])


def test_tower_gets_its_own_learning_rate(tiny_init, tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_init, tiny_data, tmp_path, tower_lr=1e-5, weight_decay=0.1))
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["tower"]["initial_lr"] == 1e-5 and groups["rest"]["initial_lr"] == 1e-3
    assert groups["rest_no_decay"]["weight_decay"] == 0.0 and groups["rest"]["weight_decay"] == 0.1
    trainer.close()


# ------------------------------------------------------------------------------ checkpoints and resume


def test_same_seed_same_machine_repeats_the_run_exactly_and_another_seed_does_not(tiny_init, tiny_data, tmp_path):
    # what the README promises for examples/train_from_scratch.sh: identical losses and weights,
    # bit for bit, on the same machine and versions; its SEED changes the batch order
    runs = [
        train(tiny_config(tiny_init, tiny_data, tmp_path / name, max_steps=4, seed=seed))
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert runs[0].losses == runs[1].losses
    a, b = (load_file(r.final_model / "model.safetensors") for r in runs[:2])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[2].losses != runs[0].losses


def test_resumed_run_repeats_the_uninterrupted_losses(tiny_init, tiny_data, tmp_path):
    full = train(tiny_config(tiny_init, tiny_data, tmp_path / "full", max_steps=6, save_every=2))
    cut = train(tiny_config(tiny_init, tiny_data, tmp_path / "cut", max_steps=6, save_every=2), stop_after=4)
    assert sorted(cut.losses) == [1, 2, 3, 4] and cut.final_model is None
    resumed = train(tiny_config(tiny_init, tiny_data, tmp_path / "cut", max_steps=6, save_every=2), resume=True)
    assert sorted(resumed.losses) == [5, 6]
    for step in (5, 6):
        assert abs(resumed.losses[step] - full.losses[step]) <= 1e-6, (step, resumed.losses, full.losses)
    a = load_file(full.final_model / "model.safetensors")
    b = load_file(resumed.final_model / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_a_changed_data_order(tiny_init, tiny_data, tmp_path):
    train(tiny_config(tiny_init, tiny_data, tmp_path, max_steps=2, save_every=1), stop_after=1)
    with pytest.raises(ValueError, match="global_batch_size: checkpoint 8, now 4"):
        train(tiny_config(tiny_init, tiny_data, tmp_path, max_steps=2, global_batch_size=4), resume=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_config(tiny_init, tiny_data, tmp_path / "empty"), resume=True)


def test_killed_run_resumes_from_its_last_complete_checkpoint(tiny_init, tiny_data, tmp_path):
    """SIGKILL a real `fastvlm train` process mid-run; the resumed run matches an uninterrupted one."""
    args = [
        "--model",
        str(tiny_init),
        "--data",
        str(tiny_data / "train.jsonl"),
        "--stage",
        "2",
        "--lr",
        "1e-3",
        "--global-batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--max-steps",
        "8",
        "--save-every",
        "1",
        "--no-progress",
    ]
    assert cli_main(["train", *args, "--output-dir", str(tmp_path / "full")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastvlm.cli", "train", *args, "--output-dir", str(out)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list_checkpoints(out)) < 1:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = list_checkpoints(out)
    assert done and not (out / "model").exists(), "the run should have been killed mid-way"
    assert cli_main(["train", *args, "--output-dir", str(out), "--resume"]) == 0
    full, resumed = _log_losses(tmp_path / "full"), _log_losses(out)
    assert set(resumed) == set(full)
    assert all(abs(resumed[s] - full[s]) <= 1e-6 for s in full)


def test_checkpoints_load_convert_and_are_pruned(tiny_init, tiny_data, tmp_path):
    result = train(tiny_config(tiny_init, tiny_data, tmp_path, max_steps=4, save_every=1, keep_checkpoints=2))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-0000003", "checkpoint-0000004"]
    assert not leftover_dirs(tmp_path)
    staging_dir(tmp_path / "checkpoint-0000009").mkdir()  # what a kill during a save leaves
    assert [p.name for p in list_checkpoints(tmp_path)] == names
    with pytest.raises(FileExistsError, match="--resume to continue it or --overwrite"):
        Trainer(tiny_config(tiny_init, tiny_data, tmp_path, max_steps=4))  # never mixes two runs
    assert staging_dir(tmp_path / "checkpoint-0000009").exists() is False  # but the leftover is cleared
    model = FastVLM.from_pretrained(tmp_path / "checkpoint-0000004", fuse=False)
    final = FastVLM.from_pretrained(result.final_model, fuse=False)
    for key, value in final.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])
    for fmt in ("apple", "hf"):
        assert cli_main(["convert", str(result.final_model), str(tmp_path / fmt), "--format", fmt]) == 0
        back = FastVLM.from_pretrained(tmp_path / fmt, fuse=False)
        ids = torch.tensor([[10, 11, 12]])
        torch.testing.assert_close(back(ids).logits, final(ids).logits)


# ------------------------------------------------------------------------------ numerics and memory


def test_gradient_checkpointing_gives_the_same_losses(tiny_init, tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_init, tiny_data, tmp_path / "c", gradient_checkpointing=True))
    assert trainer.model.language_model.model.gradient_checkpointing
    assert all(stage.gradient_checkpointing for stage in trainer.model.vision_tower.stages)
    trainer.close()
    plain = train(tiny_config(tiny_init, tiny_data, tmp_path / "a", max_steps=3))
    ckpt = train(tiny_config(tiny_init, tiny_data, tmp_path / "b", max_steps=3, gradient_checkpointing=True))
    for step in plain.losses:
        assert abs(plain.losses[step] - ckpt.losses[step]) <= 1e-6


def test_checkpointing_never_updates_batch_statistics_twice(tiny_data, tmp_path):
    source = FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"), fuse=False)
    config = source.config
    config.image_size, config.vision = 128, config.vision.replace(inference_mode=False)  # training form
    model = FastVLM.from_config(config, seed=0)
    model.tokenizer = source.tokenizer
    init = model.save_pretrained(tmp_path / "init")
    trainer = Trainer(tiny_config(init, tiny_data, tmp_path / "run", max_steps=1, gradient_checkpointing=True))
    trainer.run()
    trainer.close()
    counts = {
        int(b.num_batches_tracked) for b in trainer.model.vision_tower.modules() if isinstance(b, torch.nn.BatchNorm2d)
    }
    assert counts == {2}  # one step = 2 micro-batches of 4, each counted once


def test_bf16_autocast_trains(tiny_init, tiny_data, tmp_path):
    fp32 = train(tiny_config(tiny_init, tiny_data, tmp_path / "a", max_steps=2))
    bf16 = train(tiny_config(tiny_init, tiny_data, tmp_path / "b", max_steps=2, precision="bf16"))
    assert abs(bf16.losses[1] - fp32.losses[1]) < 0.05 * fp32.losses[1]
    assert bf16.losses[1] != fp32.losses[1]  # it really ran in bf16
    weights = load_file(bf16.final_model / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())  # fp32 master weights


# ------------------------------------------------------------------------------ adapters


def test_lora_trains_adapters_and_exports_merged_weights(tiny_init, tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_init,
        tiny_data,
        tmp_path,
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.05,
        max_steps=3,
        save_every=1,
        train=("projector", "llm"),
    )
    trainer = Trainer(cfg)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("projector.") for n in trainable)
    assert not any(n.startswith("vision_tower.") for n in trainable)
    result = trainer.run()
    trainer.close()
    # the exported model (merged W + BA·alpha/r) computes what the adapter-carrying model computes
    merged = FastVLM.from_pretrained(result.final_model, fuse=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    trainer.model.eval()  # no dropout
    torch.testing.assert_close(merged(ids).logits, trainer.model(ids).logits, rtol=1e-5, atol=1e-5)
    adapters = load_file(tmp_path / "checkpoint-0000003" / "adapter.safetensors")
    assert adapters and all(".lora_" in k for k in adapters)
    base = FastVLM.from_pretrained(tiny_init, fuse=False).state_dict()
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base[name])  # the adapters learned something
    # a resumed LoRA run restores its adapters (not the merged weights) and the dropout RNG
    cut = tmp_path / "cut"
    cfg_cut = replace(cfg, output_dir=str(cut))
    train(cfg_cut, stop_after=2)
    resumed = train(replace(cfg_cut), resume=True)
    assert abs(resumed.losses[3] - result.losses[3]) <= 1e-6


# ------------------------------------------------------------------------------ bad records


def test_bad_records_are_reported_and_skipped_or_rejected(tiny_init, tiny_data, tmp_path):
    lines = (tiny_data / "train.jsonl").read_text().splitlines()
    no_answer = {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]}
    bad = [
        *lines[:12],
        "{not json",
        json.dumps(no_answer),
        json.dumps(
            {
                "id": "lost",
                "image": "images/missing.png",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
            }
        ),
        *lines[12:],
    ]
    data = tiny_data / "with_bad.jsonl"
    data.write_text("\n".join(bad) + "\n")
    result = train(tiny_config(tiny_init, tiny_data, tmp_path, data=str(data), max_steps=1))
    assert len(result.skipped) == 3
    assert any("with_bad.jsonl:13: malformed JSON" in s for s in result.skipped)
    assert any("with_bad.jsonl:14 (id no-answer)" in s and "no assistant" in s for s in result.skipped)
    assert any("(id lost)" in s and "not found" in s for s in result.skipped)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "skipped_record" for e in log) == 3
    with pytest.raises(ValueError, match="with_bad.jsonl:13: malformed JSON"):
        train(tiny_config(tiny_init, tiny_data, tmp_path / "strict", data=str(data), strict_data=True))


def test_a_record_failing_at_load_time_is_skipped_without_stopping(tiny_init, tiny_data, tmp_path):
    lines = (tiny_data / "train.jsonl").read_text().splitlines()
    corrupt = tiny_data / "images" / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    record = {
        "id": "corrupt",
        "image": "images/corrupt.png",
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
    }
    data = tiny_data / "with_corrupt.jsonl"
    data.write_text("\n".join([json.dumps(record), *lines[:15]]) + "\n")
    result = train(tiny_config(tiny_init, tiny_data, tmp_path, data=str(data), max_steps=2, global_batch_size=8))
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses.values())
    assert len(result.skipped) == 1 and "(id corrupt)" in result.skipped[0]
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in log if e.get("event") == "skipped_record"] == result.skipped
    with pytest.raises(ValueError, match="--strict-data.*id corrupt"):
        train(tiny_config(tiny_init, tiny_data, tmp_path / "strict", data=str(data), max_steps=2, strict_data=True))


# ------------------------------------------------------------------------------ torchrun


def _with_text_only(tiny_data) -> Path:
    """The training records plus text-only ones, so some micro-batches have no image."""
    path = tiny_data / "mixed.jsonl"
    text = [
        json.dumps(
            {"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
        )
        for i, w in enumerate(["red", "blue", "one", "two", "CAT", "SUN", "MAP", "BOX"])
    ]
    path.write_text("\n".join([*text, *(tiny_data / "train.jsonl").read_text().splitlines()]) + "\n")
    return path


def _torchrun(nproc: int, out: Path, tiny_init, tiny_data, *extra: str) -> dict[int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "fastvlm.cli",
        "train",
        "--model",
        str(tiny_init),
        "--data",
        str(_with_text_only(tiny_data)),
        "--output-dir",
        str(out),
        "--stage",
        "2",
        "--lr",
        "1e-3",
        "--global-batch-size",
        "8",
        "--max-steps",
        "6",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _log_losses(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_half_the_batch_match_one(strategy, tiny_init, tiny_data, tmp_path):
    one = _torchrun(1, tmp_path / "one", tiny_init, tiny_data, "--micro-batch-size", "4")
    two = _torchrun(2, tmp_path / "two", tiny_init, tiny_data, "--micro-batch-size", "2", "--strategy", strategy)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, (strategy, step, one, two)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_qlora_trains_adapters_over_a_4bit_base_and_merges_into_the_source_weights(tiny_init, tiny_data, tmp_path):
    import bitsandbytes as bnb  # the optional extra fastvlm[qlora]; part of the dev extra, so CI runs this

    cfg = tiny_config(
        tiny_init,
        tiny_data,
        tmp_path,
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        qlora=True,
        max_steps=2,
        train=("projector", "llm"),
        lora_targets=("q_proj", "v_proj"),
    )
    trainer = Trainer(cfg)
    q_proj = trainer.model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    result = trainer.run()
    trainer.close()
    assert all(math.isfinite(v) for v in result.losses.values())
    source = FastVLM.from_pretrained(tiny_init, fuse=False).state_dict()
    merged = load_file(result.final_model / "model.safetensors")
    adapters = load_file(tmp_path / "checkpoint-0000002" / "adapter.safetensors")
    prefix = "language_model.model.layers.0.self_attn.q_proj"
    delta = adapters[f"{prefix}.lora_B.default.weight"] @ adapters[f"{prefix}.lora_A.default.weight"] * (8 / 4)
    assert delta.abs().max() > 0
    torch.testing.assert_close(merged[f"{prefix}.weight"], source[f"{prefix}.weight"] + delta)
    assert merged.keys() == {k for k in source if k != "language_model.lm_head.weight"}
