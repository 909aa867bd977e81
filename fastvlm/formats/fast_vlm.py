"""transformers' format: ``fast_vlm`` checkpoints (``FastVlmForConditionalGeneration``).

``config.json`` nests the decoder's config (``text_config``) and a ``timm_wrapper`` tower
config; the decoder's tensors sit under ``model.language_model.``, the projector under
``model.multi_modal_projector.linear_{1,2}`` and the tower, in timm's layout, under
``model.vision_tower.timm_model.``. Images are marked by the ``<image>`` token repeated
once per visual token, so a checkpoint needs that token: saving an authors' checkpoint in
this format adds it, as transformers' converter does.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import Qwen2Config

from fastvlm.config import DEFAULT_IMAGE_SIZE, FastVLMConfig
from fastvlm.errors import CheckpointError, ConfigError
from fastvlm.files import read_json
from fastvlm.formats.base import (
    OUR_LLM_PREFIX,
    OUR_LM_HEAD,
    OUR_TOWER_PREFIX,
    CheckpointFormat,
    Format,
    SaveParts,
    nested_text_config,
    text_config_fields,
    vocab_image_token,
)
from fastvlm.processing import DEFAULT_IMAGE_TOKEN
from fastvlm.vision.config import FastViTConfig
from fastvlm.vision.layouts import TowerLayout

# transformers' converter pads a grown vocabulary to a multiple of this.
VOCAB_MULTIPLE = 64
PROJECTOR_DEPTH = 2  # FastVlmMultiModalProjector: linear_1, GELU, linear_2
_PROJECTOR = re.compile(r"^model\.multi_modal_projector\.(linear_\d+\.(?:weight|bias))$")


def _image_size(raw: dict, vision: FastViTConfig, folder: Path | None) -> int:
    """The processor's crop size, else the side that gives ``image_seq_length`` tokens."""
    processor = folder / "preprocessor_config.json" if folder else None
    if processor is not None and processor.is_file():
        crop = read_json(processor).get("crop_size")
        if isinstance(crop, dict) and "height" in crop:
            return int(crop["height"])
    tokens = raw.get("image_seq_length")
    if tokens:
        return vision.image_size_for(int(tokens))
    return DEFAULT_IMAGE_SIZE


def _add_image_token(config: FastVLMConfig, tokenizer: Any, state: dict[str, torch.Tensor]) -> SaveParts:
    """(config, tokenizer, state) with an ``<image>`` token, as transformers' format needs.

    Uses the tokenizer's ``<image>`` when it has one; otherwise (the released authors'
    checkpoints) adds it to a copy of the tokenizer, as transformers' converter does,
    growing the embedding rows (new rows zero: the image token's embedding is never
    read, image features replace it) only when the id falls outside the vocabulary.
    """
    if tokenizer is None:
        raise CheckpointError("converting to transformers' format needs the checkpoint's tokenizer (none was found)")
    text = config.text
    token_id = vocab_image_token(tokenizer, text.vocab_size)
    if token_id is None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
        if token_id >= text.vocab_size:
            new_vocab = -(-(token_id + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
            state = dict(state)
            for key in (OUR_LLM_PREFIX + "embed_tokens.weight", OUR_LM_HEAD):
                if key in state:
                    old = state[key]
                    state[key] = torch.cat([old, old.new_zeros(new_vocab - old.shape[0], old.shape[1])])
            text = Qwen2Config(**{**text.to_dict(), "vocab_size": new_vocab})
    config = FastVLMConfig(**{**config.__dict__, "text": text, "image_token_id": token_id})
    return config, tokenizer, state


class FastVlm(Format):
    name = CheckpointFormat.FAST_VLM
    model_type = "fast_vlm"
    tower_layout = TowerLayout.TIMM
    llm_prefix = "model.language_model."

    def config_from_json(self, raw: dict, vision: FastViTConfig, folder: Path | None = None) -> FastVLMConfig:
        text = nested_text_config(raw, self.name)
        if "tie_word_embeddings" in raw:  # transformers reads the top-level flag
            text["tie_word_embeddings"] = raw["tie_word_embeddings"]
        return FastVLMConfig(
            text=Qwen2Config(**text),
            vision=vision,
            image_size=_image_size(raw, vision, folder),
            projector_depth=PROJECTOR_DEPTH,
            image_token_id=raw.get("image_token_index"),
            image_mode="pad",
        )

    def config_to_json(self, config: FastVLMConfig) -> dict:
        if config.projector_depth != PROJECTOR_DEPTH:
            raise ConfigError("transformers' fast_vlm format supports the 2-layer projector only")
        if config.image_token_id is None:
            raise ConfigError("transformers' fast_vlm format needs an image token id (image_token_id)")
        vision = config.vision
        return {
            "architectures": ["FastVlmForConditionalGeneration"],
            "model_type": self.model_type,
            "image_seq_length": config.num_image_tokens(),
            "image_token_index": config.image_token_id,
            "multimodal_projector_bias": True,
            "projector_hidden_act": "gelu",
            "text_config": {**text_config_fields(config.text), "model_type": "qwen2"},
            "tie_word_embeddings": config.text.tie_word_embeddings,
            "vision_config": {
                "architecture": "fastvit_mci3",
                "do_pooling": False,
                "hidden_size": vision.out_channels,
                "model_args": {
                    "embed_dims": list(vision.widths),
                    "inference_mode": True,
                    "layers": list(vision.depths),
                },
                "model_type": "timm_wrapper",
                "num_classes": 0,
            },
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
        }

    def projector_key_to_ours(self, key: str) -> str | None:
        m = _PROJECTOR.match(key)
        return f"projector.{m[1]}" if m else None

    def projector_key_from_ours(self, layer: int, param: str) -> str:
        return f"model.multi_modal_projector.linear_{layer}.{param}"

    def prepare_for_saving(self, config: FastVLMConfig, tokenizer: Any, state: dict[str, torch.Tensor]) -> SaveParts:
        if config.image_token_id is None:
            config, tokenizer, state = _add_image_token(config, tokenizer, state)
        # transformers' format has no place for the unused CLIP head (its converter drops it).
        state = {k: v for k, v in state.items() if k != OUR_TOWER_PREFIX + "head.proj"}
        return config, tokenizer, state
