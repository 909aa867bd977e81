"""Checkpoint formats: names, detection from config.json, and the key maps of whole models."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from fastvlm.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from fastvlm.formats import CheckpointFormat, format_of_config, get_format, read_checkpoint_config
from fastvlm.vision.layouts import TowerLayout, infer_tower_config
from tests.conftest import fixture_path


def test_formats_are_named_as_users_type_them():
    assert get_format("hf") is get_format(CheckpointFormat.FAST_VLM)
    assert [str(f) for f in CheckpointFormat] == ["fastvlm", "apple", "hf"]
    assert get_format("apple").tower_layout is TowerLayout.APPLE and get_format("hf").tower_layout is TowerLayout.TIMM
    with pytest.raises(ConfigError, match="unknown format 'timm'; expected fastvlm, apple or hf"):
        get_format("timm")


def test_the_format_is_read_from_model_type(tmp_path):
    assert format_of_config({"model_type": "llava_qwen2"}).name is CheckpointFormat.LLAVA_QWEN2
    assert read_checkpoint_config(fixture_path("hf_fastvlm_tiny"))[1].name == "hf"
    with pytest.raises(CheckpointNotFoundError, match="has no config.json"):
        read_checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="model_type 'llava' is not a FastVLM checkpoint"):
        read_checkpoint_config(tmp_path)


@pytest.mark.parametrize("folder", ["apple_fastvlm_tiny", "hf_fastvlm_tiny"])
def test_whole_model_key_maps_round_trip(folder):
    fmt = read_checkpoint_config(fixture_path(folder))[1]
    tensors = load_file(fixture_path(folder, "model.safetensors"))
    names = fmt.keys_to_ours(tensors)
    assert all(k.startswith(("vision_tower.", "projector.", "language_model.")) for k in names.values())
    tower = {
        ours.removeprefix("vision_tower."): tensors[theirs]
        for theirs, ours in names.items()
        if ours.startswith("vision_tower.")
    }
    back = fmt.keys_from_ours(names.values(), infer_tower_config(tower, keep_head=True))
    assert {theirs: back[ours] for theirs, ours in names.items()} == {k: k for k in tensors}


def test_unexpected_tensor_names_the_format():
    with pytest.raises(CheckpointError, match="unexpected tensor 'encoder.weight' in a hf-format FastVLM checkpoint"):
        get_format("hf").keys_to_ours(["encoder.weight"])
