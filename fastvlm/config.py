"""The architecture of a whole FastVLM, independent of any checkpoint format.

It lives below both :mod:`fastvlm.model` (which builds modules from it) and
:mod:`fastvlm.formats` (which reads and writes it as each format's ``config.json``), so
that neither of those imports the other's layer. How each format spells these fields is
the business of that format's module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Qwen2Config

from fastvlm.vision.config import FastViTConfig

# The released FastVLMs' input resolution (the side of the square image the tower sees).
DEFAULT_IMAGE_SIZE = 1024


@dataclass
class FastVLMConfig:
    """Everything needed to rebuild a FastVLM without its weights."""

    text: Qwen2Config
    vision: FastViTConfig = field(default_factory=FastViTConfig)
    image_size: int = DEFAULT_IMAGE_SIZE
    projector_depth: int = 2
    # transformers' convention: this token id, repeated once per visual token, marks an image
    image_token_id: int | None = None
    image_mode: str = "pad"  # "pad" (authors) or "crop" (transformers' processor)
    model_max_length: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def context_length(self) -> int:
        limits = [self.text.max_position_embeddings, self.model_max_length]
        return min(v for v in limits if v)

    def num_image_tokens(self, image_size: int | None = None) -> int:
        return self.vision.num_tokens(image_size or self.image_size)
