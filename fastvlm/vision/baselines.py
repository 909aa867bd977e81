"""The image encoders of the paper's efficiency study, at their published configurations.

FastViTHD and FastViT MCi2 are ours; ViT-L/14 (CLIP), SigLIP-SO400M/14 and ConvNeXt-L/XXL
are transformers' model classes (no timm needed). All are built with random weights:
latency does not depend on the values. ``tokens(side)`` is the number of visual tokens a
VLM gets from that encoder (patch tokens without CLS for ViTs; the last feature map for
convolutional encoders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastvlm.vision.config import fastvithd_config, mci2_config
from fastvlm.vision.fastvit import FastViT


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    label: str
    build: Callable[[], nn.Module]
    stride: int  # input pixels per token, along one side
    multiple: int  # the input side is rounded down to a multiple of this
    head_params: int = 0  # CLIP image-head parameters not in the module (counted as published, never run)
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    def input_side(self, side: int) -> int:
        return max(self.multiple, side // self.multiple * self.multiple)

    def tokens(self, side: int) -> int:
        return (self.input_side(side) // self.stride) ** 2

    def num_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters()) + self.head_params

    def encode(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Visual tokens [B, N, C]."""
        if self.features is not None:
            return self.features(model, pixels)
        return model.image_embeddings(pixels)


def _vit_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[:, 1:]  # drop CLS


def _siglip_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state


def _convnext_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).last_hidden_state.flatten(2).transpose(1, 2)


def _vit_l14() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, patch_size=14, image_size=336)  # fmt: skip
    return CLIPVisionModel(config)


def _siglip_so400m() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, patch_size=14, image_size=384)  # fmt: skip
    return SiglipVisionModel(config)


def _convnext(depths: list[int], widths: list[int]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ConvNextConfig, ConvNextModel

        return ConvNextModel(ConvNextConfig(depths=depths, hidden_sizes=widths))

    return build


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in [
        EncoderSpec("fastvithd", "FastViTHD", lambda: FastViT(fastvithd_config(projection_dim=768)), 64, 64),
        EncoderSpec("fastvit_mci2", "FastViT (MCi2)", lambda: FastViT(mci2_config()), 32, 32),
        # open_clip's ViT-L/14 has a 1024x768 projection outside the transformer
        EncoderSpec("vit_l14", "ViT-L/14 (CLIP)", _vit_l14, 14, 14, 1024 * 768, _vit_tokens),
        EncoderSpec("siglip_so400m", "SigLIP-SO400M/14", _siglip_so400m, 14, 14, 0, _siglip_tokens),
        # open_clip's ConvNeXt-L (convnext_large_d) has an MLP head 1536->1536->768; XXL a 3072x1024 projection
        EncoderSpec("convnext_l", "ConvNeXt-L", _convnext([3, 3, 27, 3], [192, 384, 768, 1536]), 32, 32,
                    1536 * 1536 + 1536 + 1536 * 768, _convnext_tokens),
        EncoderSpec("convnext_xxl", "ConvNeXt-XXL", _convnext([3, 4, 30, 3], [384, 768, 1536, 3072]), 32, 32,
                    3072 * 1024, _convnext_tokens),
    ]
}  # fmt: skip


def build_encoder(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  fused: bool = True, seed: int = 0) -> nn.Module:  # fmt: skip
    """A random-weight encoder in eval mode; FastViT towers in their fused form unless ``fused=False``."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {sorted(ENCODERS)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = ENCODERS[name].build().eval()
    if isinstance(model, FastViT) and fused:
        return model.fuse(dtype=dtype)
    return model.to(dtype)
