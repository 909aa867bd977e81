"""FastViT vision tower, with FastViTHD (the FastVLM encoder) as its preset.

Module tree (our state-dict layout; see :mod:`fastvlm.vision.layouts` for the authors'
and timm's names of the same tensors)::

    stem.{0,1,2}                   3x3 s2 conv, 3x3 s2 depthwise, 1x1 (MobileOne, GELU)
    stages.{s}.downsample          PatchEmbed (s >= 1): .spatial 7x7 s2 dw, .pointwise 1x1
    stages.{s}.pos_embed           RepCPE 7x7 (where config.pos_embeds[s])
    stages.{s}.blocks.{b}          RepMixerBlock or AttentionBlock
    final_conv                     3x3 depthwise C -> 2C with squeeze-excitation, GELU
    head.proj                      optional CLIP projection [2C, projection_dim] (unused by the VLM)

``forward`` returns the ``final_conv`` feature map [B, 2C, H/stride, W/stride].
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastvlm.errors import ImageError
from fastvlm.vision.blocks import AttentionBlock, RepCPE, RepMixerBlock
from fastvlm.vision.config import DOWNSAMPLE_STRIDE, FastViTConfig, fastvithd_config
from fastvlm.vision.loading import load_tower_state_dict
from fastvlm.vision.mobileone import LargeKernelConv, MobileOneBlock, PatchEmbed


class CLIPImageHead(nn.Module):
    """Global average pool + linear projection (``GlobalPool2D``): MobileCLIP's image head.

    Only kept so that checkpoints that carry ``head.proj`` round-trip; FastVLM uses the
    feature map before it.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ self.proj


def _has_training_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())


