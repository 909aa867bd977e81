"""FastViTHD against the reference implementations' golden outputs (../shared/fixtures)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastvlm.vision import FastViTHD, fastvithd_config
from fastvlm.vision.layouts import convert_tower_state_dict
from tests.conftest import assert_close_to_reference, fixture_path


@pytest.fixture(scope="module")
def tower_golden():
    return load_file(fixture_path("apple_tower_tiny", "golden.safetensors"))


@pytest.fixture(scope="module")
def train_golden():
    return load_file(fixture_path("apple_tower_tiny_train", "golden.safetensors"))


def _run(model: FastViTHD, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixels)


def test_inference_form_reproduces_reference(tower_golden):
    model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny", "model.safetensors"))
    assert model.config.inference_mode
    assert model.config.depths == (1, 2, 2, 1, 1)
    assert model.config.widths == (16, 32, 64, 128, 256)
    assert model.config.pos_embeds == (False, False, False, True, True)
    assert_close_to_reference(_run(model, tower_golden["pixel_values"]), tower_golden["image_embeddings"])


def test_fused_form_reproduces_reference(tower_golden):
    model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny", "model.safetensors")).fuse()
    assert model.is_fused
    out = _run(model, tower_golden["pixel_values"])
    assert out.is_contiguous() and out.dtype == torch.float32
    assert_close_to_reference(out, tower_golden["image_embeddings"])


def test_fused_form_runs_our_depthwise_kernel(tower_golden, monkeypatch):
    """Every depthwise conv of the fused tiny tower (3x3, 7x7, strided, a multiplier of 2) takes our op,
    but the stem's: its GELU is fused by oneDNN, and it has no channels to repeat."""
    from fastvlm import native

    op, weights = native.depthwise_conv_kernel(), []
    if op is None:
        pytest.skip("our depthwise kernel is not built here (tests/test_native.py checks where it must be)")
    monkeypatch.setattr(native, "depthwise_conv_kernel", lambda: lambda *args: weights.append(args[1]) or op(*args))
    model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny", "model.safetensors")).fuse()
    assert_close_to_reference(_run(model, tower_golden["pixel_values"]), tower_golden["image_embeddings"])
    depthwise = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.out_channels > 1 and not name.startswith("stem.")
    ]
    assert [id(w) for w in weights] == [id(w) for w in depthwise]  # each once, in the tower's order
    assert {w.shape[-1] for w in weights} == {3, 7}


def test_fused_form_without_onednn_reproduces_reference(tower_golden, monkeypatch):
    """The portable fallback (used on GPU and builds without oneDNN or our kernels) computes the same function."""
    import fastvlm.vision.kernels as kernels

    monkeypatch.setattr(kernels, "onednn_fusion_available", lambda dtype=None: False)
    monkeypatch.setattr(kernels, "NATIVE_DEPTHWISE", False)
    model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny", "model.safetensors")).fuse()
    assert_close_to_reference(_run(model, tower_golden["pixel_values"]), tower_golden["image_embeddings"])


def test_training_form_reproduces_reference(train_golden):
    model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny_train", "model.safetensors"))
    assert not model.config.inference_mode
    assert_close_to_reference(_run(model, train_golden["pixel_values"]), train_golden["image_embeddings"])


def test_reparameterize_matches_reference_output_and_weights(train_golden):
    model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny_train", "model.safetensors"))
    assert model.reparameterize() is model
    assert model.config.inference_mode
    assert_close_to_reference(
        _run(model, train_golden["pixel_values"]), train_golden["image_embeddings_reparameterized"]
    )
    reference = load_file(fixture_path("apple_tower_tiny_train", "reparameterized.safetensors"))
    ours = convert_tower_state_dict(model.state_dict(), "apple")
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        if ref.is_floating_point():
            assert_close_to_reference(ours[name], ref)
        else:
            assert torch.equal(ours[name], ref), name


def test_reparameterized_then_fused_reproduces_reference(train_golden):
    model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny_train", "model.safetensors")).fuse()
    assert_close_to_reference(
        _run(model, train_golden["pixel_values"]), train_golden["image_embeddings_reparameterized"]
    )


def test_transformers_checkpoint_tower_equals_authors_checkpoint_tower():
    """hf_fastvlm_tiny stores the same weights as apple_fastvlm_tiny in timm's layout."""
    apple = FastViTHD.from_state_dict(fixture_path("apple_fastvlm_tiny", "model.safetensors"))
    hf = FastViTHD.from_state_dict(fixture_path("hf_fastvlm_tiny", "model.safetensors"))
    a, b = apple.state_dict(), hf.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_full_size_tower_on_meta_matches_released_keys_and_counts():
    reference = json.loads(fixture_path("fastvithd_full_keys.json").read_text())
    with torch.device("meta"):
        tower = FastViTHD(fastvithd_config(projection_dim=768))
    released = convert_tower_state_dict(tower.state_dict(), "apple", prefix=True)
    assert released.keys() == reference["keys"].keys()
    for name, shape in reference["keys"].items():
        assert list(released[name].shape) == shape, name
    assert tower.num_parameters() == reference["parameters_total"] == 125_073_504
    assert tower.num_parameters(include_head=False) == reference["parameters_without_clip_head"] == 122_714_208
    with torch.device("meta"):
        assert FastViTHD().num_parameters() == 122_714_208


def test_full_size_released_keys_load_back_into_the_preset():
    """The released key list, fed back through from_state_dict, yields the FastViTHD preset."""
    reference = json.loads(fixture_path("fastvithd_full_keys.json").read_text())
    state_dict = {
        name: torch.empty(
            shape, dtype=torch.long if name.endswith("num_batches_tracked") else torch.float32, device="meta"
        )
        for name, shape in reference["keys"].items()
    }
    tower = FastViTHD.from_state_dict(state_dict, device="meta")
    assert tower.config == fastvithd_config()
    assert tower.config.stride == 64 and tower.config.out_channels == 3072


def test_loading_and_fusing_never_modify_the_callers_tensors(tower_golden):
    """fuse() folds layer scales out of place: the state dict and other towers made from it stay intact."""
    state = load_file(fixture_path("apple_tower_tiny", "model.safetensors"))
    before = {k: v.clone() for k, v in state.items()}
    plain = FastViTHD.from_state_dict(state)
    FastViTHD.from_state_dict(state).fuse()
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert_close_to_reference(_run(plain, tower_golden["pixel_values"]), tower_golden["image_embeddings"])


def test_load_fuse_and_run_inside_inference_mode(tower_golden):
    with torch.inference_mode():
        model = FastViTHD.from_state_dict(fixture_path("apple_tower_tiny", "model.safetensors")).fuse()
        out = model(tower_golden["pixel_values"])
    assert_close_to_reference(out, tower_golden["image_embeddings"])
    assert model.reparameterize() is model  # a no-op on the fused form
    assert_close_to_reference(_run(model, tower_golden["pixel_values"]), tower_golden["image_embeddings"])
