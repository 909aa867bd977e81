"""vLLM's multimodal processor for FastVLM: our preprocessing and tokenisation inside vLLM.

vLLM splits a model's input handling into three parts, each a class here:

* :class:`FastVLMProcessingInfo` answers questions about the checkpoint: how many images a
  prompt may hold (one), how many positions an image takes ((side/64)^2), which id marks
  them.
* :class:`FastVLMDummyInputsBuilder` makes the largest input vLLM profiles memory with.
* :class:`FastVLMMultiModalProcessor` turns a tokenised prompt and its images into what the
  model reads: the pixels from our :class:`~fastvlm.processing.ImageProcessor` (pad or crop,
  as the checkpoint says) and the prompt with each ``<image>`` widened to one placeholder id
  per visual token.

The prompt reaches the processor tokenised in one pass over the whole text. The authors
tokenise each piece between images on its own, and their tokenizers have no ``<image>``
token (the text ``<image>`` becomes three ordinary tokens), so :meth:`_postprocess_prompt`
decodes the prompt and tokenises it again the authors' way, with the placeholder id where
each ``<image>`` was: the ids are then exactly those :func:`fastvlm.processing.tokenize_prompt`
gives our own engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media import MediaWithBytes
from vllm.multimodal.parse import ImageProcessorItems, ModalityDataItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from fastvlm.errors import PromptError
from fastvlm.integrations.vllm.checkpoint import IMAGES_PER_PROMPT, CheckpointFacts, checkpoint_facts
from fastvlm.processing import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, ImageProcessor, tokenize_prompt


class OriginalImages(ImageProcessorItems):
    """A prompt's images as the user sent them, for our image processor to decode.

    vLLM's loader decodes downloaded images and flattens transparency onto white; the
    authors' preprocessing (and ours, and so FastVLM.generate) drops the alpha channel
    instead. Handing our processor the original bytes keeps the two engines' pixels equal.
    """

    def get_processor_data(self) -> Mapping[str, object]:
        return {"images": [item.original_bytes if isinstance(item, MediaWithBytes) else item for item in self.data]}


class FastVLMDataParser(MultiModalDataParser):
    """vLLM's parser, except that images reach our processor unconverted (see :class:`OriginalImages`)."""

    def _parse_image_data(self, data: Any) -> ModalityDataItems[Any, Any] | None:
        if data is None or self.is_embeddings(data):
            return super()._parse_image_data(data)
        one = isinstance(data, (Image.Image, MediaWithBytes)) or (
            isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 3
        )
        return OriginalImages([data] if one else list(data))


class FastVLMProcessingInfo(BaseProcessingInfo):
    """The checkpoint's facts, as vLLM's processor asks for them."""

    @property
    def facts(self) -> CheckpointFacts:
        return checkpoint_facts(self.ctx.model_config.model, self.get_tokenizer())

    @property
    def image_processor(self) -> ImageProcessor:
        config = self.facts.config
        return ImageProcessor(config.image_size, config.image_mode)

    def get_data_parser(self) -> MultiModalDataParser:
        return FastVLMDataParser(
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_hf_processor(self, **kwargs: object) -> Any:
        """FastVLM checkpoints have no transformers processor: the images go through ours."""
        return self.image_processor

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set()}

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": IMAGES_PER_PROMPT}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.facts.tokens_per_image}


class FastVLMDummyInputsBuilder(BaseDummyInputsBuilder[FastVLMProcessingInfo]):
    """A prompt of bare placeholders and black images at the checkpoint's resolution."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return DEFAULT_IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any) -> dict:
        side = self.info.facts.config.image_size
        overrides = mm_options.get("image") if mm_options else None
        images = self._get_dummy_images(
            width=side, height=side, num_images=mm_counts.get("image", 0), overrides=overrides
        )
        return {"image": images}


class FastVLMMultiModalProcessor(BaseMultiModalProcessor[FastVLMProcessingInfo]):
    """Pixels from our image processor; each ``<image>`` becomes (side/64)^2 placeholder ids."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = cast(Sequence[Any], hf_data.get("images") or [])
        processor = self.info.image_processor
        pixels = [processor(image) for image in images]
        return BatchFeature({"pixel_values": torch.stack(pixels)} if pixels else {})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        facts = self.info.facts
        placeholder = facts.placeholder_id
        return [
            PromptReplacement(
                modality="image", target=[placeholder], replacement=[placeholder] * facts.tokens_per_image
            )
        ]

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """The prompt tokenised the authors' way, one placeholder id where each ``<image>`` is.

        Also checks that the prompt has one ``<image>`` per image: vLLM would otherwise
        fail later with a message about its own internals.
        """
        tokenizer = self.info.get_tokenizer()
        placeholder = self.info.facts.placeholder_id
        text = tokenizer.decode(prompt, skip_special_tokens=False)
        if DEFAULT_IMAGE_TOKEN not in text:
            return prompt
        ids = tokenize_prompt(tokenizer, text)
        return [placeholder if t == IMAGE_TOKEN_INDEX else t for t in ids]

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        """vLLM's processing, after checking that the prompt has one ``<image>`` per image."""
        images = inputs.mm_data_items.get_all_counts().get("image", 0)
        placeholder = self.info.facts.placeholder_id
        marked = sum(1 for t in self._postprocess_prompt(list(inputs.prompt)) if t == placeholder)
        if marked != images:
            raise PromptError(
                f"the prompt has {marked} {DEFAULT_IMAGE_TOKEN} placeholder(s) but {images} image(s) were given; "
                f"FastVLM takes one image per prompt, marked by one {DEFAULT_IMAGE_TOKEN} in the text"
            )
        return super().apply(inputs, timing_ctx)