class FastViTStage(nn.Module):
    def __init__(self, config: FastViTConfig, index: int) -> None:
        super().__init__()
        dim = config.widths[index]
        train = not config.inference_mode
        self.downsample = (
            PatchEmbed(
                config.widths[index - 1],
                dim,
                config.down_kernel,
                config.down_small_kernel,
                use_se=bool(config.se_downsamples and config.se_downsamples[index]),
                inference_mode=not train,
            )
            if index > 0
            else None
        )
        self.pos_embed = (
            RepCPE(dim, config.pos_embed_kernel, inference_mode=not train) if config.pos_embeds[index] else None
        )
        ratio = config.mlp_ratios[index]
        blocks: list[nn.Module]
        if config.token_mixers[index] == "repmixer":
            blocks = [
                RepMixerBlock(
                    dim,
                    ratio,
                    kernel_size=config.repmixer_kernel,
                    layer_scale_init=config.layer_scale_init,
                    inference_mode=not train,
                )
                for _ in range(config.depths[index])
            ]
        else:
            blocks = [
                AttentionBlock(dim, ratio, head_dim=config.head_dim, layer_scale_init=config.layer_scale_init)
                for _ in range(config.depths[index])
            ]
        self.blocks = nn.Sequential(*blocks)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Recompute each block in the backward pass instead of keeping its activations. Blocks
            # whose batch norms use batch statistics are not recomputed: that would update them twice.
            for block in self.blocks:
                x = block(x) if _has_training_batchnorm(block) else checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class FastViT(nn.Module):
    """FastViT-family image encoder returning the expanded last feature map.

    Three forms share this class (see :mod:`fastvlm.vision.reparam`): the training form
    (``config.inference_mode=False``), the released inference form, and the fused form
    made by :meth:`fuse`. ``reparameterize()`` turns the first into the second in place.
    """

    def __init__(self, config: FastViTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or fastvithd_config()
        train = not config.inference_mode
        c0 = config.widths[0]
        half = DOWNSAMPLE_STRIDE  # the stem's two strided convs make STEM_STRIDE
        self.stem = nn.Sequential(
            MobileOneBlock(3, c0, 3, half, scale_branch=config.stem_scale_branch, inference_mode=not train),
            MobileOneBlock(c0, c0, 3, half, groups=c0, scale_branch=config.stem_scale_branch, inference_mode=not train),
            MobileOneBlock(c0, c0, 1, 1, inference_mode=not train),
        )
        self.stages = nn.ModuleList(FastViTStage(config, i) for i in range(len(config.depths)))
        last = config.widths[-1]
        self.final_conv = MobileOneBlock(
            last, config.out_channels, 3, 1, groups=last, use_se=True, inference_mode=not train
        )
        self.head = CLIPImageHead(config.out_channels, config.projection_dim) if config.projection_dim else None
        self.is_fused = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory in training: block activations are recomputed in backward."""
        for stage in self.stages:
            cast(FastViTStage, stage).gradient_checkpointing = enabled

    # ---------------------------------------------------------------- forward
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, out_channels, H/stride, W/stride].

        H and W must be multiples of ``config.stride``.
        """
        self._check_input(pixel_values)
        x = pixel_values
        if self.is_fused:
            x = x.to(dtype=self._dtype(), memory_format=torch.channels_last)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = self.final_conv(x)
        if self.is_fused:
            x = x.contiguous().to(pixel_values.dtype)
        return x

    def _dtype(self) -> torch.dtype:
        conv = self.final_conv.reparam_conv
        assert conv is not None  # the fused form is re-parameterised
        return conv.weight.dtype

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ImageError(f"expected pixel_values of shape [B, 3, H, W], got {list(x.shape)}")
        stride = self.config.stride
        h, w = x.shape[-2:]
        if h % stride or w % stride:
            raise ImageError(
                f"image side {h}x{w} is not a multiple of the tower stride {stride}; "
                f"resize or pad to a multiple of {stride} (e.g. {max(stride, h // stride * stride)}x"
                f"{max(stride, w // stride * stride)})"
            )

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens [B, N, C], row-major over the output grid (what the projector takes)."""
        return self(pixel_values).flatten(2).transpose(1, 2)

    # ---------------------------------------------------------------- forms
    @torch.no_grad()
    def reparameterize(self) -> FastViT:
        """Training form -> inference form, in place (no-op on an inference-form or fused tower)."""
        if self.is_fused:
            return self
        for module in self.modules():
            reparameterize = getattr(module, "reparameterize", None)
            if module is not self and reparameterize is not None:
                reparameterize()
        self.config = self.config.replace(inference_mode=True)
        return self

    @torch.no_grad()
    def fuse(self, dtype: torch.dtype | None = None) -> FastViT:
        """Inference form -> fused form for fast inference, in place.

        Re-parameterises if needed, folds the ConvFFN BatchNorms into their depthwise
        convs and the block layer scales into the preceding projections, switches
        attention to ``scaled_dot_product_attention`` and LayerNorm to its fused kernel,
        and stores weights channels-last (faster for the convs on CPU and GPU). Use
        ``dtype`` (e.g. ``torch.bfloat16`` on GPU) to cast the weights; inputs are cast
        to it and outputs cast back. The fused tower is for inference only: its state
        dict no longer matches a checkpoint layout.
        """
        if self.is_fused:
            return self
        self.reparameterize()
        self.eval()
        for module in self.modules():
            if isinstance(module, (MobileOneBlock, LargeKernelConv, RepMixerBlock, AttentionBlock, RepCPE)):
                module.fuse()
        self.requires_grad_(False)
        if dtype is not None:
            self.to(dtype)
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs
        self.is_fused = True
        return self

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
        *,
        config: FastViTConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> FastViT:
        """Build a tower from a state dict (or a ``.safetensors`` path) in any known layout.

        Accepts the authors' layout (``patch_embed.*``, ``network.N.*``, ``conv_exp.*``),
        transformers/timm's (``stem.*``, ``stages.N.*``, ``final_conv.*``) and ours, each
        with or without its FastVLM checkpoint prefix. Depths, widths, token mixers,
        positional encodings, MLP ratios and the form (training or inference) are read
        from the tensors unless ``config`` is given. The unused CLIP head ``head.proj``
        is dropped unless ``config.projection_dim`` asks for it. Floating tensors are cast
        to ``dtype`` (None keeps the checkpoint's). Missing, unexpected or mis-shaped
        tensors raise a :class:`~fastvlm.errors.CheckpointError` (a ``ValueError``) that
        names them.
        """
        return load_tower_state_dict(cls, state_dict, config=config, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> FastViT:
        """Alias of :meth:`from_state_dict` for a file path."""
        return cls.from_state_dict(Path(path), **kwargs)

    def num_parameters(self, include_head: bool = True) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if include_head or not name.startswith("head."))


class FastViTHD(FastViT):
    """FastViTHD: the FastVLM encoder (depths 2/12/24/4/2, widths 96..1536, stride 64).

    ``FastViTHD()`` builds the published architecture; ``FastViTHD(config)`` any
    FastViT-family variant (the fixtures use a tiny one).
    """

    def __init__(self, config: FastViTConfig | None = None) -> None:
        super().__init__(config or fastvithd_config())
