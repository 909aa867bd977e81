"""The whole model against both reference implementations; conversion; released key sets; errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvlm.formats import get_format
from fastvlm.model import FastVLM
from fastvlm.presets import fastvlm_config
from tests.conftest import assert_close_to_reference, fixture_path

FOLDERS = ["apple_fastvlm_tiny", "hf_fastvlm_tiny"]
IMAGE = "apple_fastvlm_tiny", "image.png"


@pytest.fixture(scope="module", params=FOLDERS)
def loaded(request):
    folder = request.param
    return folder, FastVLM.from_pretrained(fixture_path(folder))


def _golden(folder):
    return json.loads(fixture_path(folder, "golden.json").read_text()), load_file(
        fixture_path(folder, "golden.safetensors")
    )


def test_forward_reproduces_reference_logits(loaded):
    folder, model = loaded
    _, tensors = _golden(folder)
    with torch.inference_mode():
        logits = model(tensors["input_ids"], pixel_values=tensors["pixel_values"]).logits
    assert_close_to_reference(logits, tensors["logits"])


def test_forward_accepts_both_image_conventions(loaded):
    """One -200 per image (authors) and the <image> id repeated per visual token (transformers)."""
    folder, model = loaded
    apple_golden = load_file(fixture_path("apple_fastvlm_tiny", "golden.safetensors"))
    hf_golden = load_file(fixture_path("hf_fastvlm_tiny", "golden.safetensors"))
    with torch.inference_mode():
        a = model(apple_golden["input_ids"], pixel_values=apple_golden["pixel_values"]).logits
        b = model(hf_golden["input_ids"], pixel_values=hf_golden["pixel_values"]).logits
    assert_close_to_reference(a, apple_golden["logits"])
    assert_close_to_reference(b, apple_golden["logits"])


def test_greedy_generation_reproduces_reference_tokens(loaded):
    folder, model = loaded
    golden, _ = _golden(folder)
    result = model.generate(
        image=fixture_path(*IMAGE), prompt=golden["prompt"], max_new_tokens=len(golden["greedy_token_ids"])
    )
    assert result.token_ids == golden["greedy_token_ids"]
    t = result.timings
    assert t.visual_tokens == 16 and t.prompt_tokens == 45 and t.new_tokens == 12
    assert 0 < t.vision_ms < t.ttft_ms and 0 < t.prefill_ms < t.ttft_ms and t.decode_tokens_per_s > 0


def test_question_is_wrapped_in_the_template_with_the_image_first(loaded):
    folder, model = loaded
    golden, _ = _golden("apple_fastvlm_tiny")
    a = model.generate(image=fixture_path(*IMAGE), prompt=golden["question"], max_new_tokens=4)
    assert a.token_ids == golden["greedy_token_ids"][:4]


def test_unfused_tower_gives_the_same_logits():
    model = FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"), fuse=False)
    _, tensors = _golden("apple_fastvlm_tiny")
    with torch.inference_mode():
        logits = model(tensors["input_ids"], pixel_values=tensors["pixel_values"]).logits
    assert_close_to_reference(logits, tensors["logits"])


@pytest.mark.parametrize("source,other", [("apple_fastvlm_tiny", "hf"), ("hf_fastvlm_tiny", "apple")])
def test_conversion_round_trip_is_bit_identical(tmp_path, source, other):
    back = "apple" if source.startswith("apple") else "hf"
    FastVLM.from_pretrained(fixture_path(source), fuse=False).save_pretrained(tmp_path / "other", format=other)
    converted = FastVLM.from_pretrained(tmp_path / "other", fuse=False)
    converted.save_pretrained(tmp_path / "back", format=back)
    original = load_file(fixture_path(source, "model.safetensors"))
    round_trip = load_file(tmp_path / "back" / "model.safetensors")
    dropped = set(original) - set(round_trip)
    # transformers' format has no place for the unused CLIP head, exactly as its own converter drops it
    assert dropped == ({"model.vision_tower.vision_tower.model.head.proj"} if source.startswith("apple") else set())
    assert set(round_trip) <= set(original)
    for name, tensor in round_trip.items():
        assert torch.equal(tensor, original[name]), name
    golden, tensors = _golden(source)
    for folder in ("other", "back"):
        model = FastVLM.from_pretrained(tmp_path / folder)
        with torch.inference_mode():
            logits = model(tensors["input_ids"], pixel_values=tensors["pixel_values"]).logits
        assert_close_to_reference(logits, tensors["logits"])
        result = model.generate(image=fixture_path(*IMAGE), prompt=golden["prompt"], max_new_tokens=12)
        assert result.token_ids == golden["greedy_token_ids"]


def test_our_format_round_trips_everything(tmp_path):
    FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"), fuse=False).save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "fastvlm"
    FastVLM.from_pretrained(tmp_path / "ours", fuse=False).save_pretrained(tmp_path / "apple", format="apple")
    original = load_file(fixture_path("apple_fastvlm_tiny", "model.safetensors"))
    again = load_file(tmp_path / "apple" / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_sharded_and_bin_checkpoints_load(tmp_path):
    tensors = load_file(fixture_path("apple_fastvlm_tiny", "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    shutil.copytree(fixture_path("apple_fastvlm_tiny"), sharded)
    (sharded / "model.safetensors").unlink()
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, sharded / file)
        weight_map.update(dict.fromkeys(part, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    binary = tmp_path / "bin"
    shutil.copytree(fixture_path("apple_fastvlm_tiny"), binary)
    (binary / "model.safetensors").unlink()
    torch.save(tensors, binary / "pytorch_model.bin")
    _, golden = _golden("apple_fastvlm_tiny")
    for folder in (sharded, binary):
        model = FastVLM.from_pretrained(folder)
        with torch.inference_mode():
            logits = model(golden["input_ids"], pixel_values=golden["pixel_values"]).logits
        assert_close_to_reference(logits, golden["logits"])


def test_released_0_5b_key_set_on_meta():
    """FastVLM-0.5B (Qwen2-0.5B + FastViTHD) has exactly the keys of a released llava_qwen2 checkpoint."""
    config = fastvlm_config("0.5b", clip_head=True)
    with torch.device("meta"):
        model = FastVLM(config)
    state = model.state_dict()
    state.pop("language_model.lm_head.weight")  # tied to the embeddings: not stored
    ours = set(get_format("apple").keys_from_ours(state, config.vision).values())
    tower = json.loads(fixture_path("fastvithd_full_keys.json").read_text())["keys"]
    layer = [
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    released = (
        set(tower)
        | {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
        | {"model.embed_tokens.weight", "model.norm.weight"}
        | {f"model.layers.{i}.{name}" for i in range(24) for name in layer}
    )
    assert ours == released
    assert state["language_model.model.embed_tokens.weight"].shape == (151936, 896)
    assert state["projector.linear_1.weight"].shape == (896, 3072)
    assert config.num_image_tokens() == 256


def test_checkpoint_with_a_missing_tensor_is_named(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fixture_path("apple_fastvlm_tiny"), broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        FastVLM.from_pretrained(broken)


def test_not_a_checkpoint_and_offline_hub_ids_say_so(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        FastVLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        FastVLM.from_pretrained(tmp_path / "nope" / "deeper")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="offline .* no copy"):
        FastVLM.from_pretrained("apple/FastVLM-0.5B")


def test_fused_model_refuses_to_save(tmp_path):
    model = FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"))
    with pytest.raises(ValueError, match="fused for inference"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_saving_never_touches_unrelated_files(tmp_path):
    model = FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"), fuse=False)
    target = tmp_path / "work"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        model.save_pretrained(target, format="hf")
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    model.save_pretrained(target, format="hf", overwrite=True)
    model.save_pretrained(target, format="apple", overwrite=True)  # a second format over the first
    assert (target / "notes.txt").read_text() == "precious"
    assert json.loads((target / "config.json").read_text())["model_type"] == "llava_qwen2"
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    FastVLM.from_pretrained(target)


@pytest.mark.parametrize("grow", [False, True])
def test_authors_checkpoint_without_image_token_converts_to_transformers_format(tmp_path, grow):
    """Released authors' tokenizers have no <image>: conversion adds it, as transformers' converter does.

    The new id fits in the embedding (like 151646 < 151936 for Qwen2) or, with ``grow``,
    falls outside it, and the embedding gains rows up to a multiple of 64.
    """
    source = tmp_path / "apple"
    shutil.copytree(fixture_path("apple_fastvlm_tiny"), source)
    tok = json.loads((source / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<image>"]
    tok["model"]["vocab"].pop("<image>", None)
    if grow:  # one more token takes the last free id, so <image> lands at 387 = vocab_size
        tok["added_tokens"].append(
            {
                "id": 386,
                "content": "<extra>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (source / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config.get("extra_special_tokens", []) if t != "<image>"]
    (source / "tokenizer_config.json").write_text(json.dumps(config))

    model = FastVLM.from_pretrained(source, fuse=False)
    assert model.config.image_token_id is None
    model.save_pretrained(tmp_path / "hf", format="hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    token_id = hf_config["image_token_index"]
    assert token_id == (387 if grow else 386)
    assert hf_config["text_config"]["vocab_size"] == (448 if grow else 387)
    converted = FastVLM.from_pretrained(tmp_path / "hf")
    assert converted.tokenizer.convert_tokens_to_ids("<image>") == token_id
    golden, tensors = _golden("apple_fastvlm_tiny")
    result = converted.generate(image=fixture_path(*IMAGE), prompt=golden["prompt"], max_new_tokens=12)
    assert result.token_ids == golden["greedy_token_ids"]
    hf_ids = tensors["input_ids"][0].tolist()
    i = hf_ids.index(-200)
    ids = torch.tensor([hf_ids[:i] + [token_id] * 16 + hf_ids[i + 1 :]])
    with torch.inference_mode():
        logits = converted(ids, pixel_values=tensors["pixel_values"]).logits[..., :387]
    assert_close_to_reference(logits, tensors["logits"])
