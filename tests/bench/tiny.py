"""A FastVLM configuration small enough to run the benchmark code paths in a test."""

from __future__ import annotations

from fastvlm.presets import fastvlm_config
from fastvlm.vision import FastViTConfig


def tiny_config(llm: str = "0.5b", image_size: int = 1024):
    config = fastvlm_config("0.5b", image_size=image_size)
    config.vision = FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128))
    for key, value in dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=3000,
    ).items():
        setattr(config.text, key, value)
    return config
