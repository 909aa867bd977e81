"""Building blocks of FastViT / FastViTHD, each in up to three forms.

* **training form**: the multi-branch structure with BatchNorm (MobileOne, RepMixer,
  large-kernel conv and RepCPE branches) that is trained;
* **inference form**: what released FastVLM checkpoints store, one conv with bias per
  re-parameterisable block, produced from the training form by ``reparameterize()``;
* **fused form**: our faster inference form, produced by ``fuse()``, which also folds
  what the reference implementations leave unfused (the ConvFFN depthwise conv +
  BatchNorm, the block layer scales) and uses fused attention kernels.

The inference form computes exactly what the authors' code computes (explicit softmax
attention, hand-written channel LayerNorm), so it doubles as the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvlm.vision.kernels import FusedLinear, as_depthwise, conv_gelu, pointwise_conv, repeat_channels

# --------------------------------------------------------------------------------------
# Re-parameterisation arithmetic
# --------------------------------------------------------------------------------------


def fold_batchnorm(weight: torch.Tensor, bn: nn.BatchNorm2d):
    """Fold an eval-mode BatchNorm that follows a bias-free conv into (weight, bias).

    BN(W*x) = gamma * (W*x - mean) / sqrt(var + eps) + beta.
    """
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


# --------------------------------------------------------------------------------------
# Small layers
# --------------------------------------------------------------------------------------


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


class LayerNormChannel(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor, written out as the authors do.

    The inference form computes mean and biased variance by hand (bit-compatible with
    the reference); the fused form calls ``F.layer_norm`` on the channels-last view,
    which is the same function in one kernel.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# --------------------------------------------------------------------------------------
# Re-parameterisable blocks
# --------------------------------------------------------------------------------------


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
            self.reparam_conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups)
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
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = isinstance(self.act, nn.GELU)
        if self.linear is not None:
            return pointwise_conv(self.linear, x, gelu=gelu)
        if self.channel_repeat > 1:
            x = repeat_channels(x, self.channel_repeat)
        if self.fused and gelu and isinstance(self.se, nn.Identity):
            return conv_gelu(self.reparam_conv, x)
        return self.act(self.se(self.branch_sum(x)))

    def fuse(self) -> None:
        """Re-parameterise; run conv + GELU as one kernel, and a plain 1x1 block as a matmul."""
        self.reparameterize()
        self.fused = True
        conv = self.reparam_conv
        plain_1x1 = conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1)
        if plain_1x1 and isinstance(self.se, nn.Identity):
            self.linear = FusedLinear.from_module(conv)
            del self.reparam_conv
        else:
            self.reparam_conv, self.channel_repeat = as_depthwise(conv)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single conv equal to the sum of the branches."""
        if self.reparam_conv is not None:
            return self.reparam_conv.weight, self.reparam_conv.bias
        k = self.kernel_size
        ref = self.conv_branches[0].conv.weight if len(self.conv_branches) else self.skip_branch.weight
        weight = torch.zeros(self.out_ch, self.in_ch // self.groups, k, k, dtype=ref.dtype, device=ref.device)
        bias = torch.zeros(self.out_ch, dtype=ref.dtype, device=ref.device)
        for branch in self.conv_branches:
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
            self.reparam_conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=in_ch)
            return
        self.reparam_conv = None
        self.large_conv = ConvBN(in_ch, out_ch, kernel_size, stride, groups=in_ch)
        self.small_conv = ConvBN(in_ch, out_ch, small_kernel, stride, groups=in_ch) if small_kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            x = repeat_channels(x, self.channel_repeat)
            if isinstance(self.se, nn.Identity):
                return conv_gelu(self.reparam_conv, x)
            return self.act(self.se(self.reparam_conv(x)))
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
        self.reparam_conv, self.channel_repeat = as_depthwise(self.reparam_conv)


class RepMixer(nn.Module):
    """Depthwise conv token mixer: x + layer_scale * (mixer(x) - norm(x)).

    Training form: ``norm`` (MobileOne with the BN skip only), ``mixer`` (MobileOne with
    conv, scale and skip branches, no activation) and ``layer_scale`` [C,1,1].
    Inference form: one depthwise conv ``reparam_conv`` with the identity folded in.
    """

    def __init__(
        self, dim: int, kernel_size: int = 3, *, layer_scale_init: float = 1e-5, inference_mode: bool = True
    ) -> None:
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
            return
        self.reparam_conv = None
        self.norm = MobileOneBlock(
            dim,
            dim,
            kernel_size,
            groups=dim,
            activation=False,
            scale_branch=False,
            num_conv_branches=0,
            inference_mode=False,
        )
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, activation=False, inference_mode=False)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w_mixer, b_mixer = self.mixer.folded()
        w_norm, b_norm = self.norm.folded()
        scale = self.layer_scale
        identity = identity_kernel(self.dim, self.dim, self.kernel_size, w_mixer)
        weight = identity + scale.unsqueeze(-1) * (w_mixer - w_norm)
        bias = scale.reshape(-1) * (b_mixer - b_norm)
        self.reparam_conv = conv_from(weight, bias, groups=self.dim)
        del self.norm, self.mixer, self.layer_scale


