"""Re-parameterisation: folding a block's training branches into one conv.

FastViT / FastViTHD blocks exist in up to three forms:

* **training form**: the multi-branch structure with BatchNorm (MobileOne, RepMixer,
  large-kernel conv and RepCPE branches) that is trained;
* **inference form**: what released FastVLM checkpoints store, one conv with bias per
  re-parameterisable block, produced from the training form by ``reparameterize()``;
* **fused form**: our faster inference form, produced by ``fuse()``, which also folds
  what the reference implementations leave unfused (the ConvFFN depthwise conv +
  BatchNorm, the block layer scales) and uses fused attention kernels.

The inference form computes exactly what the authors' code computes (explicit softmax
attention, hand-written channel LayerNorm), so it doubles as the reference path. This
module holds the arithmetic every block's ``reparameterize()`` shares; the blocks live in
:mod:`fastvlm.vision.mobileone` (convolutional blocks) and :mod:`fastvlm.vision.blocks`
(token mixers and the stage blocks built on them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fold_batchnorm(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a bias-free conv into (weight, bias).

    BN(W*x) = gamma * (W*x - mean) / sqrt(var + eps) + beta.
    """
    assert bn.running_var is not None and bn.running_mean is not None  # a BN that tracks statistics
    assert bn.weight is not None and bn.bias is not None  # an affine BN
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.reshape(shape), bn.bias - bn.running_mean * scale


def identity_kernel(channels: int, groups: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """Conv kernel [channels, channels/groups, k, k] that maps a tensor to itself."""
    in_per_group = channels // groups
    kernel = torch.zeros(channels, in_per_group, kernel_size, kernel_size, dtype=like.dtype, device=like.device)
    centre = kernel_size // 2
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % in_per_group, centre, centre] = 1.0
    return kernel


def pad_kernel(kernel: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-pad a smaller square kernel to ``kernel_size``, keeping it centred."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4)


def conv_from(weight: torch.Tensor, bias: torch.Tensor, *, stride: int | tuple = 1, groups: int = 1) -> nn.Conv2d:
    """A "same"-padded Conv2d holding the given (folded) weight and bias."""
    out_ch, in_per_group, k, _ = weight.shape
    conv = nn.Conv2d(
        in_per_group * groups,
        out_ch,
        k,
        stride,
        k // 2,
        groups=groups,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    conv.weight.data.copy_(weight.detach())
    assert conv.bias is not None
    conv.bias.data.copy_(bias.detach())
    return conv


class ConvBN(nn.Module):
    """Conv without bias followed by BatchNorm: one branch of a re-parameterisable block."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def folded(self, kernel_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the equivalent single conv, padded to ``kernel_size``."""
        weight, bias = fold_batchnorm(self.conv.weight, self.bn)
        if kernel_size is not None:
            weight = pad_kernel(weight, kernel_size)
        return weight, bias
