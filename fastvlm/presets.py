"""Architectures of the released FastVLMs, for building models with random weights.

The decoders are the Qwen2 configurations the released checkpoints carry (``apple/FastVLM-
{0.5B,1.5B,7B}``, ``config.json``); the tower is FastViTHD. :func:`resize_text_config`
edits a decoder's sizes consistently, for small models in tests and experiments.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import Qwen2Config

from fastvlm.config import DEFAULT_IMAGE_SIZE, FastVLMConfig
from fastvlm.errors import ConfigError
from fastvlm.vision.config import FastViTConfig

# Decoders of the released FastVLM checkpoints (Qwen2 configurations as published).
QWEN2_PRESETS: dict[str, dict[str, Any]] = {
    "0.5b": {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "1.5b": {
        "hidden_size": 1536,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "intermediate_size": 8960,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "7b": {
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}
# What the released checkpoints share (their config.json and tokenizer: <|endoftext|>, <|im_end|>).
_QWEN2_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "use_sliding_window": False,
}
# The released checkpoints' tokenizer_model_max_length.
RELEASED_MODEL_MAX_LENGTH = 8192
# Output width of MobileCLIP-L's image head, which the released towers carry unused.
CLIP_PROJECTION_DIM = 768


def qwen2_config(size: str) -> Qwen2Config:
    """The published Qwen2 decoder of a FastVLM size ("0.5b", "1.5b" or "7b")."""
    if size not in QWEN2_PRESETS:
        raise ConfigError(f"unknown LLM size {size!r}; expected one of {sorted(QWEN2_PRESETS)}")
    return Qwen2Config(**QWEN2_PRESETS[size], **_QWEN2_COMMON)


def fastvlm_config(
    llm: str = "0.5b", *, image_size: int = DEFAULT_IMAGE_SIZE, clip_head: bool = False
) -> FastVLMConfig:
    """The architecture of a released FastVLM (FastViTHD + the named Qwen2 size), for random-weight use."""
    text = qwen2_config(llm)
    vision = FastViTConfig(projection_dim=CLIP_PROJECTION_DIM if clip_head else None)
    return FastVLMConfig(text=text, vision=vision, image_size=image_size, model_max_length=RELEASED_MODEL_MAX_LENGTH)


def resize_text_config(
    text: Qwen2Config,
    *,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
) -> Qwen2Config:
    """A copy of ``text`` with the given sizes (None keeps a size), consistent with them.

    When any size changes, the head width is derived again from ``hidden_size / num_attention_heads`` and every
    layer uses full attention. Raises :class:`ConfigError` when the hidden size does not
    split into the heads, or the heads into the key/value groups.
    """
    sizes = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
    }
    changes = {k: v for k, v in sizes.items() if v is not None}
    if not changes:
        return copy.deepcopy(text)
    fields = {**text.to_dict(), **changes}
    fields.pop("head_dim", None)  # derived from hidden_size / heads
    hidden, heads, kv_heads = fields["hidden_size"], fields["num_attention_heads"], fields["num_key_value_heads"]
    if hidden % heads or heads % kv_heads:
        raise ConfigError(
            f"hidden_size ({hidden}) must divide by num_attention_heads ({heads}), "
            f"and num_attention_heads by num_key_value_heads ({kv_heads})"
        )
    fields["layer_types"] = ["full_attention"] * fields["num_hidden_layers"]
    return Qwen2Config(**fields)