class RepCPE(nn.Module):
    """Conditional positional encoding: x + depthwise k x k conv(x) (identity folded when re-parameterised)."""

    def __init__(self, dim: int, kernel_size: int = 7, *, inference_mode: bool = True) -> None:
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)
        if inference_mode:
            self.reparam_conv = conv
        else:
            self.reparam_conv = None
            self.pos_conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.pos_conv(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        weight = self.pos_conv.weight + identity_kernel(self.dim, self.dim, self.kernel_size, self.pos_conv.weight)
        self.reparam_conv = conv_from(weight, self.pos_conv.bias, groups=self.dim)
        del self.pos_conv


# --------------------------------------------------------------------------------------
# Blocks with an MLP
# --------------------------------------------------------------------------------------


class ConvFFN(nn.Module):
    """Depthwise k x k conv + BN, then 1x1 expand, GELU, 1x1 project.

    The released checkpoints keep the BN separate; ``fuse()`` folds it into the
    depthwise conv (which has no bias, so the BN shift becomes the bias).
    """

    def __init__(self, dim: int, hidden: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = ConvBN(dim, dim, kernel_size, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """ConvFFN(x), or ``residual + ConvFFN(x)`` when ``residual`` is given (fused form only)."""
        if not self.fused:
            if residual is not None:
                raise ValueError("ConvFFN adds a residual only in its fused form")
            return self.fc2(self.act(self.fc1(self.conv(x))))
        hidden = pointwise_conv(self.fc1, self.conv(x), gelu=True)
        return pointwise_conv(self.fc2, hidden, residual=residual)

    @torch.no_grad()
    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        """Fold the BN into the depthwise conv and ``out_scale`` (a layer scale) into ``fc2``;
        run ``fc1``/``fc2`` as matmuls with GELU / the residual add fused in."""
        if self.fused:
            return
        self.fused = True
        weight, bias = self.conv.folded()
        self.conv = conv_from(weight, bias, groups=self.conv.conv.groups)
        self.fc1 = FusedLinear.from_module(self.fc1)
        self.fc2 = FusedLinear.from_module(self.fc2, out_scale)
        del self.act


class RepMixerBlock(nn.Module):
    """x = RepMixer(x); x = x + layer_scale * ConvFFN(x)."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        *,
        kernel_size: int = 3,
        layer_scale_init: float = 1e-5,
        inference_mode: bool = True,
    ) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init=layer_scale_init, inference_mode=inference_mode)
        self.mlp = ConvFFN(dim, round(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        if self.layer_scale is None:  # fused: the layer scale lives in mlp.fc2
            return self.mlp(x, residual=x)
        return x + self.layer_scale * self.mlp(x)

    def fuse(self) -> None:
        self.token_mixer.reparameterize()
        self.mlp.fuse(self.layer_scale)
        self.layer_scale = None


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of an NCHW map (qkv without bias).

    The inference form mirrors the reference (explicit softmax of a scaled q k^T); the
    fused form calls ``F.scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """MHSA(x), or ``residual + MHSA(x)`` when ``residual`` is given (fused form only)."""
        b, c, h, w = x.shape
        n = h * w
        tokens = x.permute(0, 2, 3, 1).reshape(b, n, c)  # a free view when x is channels-last
        qkv = self.qkv(tokens).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not self.fused:
            if residual is not None:
                raise ValueError("MultiHeadSelfAttention adds a residual only in its fused form")
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))
            return out.transpose(1, 2).reshape(b, c, h, w)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        skip = residual.permute(0, 2, 3, 1).reshape(b, n, c) if residual is not None else None
        return self.proj(out, residual=skip).reshape(b, h, w, c).permute(0, 3, 1, 2)

    @torch.no_grad()
    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        """Switch to SDPA, fold ``out_scale`` (a layer scale) into the output projection and
        fuse the residual add into it."""
        if self.fused:
            return
        self.fused = True
        self.qkv = FusedLinear.from_module(self.qkv)
        self.proj = FusedLinear.from_module(self.proj, out_scale)


class AttentionBlock(nn.Module):
    """x = x + ls1 * MHSA(LayerNormChannel(x)); x = x + ls2 * ConvFFN(x)."""

    def __init__(self, dim: int, mlp_ratio: float, *, head_dim: int = 32, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.norm = LayerNormChannel(dim)
        self.token_mixer = MultiHeadSelfAttention(dim, head_dim)
        self.mlp = ConvFFN(dim, round(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_scale_1 is None:  # fused: the layer scales live in the projections
            x = self.token_mixer(self.norm(x), residual=x)
            return self.mlp(x, residual=x)
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.mlp(x)

    def fuse(self) -> None:
        self.norm.fused = True
        self.token_mixer.fuse(self.layer_scale_1)
        self.mlp.fuse(self.layer_scale_2)
        self.layer_scale_1 = None
        self.layer_scale_2 = None


class PatchEmbed(nn.Module):
    """Stride-2 downsampling between stages: large-kernel depthwise conv, then 1x1 MobileOne."""

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
            in_ch, out_ch, kernel_size, 2, small_kernel, use_se=use_se, inference_mode=inference_mode
        )
        self.pointwise = MobileOneBlock(out_ch, out_ch, 1, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.spatial(x))
