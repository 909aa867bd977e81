"""fastvlm: FastVLM (FastViTHD + Qwen2) inference, conversion, training and evaluation."""

from typing import Any

from fastvlm.errors import FastVLMError
from fastvlm.vision import FastViT, FastViTConfig, FastViTHD

__all__ = ["FastVLM", "FastVLMConfig", "FastVLMError", "FastViT", "FastViTConfig", "FastViTHD"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The model pulls in transformers; import it on first use so that tower-only work stays light.
    if name in ("FastVLM", "FastVLMConfig"):
        from fastvlm import model

        return getattr(model, name)
    raise AttributeError(f"module 'fastvlm' has no attribute {name!r}")
