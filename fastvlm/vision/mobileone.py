"""Convolutional FastViT blocks: MobileOne (stem, final conv), large-kernel downsampling, PatchEmbed.

Each block owns its ``reparameterize()`` (training form -> one conv with bias) and
``fuse()`` (our faster inference form); see :mod:`fastvlm.vision.reparam` for the forms.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fastvlm.vision.config import DOWNSAMPLE_STRIDE
from fastvlm.vision.kernels import FusedLinear, as_depthwise, fused_conv, pointwise_conv
from fastvlm.vision.reparam import ConvBN, conv_from, fold_batchnorm, identity_kernel


class SEBlock(nn.Module):
    """Squeeze-and-excitation: global mean, 1x1 reduce, ReLU, 1x1 expand, sigmoid gate."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(gate))))
        return x * gate


def _fused_conv_se_act(conv: nn.Conv2d, x: torch.Tensor, repeat: int, se: nn.Module, act: nn.Module) -> torch.Tensor:
    """A fused block's conv, SE and activation: conv and GELU in one kernel when no SE sits between them."""
    if isinstance(se, nn.Identity):
        return fused_conv(conv, x, repeat=repeat, gelu=isinstance(act, nn.GELU))
    return act(se(fused_conv(conv, x, repeat=repeat)))


