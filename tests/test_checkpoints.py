"""Tower key layouts (ours, the authors', timm's): detection, lossless round trips, named errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fastvlm.vision import FastViTConfig, FastViTHD
from fastvlm.vision.layouts import (
    TOWER_PREFIXES,
    convert_tower_state_dict,
    detect_tower_layout,
    extract_tower_state_dict,
)
from tests.conftest import fixture_path

LAYOUTS = ["fastvlm", "apple", "timm"]


@pytest.fixture(scope="module", params=["inference", "training"])
def full_state_dict(request):
    with torch.device("meta"):
        tower = FastViTHD(FastViTConfig(inference_mode=request.param == "inference", projection_dim=768))
    return tower.state_dict()


@pytest.mark.parametrize("first", LAYOUTS)
@pytest.mark.parametrize("second", LAYOUTS)
def test_full_size_round_trip_through_every_pair_of_layouts(full_state_dict, first, second):
    a = convert_tower_state_dict(full_state_dict, first)
    assert detect_tower_layout(a) == first
    b = convert_tower_state_dict(a, second, prefix=True)
    back = convert_tower_state_dict(b, "fastvlm")
    assert list(back) == list(full_state_dict)
    for name, tensor in full_state_dict.items():
        assert back[name] is tensor, name  # the very same tensors, renamed only
    assert len(set(a)) == len(a) == len(b) == len(full_state_dict)


def test_real_tensors_round_trip_bit_identical():
    original = load_file(fixture_path("apple_tower_tiny_train", "model.safetensors"))
    timm = convert_tower_state_dict(original, "timm")
    ours = convert_tower_state_dict(timm, "fastvlm")
    apple = convert_tower_state_dict(ours, "apple")
    assert apple.keys() == original.keys()
    for name in original:
        assert torch.equal(apple[name], original[name]), name


def test_known_names_in_each_layout():
    with torch.device("meta"):
        released = FastViTHD(FastViTConfig(projection_dim=768)).state_dict()
    apple = convert_tower_state_dict(released, "apple")
    timm = convert_tower_state_dict(released, "timm")
    for name in [
        "patch_embed.2.reparam_conv.weight",
        "network.3.proj.1.reparam_conv.weight",
        "network.5.proj.0.lkb_reparam.weight",
        "network.9.reparam_conv.bias",
        "network.4.8.convffn.fc2.weight",
        "network.2.11.convffn.conv.bn.num_batches_tracked",
        "network.10.1.layer_scale_2",
        "conv_exp.se.reduce.weight",
        "head.proj",
    ]:
        assert name in apple, name
    for name in [
        "stem.2.reparam_conv.weight",
        "stages.2.downsample.proj.1.reparam_conv.weight",
        "stages.3.downsample.proj.0.reparam_conv.weight",
        "stages.4.pos_emb.reparam_conv.bias",
        "stages.2.blocks.8.mlp.fc2.weight",
        "stages.0.blocks.1.layer_scale.gamma",
        "stages.4.blocks.1.layer_scale_2.gamma",
        "final_conv.se.fc1.weight",
    ]:
        assert name in timm, name


def test_training_form_names_in_each_layout():
    keys = load_file(fixture_path("apple_tower_tiny_train", "model.safetensors")).keys()
    timm = convert_tower_state_dict(load_file(fixture_path("apple_tower_tiny_train", "model.safetensors")), "timm")
    assert "network.6.pe.weight" in keys and "stages.3.pos_emb.pos_enc.weight" in timm
    assert "network.1.proj.0.lkb_origin.conv.weight" in keys
    assert "stages.1.downsample.proj.0.large_conv.conv.weight" in timm
    assert "stages.0.blocks.0.token_mixer.mixer.conv_kxk.0.bn.weight" in timm
    assert "stages.0.blocks.0.token_mixer.norm.identity.running_var" in timm
    assert "stages.0.blocks.0.token_mixer.layer_scale.gamma" in timm
    assert "final_conv.conv_scale.conv.weight" in timm


def test_prefixes_are_stripped_and_other_model_tensors_ignored():
    tower = load_file(fixture_path("apple_tower_tiny", "model.safetensors"))
    whole = {TOWER_PREFIXES["apple"] + k: v for k, v in tower.items()}
    whole["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)
    whole["model.mm_projector.0.weight"] = torch.zeros(2, 2)
    tensors, prefix = extract_tower_state_dict(whole)
    assert prefix == TOWER_PREFIXES["apple"] and tensors.keys() == tower.keys()
    a = FastViTHD.from_state_dict(whole)
    b = FastViTHD.from_state_dict(tower)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_clip_head_is_ignored_unless_asked_for():
    tower = load_file(fixture_path("apple_tower_tiny", "model.safetensors"))
    tower["head.proj"] = torch.randn(512, 64)
    model = FastViTHD.from_state_dict(tower)
    assert model.head is None
    config = FastViTHD.from_state_dict(tower, device="meta").config.replace(projection_dim=64)
    with_head = FastViTHD.from_state_dict(tower, config=config)
    assert torch.equal(with_head.head.proj, tower["head.proj"])


def test_missing_tensor_is_named_in_the_checkpoint_layout():
    tower = load_file(fixture_path("apple_tower_tiny", "model.safetensors"))
    del tower["network.4.1.convffn.fc1.bias"]
    with pytest.raises(ValueError, match=r"missing tensors: network\.4\.1\.convffn\.fc1\.bias"):
        FastViTHD.from_state_dict(tower)


def test_unexpected_tensor_is_named():
    tower = load_file(fixture_path("hf_fastvlm_tiny", "model.safetensors"))
    tower["model.vision_tower.timm_model.stages.0.blocks.0.mlp.fc3.weight"] = torch.zeros(1)
    name = r"model\.vision_tower\.timm_model\.stages\.0\.blocks\.0\.mlp\.fc3\.weight"
    with pytest.raises(ValueError, match=rf"unexpected tensors: {name}"):
        FastViTHD.from_state_dict(tower)


def test_mis_shaped_tensor_is_named_with_both_shapes():
    tower = load_file(fixture_path("apple_tower_tiny", "model.safetensors"))
    tower["network.7.0.token_mixer.proj.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"network\.7\.0\.token_mixer\.proj\.bias: checkpoint \[7\] vs model \[128\]"):
        FastViTHD.from_state_dict(tower)


def test_mixed_forms_are_rejected():
    inference = load_file(fixture_path("apple_tower_tiny", "model.safetensors"))
    train = load_file(fixture_path("apple_tower_tiny_train", "model.safetensors"))
    mixed = dict(inference)
    mixed.update({k: v for k, v in train.items() if k.startswith("network.6.")})
    with pytest.raises(ValueError, match=r"unexpected tensors: network\.6\.pe\.(weight|bias)"):
        FastViTHD.from_state_dict(mixed)


def test_unknown_layout_is_explained():
    with pytest.raises(ValueError, match="cannot tell the layout"):
        FastViTHD.from_state_dict({"encoder.layer.0.weight": torch.zeros(1)})


def test_missing_num_batches_tracked_is_tolerated():
    tower = {
        k: v
        for k, v in load_file(fixture_path("apple_tower_tiny", "model.safetensors")).items()
        if not k.endswith("num_batches_tracked")
    }
    FastViTHD.from_state_dict(tower)


def test_loading_from_path_and_dtype(tmp_path):
    model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny", "model.safetensors"), dtype=torch.bfloat16)
    assert model.stem[0].reparam_conv.weight.dtype == torch.bfloat16
    assert not model.training
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        FastViTHD.from_state_dict(tmp_path / "nope.safetensors")


def test_base_model_prefixes_are_recognised():
    tower = load_file(fixture_path("hf_fastvlm_tiny", "model.safetensors"))
    base = {k.removeprefix("model."): v for k, v in tower.items() if k.startswith("model.vision_tower.")}
    assert extract_tower_state_dict(base)[1] == "vision_tower.timm_model."
    FastViTHD.from_state_dict(base)


def test_block_groups_without_a_patch_embedding_between_them_are_rejected():
    tower = load_file(fixture_path("apple_tower_tiny", "model.safetensors"))
    broken = {k: v for k, v in tower.items() if not k.startswith("network.1.")}
    broken.update({k.replace("network.2.", "network.1.", 1): v for k, v in tower.items() if k.startswith("network.2.")})
    with pytest.raises(ValueError, match="no patch embedding between them"):
        FastViTHD.from_state_dict(broken)


def test_odd_mlp_widths_load_exactly():
    config = FastViTConfig(
        depths=(1, 1),
        widths=(32, 64),
        token_mixers=("repmixer", "attention"),
        pos_embeds=(False, False),
        mlp_ratios=(15 / 11 * 1.0, 3.0),
    )
    tower = FastViTHD(config)
    hidden = tower.stages[0].blocks[0].mlp.fc1.out_channels
    assert hidden == round(32 * 15 / 11)
    again = FastViTHD.from_state_dict(tower.state_dict())
    assert again.stages[0].blocks[0].mlp.fc1.out_channels == hidden


def test_malformed_tensors_give_a_value_error():
    tower = load_file(fixture_path("apple_tower_tiny", "model.safetensors"))
    tower["network.0.0.convffn.fc1.weight"] = torch.zeros(64)
    with pytest.raises(ValueError, match="odd shape|wrong shape"):
        FastViTHD.from_state_dict(tower)
    with pytest.raises(ValueError, match="not tensors: network.0.0.layer_scale"):
        FastViTHD.from_state_dict({**tower, "network.0.0.layer_scale": 3})


def test_kernel_sizes_are_validated():
    with pytest.raises(ValueError, match="must be odd"):
        FastViTConfig(repmixer_kernel=4)
    with pytest.raises(ValueError, match="must not exceed down_kernel"):
        FastViTConfig(down_kernel=3, down_small_kernel=5)
