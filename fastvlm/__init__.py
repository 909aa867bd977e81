"""fastvlm: FastVLM (FastViTHD + Qwen2) inference, conversion, training and evaluation."""

from fastvlm.vision import FastViT, FastViTConfig, FastViTHD

__all__ = ["FastViT", "FastViTConfig", "FastViTHD"]
__version__ = "0.1.0"
