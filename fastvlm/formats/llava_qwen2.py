"""The authors' format: ``llava_qwen2`` checkpoints (``apple/FastVLM-*`` on the Hub).

``config.json`` is a flat Qwen2 config with the multimodal settings mixed in
(``mm_projector_type``, ``mm_vision_tower``, ...). The decoder's tensors sit under
``model.``, the projector is an ``nn.Sequential`` (``model.mm_projector.{0,2}``: Linear
layers at even indices, GELUs between them) and the tower, in the authors' layout, under
``model.vision_tower.vision_tower.model.``. Images are marked by one ``-200`` per image
in the token ids; released tokenizers have no ``<image>`` token.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import Qwen2Config

from fastvlm.config import FastVLMConfig
from fastvlm.errors import CheckpointError
from fastvlm.formats.base import CheckpointFormat, Format, text_config_fields
from fastvlm.vision.config import FastViTConfig
from fastvlm.vision.layouts import TowerLayout

# Fields of the authors' config.json that describe the multimodal wrapper rather than Qwen2.
MULTIMODAL_FIELDS = {
    "mm_hidden_size",
    "mm_patch_merge_type",
    "mm_projector_type",
    "mm_use_im_patch_token",
    "mm_use_im_start_end",
    "mm_vision_select_feature",
    "mm_vision_select_layer",
    "mm_vision_tower",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "freeze_mm_mlp_adapter",
    "tune_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "architectures",
    "model_type",
    "transformers_version",
}
# What the released checkpoints say when a field is absent (the authors' LlavaConfig defaults).
DEFAULT_PROJECTOR = "mlp2x_gelu"
DEFAULT_TOWER = "mobileclip_l_1024"
DEFAULT_MODEL_MAX_LENGTH = 8192  # written when our config has no limit (the released value)
_PROJECTOR = re.compile(r"^model\.mm_projector\.(\d+)\.(weight|bias)$")


def _projector_depth(projector_type: str) -> int:
    if m := re.fullmatch(r"mlp(\d+)x_gelu", projector_type):
        return int(m[1])
    raise CheckpointError(f"projector type {projector_type!r} is not supported; expected mlpNx_gelu (e.g. mlp2x_gelu)")


class LlavaQwen2(Format):
    name = CheckpointFormat.LLAVA_QWEN2
    model_type = "llava_qwen2"
    tower_layout = TowerLayout.APPLE
    llm_prefix = "model."

    def config_from_json(self, raw: dict, vision: FastViTConfig, folder: Path | None = None) -> FastVLMConfig:
        text = {k: v for k, v in raw.items() if k not in MULTIMODAL_FIELDS}
        tower_name = str(raw.get("mm_vision_tower", DEFAULT_TOWER))
        try:
            image_size = int(tower_name.rsplit("_", 1)[-1])
        except ValueError:
            raise CheckpointError(f"mm_vision_tower {tower_name!r} does not end in the input resolution") from None
        return FastVLMConfig(
            text=Qwen2Config(**text),
            vision=vision,
            image_size=image_size,
            projector_depth=_projector_depth(raw.get("mm_projector_type", DEFAULT_PROJECTOR)),
            image_mode="pad" if raw.get("image_aspect_ratio", "pad") == "pad" else "crop",
            model_max_length=raw.get("tokenizer_model_max_length"),
        )

    def config_to_json(self, config: FastVLMConfig) -> dict:
        return {
            "architectures": ["LlavaQwen2ForCausalLM"],
            **text_config_fields(config.text),
            "model_type": self.model_type,
            "image_aspect_ratio": "pad" if config.image_mode == "pad" else "square",
            "mm_hidden_size": config.vision.out_channels,
            "mm_patch_merge_type": "flat",
            "mm_projector_type": f"mlp{config.projector_depth}x_gelu",
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": f"mobileclip_l_{config.image_size}",
            "tokenizer_model_max_length": config.model_max_length or DEFAULT_MODEL_MAX_LENGTH,
            "tokenizer_padding_side": "right",
            "unfreeze_mm_vision_tower": True,
            "use_mm_proj": True,
        }

    def projector_key_to_ours(self, key: str) -> str | None:
        if m := _PROJECTOR.match(key):
            if int(m[1]) % 2:
                raise CheckpointError(f"unexpected tensor {key!r}: mm_projector has Linear layers at even indices only")
            return f"projector.linear_{int(m[1]) // 2 + 1}.{m[2]}"
        return None

    def projector_key_from_ours(self, layer: int, param: str) -> str:
        return f"model.mm_projector.{2 * (layer - 1)}.{param}"
