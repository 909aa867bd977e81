"""FastVLM as a vLLM model: our FastViTHD and projector in front of vLLM's own Qwen2.

vLLM runs the decoder (paged KV cache, continuous batching, tensor parallelism, its
attention kernels); this class adds the image side. ``embed_multimodal`` encodes a batch
of images with our fused tower and projector, and vLLM writes the visual tokens over the
placeholder positions that :mod:`fastvlm.integrations.vllm.processing` put in the prompt.

The children are named as in our state-dict layout (``vision_tower``, ``projector``,
``language_model``), so a checkpoint in either format loads through the same key maps as
:meth:`fastvlm.model.FastVLM.from_pretrained`: the tower's architecture comes from the
checkpoint's tensor shapes, its tensors are checked as strictly (each missing or unexpected
tensor named as the checkpoint spells it), and the decoder's tensors are streamed to vLLM's
Qwen2 loader, which stacks q/k/v and gate/up and shards them across ranks itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from fastvlm.errors import CheckpointError
from fastvlm.integrations.vllm.checkpoint import describe_checkpoint
from fastvlm.integrations.vllm.processing import (
    FastVLMDummyInputsBuilder,
    FastVLMMultiModalProcessor,
    FastVLMProcessingInfo,
)
from fastvlm.model import MultiModalProjector
from fastvlm.processing import DEFAULT_IMAGE_TOKEN
from fastvlm.state_dicts import check_state_dict, is_batch_counter
from fastvlm.vision import FastViT

LANGUAGE_MODEL = "language_model."
IMAGE_SIDE = ("vision_tower.", "projector.")  # our prefixes of the parts this class loads itself


@MULTIMODAL_REGISTRY.register_processor(
    FastVLMMultiModalProcessor, info=FastVLMProcessingInfo, dummy_inputs=FastVLMDummyInputsBuilder
)
class FastVLMForVLLM(nn.Module, SupportsMultiModal):
    """FastViTHD -> MLP projector -> vLLM's Qwen2, for both released checkpoint formats."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return DEFAULT_IMAGE_TOKEN
        raise ValueError(f"FastVLM takes images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.checkpoint = describe_checkpoint(vllm_config.model_config.model)
        config = self.checkpoint.config
        self.config = config
        # (the context managers come from SupportsMultiModal, unknown to mypy without vLLM installed)
        with self._mark_tower_model(vllm_config, "image"):  # type: ignore[operator]
            self.vision_tower = FastViT(config.vision)
            self.projector = MultiModalProjector(config.vision.out_channels, config.hidden_size, config.projector_depth)
        with self._mark_language_model(vllm_config):  # type: ignore[operator]
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ------------------------------------------------------------------ images
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One [T, H] tensor per image, in prompt order."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        assert isinstance(pixel_values, torch.Tensor)
        weight = self.projector.linear_1.weight
        features = self.vision_tower.image_embeddings(pixel_values.to(weight.device, weight.dtype))
        return list(self.projector(features))

    # ------------------------------------------------------------------ decoder
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a checkpoint's tensors; returns the names of every parameter it set.

        The decoder's tensors go to vLLM's Qwen2 loader as they arrive; the tower's and
        projector's are gathered (about 125M parameters), checked, copied in, and the
        tower is then fused for inference.
        """
        image_side: dict[str, torch.Tensor] = {}
        names = self.checkpoint.names

        def decoder_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                ours = names.get(name)
                if ours is None:
                    raise CheckpointError(
                        f"tensor {name!r} of {self.checkpoint.folder} was not in the checkpoint when it was described"
                    )
                if ours.startswith(LANGUAGE_MODEL):
                    yield ours[len(LANGUAGE_MODEL) :], tensor
                else:
                    image_side[ours] = tensor

        loaded = {LANGUAGE_MODEL + name for name in self.language_model.load_weights(decoder_weights())}
        self._load_image_side(image_side)
        self.vision_tower.fuse()
        return loaded | {name for name, _ in self.named_parameters() if name.startswith(IMAGE_SIDE)}

    @torch.no_grad()
    def _load_image_side(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {k: v for k, v in self.state_dict().items() if k.startswith(IMAGE_SIDE)}
        check_state_dict(
            expected,
            tensors,
            self.checkpoint.name_of,
            what=f"{self.checkpoint.folder} ({self.checkpoint.format.name} format) does not fit its config",
            optional=is_batch_counter,
        )
        for key, target in expected.items():
            if key in tensors:
                target.copy_(tensors[key])
