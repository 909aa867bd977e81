"""The offline benchmark tokenizers: the byte tokenizer's specials, and every padded id decoding to text."""

from __future__ import annotations

import pytest

from fastvlm.bench.tokenizer import EOS_TOKEN, byte_tokenizer, padded_byte_tokenizer
from fastvlm.errors import ConfigError


def test_every_id_of_the_padded_tokenizer_decodes_to_text():
    base = len(byte_tokenizer())
    tokenizer = padded_byte_tokenizer(base + 100)
    assert len(tokenizer) == base + 100
    assert tokenizer.decode([base + 99]) == f"<v{base + 99}>"
    assert all(tokenizer.decode([i]) for i in range(len(tokenizer)))
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]


def test_a_vocabulary_smaller_than_the_byte_tokenizer_is_refused():
    with pytest.raises(ConfigError, match="below the byte tokenizer"):
        padded_byte_tokenizer(10)
