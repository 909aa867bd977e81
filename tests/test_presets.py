"""Presets of the released architectures, and resizing a decoder consistently."""

from __future__ import annotations

import pytest

from fastvlm.errors import ConfigError
from fastvlm.presets import QWEN2_PRESETS, fastvlm_config, qwen2_config, resize_text_config


def test_presets_match_the_released_decoders():
    text = qwen2_config("0.5b")
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (896, 24, 14)
    assert text.tie_word_embeddings and not qwen2_config("7b").tie_word_embeddings
    assert sorted(QWEN2_PRESETS) == ["0.5b", "1.5b", "7b"]
    config = fastvlm_config("0.5b", clip_head=True)
    assert config.vision.projection_dim == 768 and config.num_image_tokens() == 256
    with pytest.raises(ConfigError, match="unknown LLM size '3b'"):
        qwen2_config("3b")


def test_resizing_derives_the_head_width_and_one_layer_type_per_layer():
    text = qwen2_config("0.5b")
    text.head_dim = 64  # as a saved config may carry it
    small = resize_text_config(text, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads) == (64, 2, 4)
    assert small.num_key_value_heads == 2 and small.intermediate_size == text.intermediate_size
    assert "head_dim" not in small.to_dict()  # derived again from the new sizes
    assert small.layer_types == ["full_attention", "full_attention"]
    assert small.vocab_size == text.vocab_size and small.eos_token_id == text.eos_token_id
    assert text.hidden_size == 896  # the input is not changed


def test_resizing_nothing_returns_an_equal_copy():
    text = qwen2_config("1.5b")
    same = resize_text_config(text)
    assert same is not text and same.to_dict() == text.to_dict()


@pytest.mark.parametrize(
    "sizes",
    [{"hidden_size": 100, "num_attention_heads": 3}, {"num_attention_heads": 14, "num_key_value_heads": 4}],
)
def test_sizes_that_do_not_split_into_heads_are_a_config_error(sizes):
    with pytest.raises(ConfigError, match=r"hidden_size \(\d+\) must divide by num_attention_heads"):
        resize_text_config(qwen2_config("0.5b"), **sizes)
