"""Our format: ``config.json`` with ``model_type: fastvlm`` and tensors in our own names.

The config holds :class:`FastVLMConfig` field for field (the decoder's as a nested
``text_config``, the tower's whole :class:`FastViTConfig` as ``vision_config``), so that
nothing has to be inferred; the tensors are the module's ``state_dict()`` as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import Qwen2Config

from fastvlm.config import FastVLMConfig
from fastvlm.formats.base import CheckpointFormat, Format, nested_text_config, require, text_config_fields
from fastvlm.vision.config import FastViTConfig
from fastvlm.vision.layouts import TowerLayout


class Native(Format):
    name = CheckpointFormat.NATIVE
    model_type = "fastvlm"
    tower_layout = TowerLayout.OURS
    llm_prefix = "language_model.model."

    def config_from_json(self, raw: dict, vision: FastViTConfig, folder: Path | None = None) -> FastVLMConfig:
        # The saved tower config wins over the inferred one: it also holds what tensors cannot say.
        return FastVLMConfig(
            text=Qwen2Config(**nested_text_config(raw, self.name)),
            vision=FastViTConfig.from_dict(require(raw, "vision_config", self.name)),
            image_size=require(raw, "image_size", self.name),
            projector_depth=raw.get("projector_depth", 2),
            image_token_id=raw.get("image_token_id"),
            image_mode=raw.get("image_mode", "pad"),
            model_max_length=raw.get("model_max_length"),
        )

    def config_to_json(self, config: FastVLMConfig) -> dict:
        return {
            "model_type": self.model_type,
            "text_config": text_config_fields(config.text),
            "vision_config": config.vision.to_dict(),
            "image_size": config.image_size,
            "projector_depth": config.projector_depth,
            "image_token_id": config.image_token_id,
            "image_mode": config.image_mode,
            "model_max_length": config.model_max_length,
        }

    def keys_to_ours(self, keys: Iterable[str]) -> dict[str, str]:
        return {k: k for k in keys}

    def keys_from_ours(self, keys: Iterable[str], vision: FastViTConfig) -> dict[str, str]:
        return {k: k for k in keys}