class MobileOneBlock(nn.Module):
    """MobileOne block: k x k conv branches + optional 1x1 scale branch + optional BN skip.

    Training form: ``conv_branches.{i}`` (conv + BN), ``scale_branch`` (1x1 conv + BN,
    only for k > 1), ``skip_branch`` (BN alone, only when shape is preserved). Their sum
    goes through an optional SE block and activation. ``reparameterize()`` folds all
    branches into ``reparam_conv``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        *,
        use_se: bool = False,
        activation: bool = True,
        scale_branch: bool = True,
        skip_branch: bool = True,
        num_conv_branches: int = 1,
        inference_mode: bool = True,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.stride, self.groups = stride, groups
        self.se = SEBlock(out_ch) if use_se else nn.Identity()
        self.act = nn.GELU() if activation else nn.Identity()
        self.fused = False
        self.linear: FusedLinear | None = None  # the fused form of a 1x1 block
        self.channel_repeat = 1  # the fused form of a channel-multiplier depthwise block
        if inference_mode:
            self.reparam_conv: nn.Conv2d | None = nn.Conv2d(
                in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups
            )
            return
        self.reparam_conv = None
        self.conv_branches = nn.ModuleList(
            ConvBN(in_ch, out_ch, kernel_size, stride, groups) for _ in range(num_conv_branches)
        )
        self.scale_branch = ConvBN(in_ch, out_ch, 1, stride, groups) if scale_branch and kernel_size > 1 else None
        has_skip = skip_branch and in_ch == out_ch and stride == 1
        self.skip_branch = nn.BatchNorm2d(in_ch) if has_skip else None

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        out = self.skip_branch(x) if self.skip_branch is not None else 0
        if self.scale_branch is not None:
            out = out + self.scale_branch(x)
        for branch in self.conv_branches:
            out = out + branch(x)
        return cast(torch.Tensor, out)  # a training-form block has at least one branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear is not None:
            return pointwise_conv(self.linear, x, gelu=isinstance(self.act, nn.GELU))
        if self.fused:
            assert self.reparam_conv is not None  # the fused form is re-parameterised
            return _fused_conv_se_act(self.reparam_conv, x, self.channel_repeat, self.se, self.act)
        return self.act(self.se(self.branch_sum(x)))

    def fuse(self) -> None:
        """Re-parameterise; run conv + GELU as one kernel, and a plain 1x1 block as a matmul."""
        self.reparameterize()
        self.fused = True
        conv = self.reparam_conv
        assert conv is not None  # set by reparameterize()
        plain_1x1 = conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1)
        if plain_1x1 and isinstance(self.se, nn.Identity):
            self.linear = FusedLinear.from_module(conv)
            del self.reparam_conv
        else:
            self.reparam_conv, self.channel_repeat = as_depthwise(conv)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single conv equal to the sum of the branches."""
        if self.reparam_conv is not None:
            assert self.reparam_conv.bias is not None
            return self.reparam_conv.weight, self.reparam_conv.bias
        k = self.kernel_size
        branches = [cast(ConvBN, branch) for branch in self.conv_branches]
        ref = branches[0].conv.weight if branches else cast(nn.BatchNorm2d, self.skip_branch).weight
        weight = torch.zeros(self.out_ch, self.in_ch // self.groups, k, k, dtype=ref.dtype, device=ref.device)
        bias = torch.zeros(self.out_ch, dtype=ref.dtype, device=ref.device)
        for branch in branches:
            w, b = branch.folded()
            weight, bias = weight + w, bias + b
        if self.scale_branch is not None:
            w, b = self.scale_branch.folded(k)
            weight, bias = weight + w, bias + b
        if self.skip_branch is not None:
            w, b = fold_batchnorm(identity_kernel(self.in_ch, self.groups, k, ref), self.skip_branch)
            weight, bias = weight + w, bias + b
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        weight, bias = self.folded()
        self.reparam_conv = conv_from(weight, bias, stride=self.stride, groups=self.groups)
        del self.conv_branches, self.scale_branch, self.skip_branch


class LargeKernelConv(nn.Module):
    """Depthwise large-kernel conv (+ parallel small kernel) and GELU, used to downsample.

    Training form: ``large_conv`` (k x k conv + BN) + ``small_conv`` (3x3 conv + BN), summed.
    The activation is applied after the sum in both forms (the authors' code does so;
    timm needs ``lkc_use_act=True`` to match).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int,
        small_kernel: int | None = 3,
        *,
        use_se: bool = False,
        inference_mode: bool = True,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size, self.stride = in_ch, out_ch, kernel_size, stride
        self.se = SEBlock(out_ch, rd_ratio=0.25) if use_se else nn.Identity()
        self.act = nn.GELU()
        self.fused = False
        self.channel_repeat = 1  # fused form: input channels repeated to make the conv depthwise
        if inference_mode:
            self.reparam_conv: nn.Conv2d | None = nn.Conv2d(
                in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=in_ch
            )
            return
        self.reparam_conv = None
        self.large_conv = ConvBN(in_ch, out_ch, kernel_size, stride, groups=in_ch)
        self.small_conv = ConvBN(in_ch, out_ch, small_kernel, stride, groups=in_ch) if small_kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            assert self.reparam_conv is not None  # the fused form is re-parameterised
            return _fused_conv_se_act(self.reparam_conv, x, self.channel_repeat, self.se, self.act)
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self.large_conv(x)
            if self.small_conv is not None:
                out = out + self.small_conv(x)
        return self.act(self.se(out))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        weight, bias = self.large_conv.folded()
        if self.small_conv is not None:
            w, b = self.small_conv.folded(self.kernel_size)
            weight, bias = weight + w, bias + b
        self.reparam_conv = conv_from(weight, bias, stride=self.stride, groups=self.in_ch)
        del self.large_conv, self.small_conv

    def fuse(self) -> None:
        """Re-parameterise; compute conv + GELU in one kernel, as a true depthwise conv."""
        self.reparameterize()
        self.fused = True
        assert self.reparam_conv is not None  # set by reparameterize()
        self.reparam_conv, self.channel_repeat = as_depthwise(self.reparam_conv)


class PatchEmbed(nn.Module):
    """Downsampling between stages (stride ``DOWNSAMPLE_STRIDE``): large-kernel depthwise conv, then 1x1 MobileOne."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 7,
        small_kernel: int = 3,
        *,
        use_se: bool = False,
        inference_mode: bool = True,
    ) -> None:
        super().__init__()
        self.spatial = LargeKernelConv(
            in_ch, out_ch, kernel_size, DOWNSAMPLE_STRIDE, small_kernel, use_se=use_se, inference_mode=inference_mode
        )
        self.pointwise = MobileOneBlock(out_ch, out_ch, 1, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.spatial(x))
