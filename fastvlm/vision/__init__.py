"""Vision encoders: FastViTHD (ours, three forms) and its building blocks."""

from fastvlm.vision.config import FastViTConfig, fastvithd_config
from fastvlm.vision.fastvit import FastViT, FastViTHD

__all__ = ["FastViT", "FastViTConfig", "FastViTHD", "fastvithd_config"]
