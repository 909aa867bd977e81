"""The image encoders of the paper's efficiency study, at their published configurations.

FastViTHD and FastViT MCi2 are ours; ViT-L/14 (CLIP), SigLIP-SO400M/14 and ConvNeXt-L/XXL
are transformers' model classes (no timm needed). All are built with random weights:
latency does not depend on the values. ``tokens(side)`` is the number of visual tokens a
VLM gets from that encoder (patch tokens without CLS for ViTs; the last feature map for
convolutional encoders). Only the efficiency study uses these encoders, so they live
next to it rather than with the model's own vision tower. The FastViT towers' token
counts come from their configs (:meth:`FastViTConfig.num_tokens`); the baselines'
patch arithmetic is :func:`patch_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastvlm.errors import ConfigError
from fastvlm.vision.config import FastViTConfig, fastvithd_config, mci2_config
from fastvlm.vision.fastvit import FastViT

# The published towers: FastViTHD with its 768-d CLIP head (MobileCLIP-L), MCi2 (MobileCLIP-S2).
FASTVITHD = fastvithd_config(projection_dim=768)
MCI2 = mci2_config()
VIT_PATCH = 14  # ViT-L/14 and SigLIP-SO400M/14
CONVNEXT_STRIDE = 32  # ConvNeXt's last feature map (a stride-4 stem and three stride-2 stages)


def patch_tokens(patch: int) -> Callable[[int], int]:
    """Tokens of a baseline that maps each ``patch`` x ``patch`` square of a side to one token."""

    def tokens(side: int) -> int:
        return (side // patch) ** 2

    return tokens


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    label: str
    build: Callable[[], nn.Module]
    num_tokens: Callable[[int], int]  # visual tokens for an input side that is a multiple of ``multiple``
    multiple: int  # the input side is rounded down to a multiple of this
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, pixels) -> visual tokens [B, N, C]
    head_params: int = 0  # CLIP image-head parameters not in the module (counted as published, never run)

    def input_side(self, side: int) -> int:
        """The side the encoder runs at for a requested ``side`` (rounded down, at least ``multiple``)."""
        return max(self.multiple, side // self.multiple * self.multiple)

    def tokens(self, side: int) -> int:
        """Visual tokens for a requested ``side``."""
        return self.num_tokens(self.input_side(side))

    def num_parameters(self, model: nn.Module) -> int:
        """Parameters of ``model`` plus the published head's that the module leaves out."""
        return sum(p.numel() for p in model.parameters()) + self.head_params

    def encode(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Visual tokens [B, N, C]."""
        return self.features(model, pixels)


def _fastvit_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    assert isinstance(model, FastViT)
    return model.image_embeddings(pixels)


def _vit_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[:, 1:]  # drop CLS


def _siglip_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state


def _convnext_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).last_hidden_state.flatten(2).transpose(1, 2)


def _vit_l14() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=VIT_PATCH,
        image_size=336,
    )
    return CLIPVisionModel(config)


def _siglip_so400m() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=VIT_PATCH,
        image_size=384,
    )
    return SiglipVisionModel(config)


def _convnext(depths: list[int], widths: list[int]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import ConvNextConfig, ConvNextModel

        return ConvNextModel(ConvNextConfig(depths=depths, hidden_sizes=widths))

    return build


def _fastvit_spec(name: str, label: str, config: FastViTConfig) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        label=label,
        build=lambda: FastViT(config),
        num_tokens=config.num_tokens,
        multiple=config.stride,
        features=_fastvit_tokens,
    )


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in [
        _fastvit_spec("fastvithd", "FastViTHD", FASTVITHD),
        _fastvit_spec("fastvit_mci2", "FastViT (MCi2)", MCI2),
        EncoderSpec(
            name="vit_l14",
            label="ViT-L/14 (CLIP)",
            build=_vit_l14,
            num_tokens=patch_tokens(VIT_PATCH),
            multiple=VIT_PATCH,
            # open_clip's ViT-L/14 has a 1024x768 projection outside the transformer
            head_params=1024 * 768,
            features=_vit_tokens,
        ),
        EncoderSpec(
            name="siglip_so400m",
            label="SigLIP-SO400M/14",
            build=_siglip_so400m,
            num_tokens=patch_tokens(VIT_PATCH),
            multiple=VIT_PATCH,
            features=_siglip_tokens,
        ),
        EncoderSpec(
            name="convnext_l",
            label="ConvNeXt-L",
            build=_convnext([3, 3, 27, 3], [192, 384, 768, 1536]),
            num_tokens=patch_tokens(CONVNEXT_STRIDE),
            multiple=CONVNEXT_STRIDE,
            # open_clip's ConvNeXt-L (convnext_large_d) has an MLP head 1536->1536->768
            head_params=1536 * 1536 + 1536 + 1536 * 768,
            features=_convnext_tokens,
        ),
        EncoderSpec(
            name="convnext_xxl",
            label="ConvNeXt-XXL",
            build=_convnext([3, 4, 30, 3], [384, 768, 1536, 3072]),
            num_tokens=patch_tokens(CONVNEXT_STRIDE),
            multiple=CONVNEXT_STRIDE,
            # open_clip's ConvNeXt-XXL has a 3072x1024 projection
            head_params=3072 * 1024,
            features=_convnext_tokens,
        ),
    ]
}


def build_encoder(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fused: bool = True,
    seed: int = 0,
) -> nn.Module:
    """A random-weight encoder in eval mode; FastViT towers in their fused form unless ``fused=False``."""
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; expected one of {sorted(ENCODERS)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = ENCODERS[name].build().eval()
    if isinstance(model, FastViT) and fused:
        return model.fuse(dtype=dtype)
    return model.to(dtype)
