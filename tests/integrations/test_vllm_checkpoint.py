"""What the vLLM plugin reads of a checkpoint without loading its tensors (main lane: no vLLM needed)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fastvlm.errors import CheckpointError
from fastvlm.files import read_state_dict_shapes
from fastvlm.formats import load_tokenizer, read_checkpoint
from fastvlm.integrations.vllm.checkpoint import describe_checkpoint, placeholder_token_id
from tests.conftest import fixture_path


@pytest.mark.parametrize("name", ["apple_fastvlm_tiny", "hf_fastvlm_tiny"])
def test_shapes_only_reading_describes_the_checkpoint_as_a_full_read_does(name: str) -> None:
    folder = fixture_path(name)
    full = read_checkpoint(folder)
    described = describe_checkpoint(str(folder))
    assert described.format is full.format
    assert described.names == full.names
    assert described.config.vision == full.config.vision
    for field in ("image_size", "image_mode", "projector_depth"):
        assert getattr(described.config, field) == getattr(full.config, field), field
    assert described.config.image_token_id == full.config.image_token_id
    assert described.config.text.to_dict() == full.config.text.to_dict()
    assert described.tensors.keys() == full.tensors.keys()
    for key, tensor in described.tensors.items():
        assert tensor.device.type == "meta"
        assert (tensor.shape, tensor.dtype) == (full.tensors[key].shape, full.tensors[key].dtype), key


def test_placeholder_is_the_configs_image_token_then_the_tokenizers() -> None:
    hf = describe_checkpoint(str(fixture_path("hf_fastvlm_tiny"))).config
    apple_folder = fixture_path("apple_fastvlm_tiny")
    apple = describe_checkpoint(str(apple_folder)).config
    tokenizer = load_tokenizer(apple_folder)
    assert placeholder_token_id(hf, tokenizer) == hf.image_token_id == 3
    assert apple.image_token_id is None  # the authors' format marks images with -200
    assert placeholder_token_id(apple, tokenizer) == tokenizer.convert_tokens_to_ids("<image>") == 3


class _NoImageToken:
    """A tokenizer without <image> (like the released authors' ones), of a given length."""

    unk_token_id = 0

    def __init__(self, length: int) -> None:
        self.length = length

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id

    def __len__(self) -> int:
        return self.length


def test_without_an_image_token_the_first_spare_embedding_row_is_used() -> None:
    config = copy.deepcopy(describe_checkpoint(str(fixture_path("apple_fastvlm_tiny"))).config)
    vocab = config.text.vocab_size
    assert placeholder_token_id(config, _NoImageToken(vocab - 5)) == vocab - 5
    with pytest.raises(CheckpointError, match="no spare id is left"):
        placeholder_token_id(config, _NoImageToken(vocab))


def test_a_truncated_weight_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint file .*model.safetensors"):
        read_state_dict_shapes(bad)
