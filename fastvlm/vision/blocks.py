"""FastViT token mixers and stage blocks: RepMixer, RepCPE, ConvFFN, self-attention.

A stage is a sequence of :class:`RepMixerBlock` (convolutional token mixing) or
:class:`AttentionBlock` (multi-head self-attention); both end in a :class:`ConvFFN`.
Each block owns its ``reparameterize()`` and ``fuse()``; see :mod:`fastvlm.vision.reparam`
for the three forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvlm.vision.kernels import FusedLinear, fused_conv, pointwise_mlp
from fastvlm.vision.mobileone import MobileOneBlock
from fastvlm.vision.reparam import ConvBN, conv_from, identity_kernel


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
        self.fused = False  # set by fuse(): the conv runs fused_conv
        if inference_mode:
            self.reparam_conv: nn.Conv2d | None = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
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
            return fused_conv(self.reparam_conv, x) if self.fused else self.reparam_conv(x)
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

    def fuse(self) -> None:
        """Re-parameterise; run the conv as :func:`~fastvlm.vision.kernels.fused_conv`."""
        self.reparameterize()
        self.fused = True


class RepCPE(nn.Module):
    """Conditional positional encoding: x + depthwise k x k conv(x) (identity folded when re-parameterised)."""

    def __init__(self, dim: int, kernel_size: int = 7, *, inference_mode: bool = True) -> None:
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)
        self.fused = False  # set by fuse(): the conv runs fused_conv
        self.reparam_conv: nn.Conv2d | None
        if inference_mode:
            self.reparam_conv = conv
        else:
            self.reparam_conv = None
            self.pos_conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return fused_conv(self.reparam_conv, x) if self.fused else self.reparam_conv(x)
        return x + self.pos_conv(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        weight = self.pos_conv.weight + identity_kernel(self.dim, self.dim, self.kernel_size, self.pos_conv.weight)
        assert self.pos_conv.bias is not None
        self.reparam_conv = conv_from(weight, self.pos_conv.bias, groups=self.dim)
        del self.pos_conv

    def fuse(self) -> None:
        """Re-parameterise; run the conv as :func:`~fastvlm.vision.kernels.fused_conv`."""
        self.reparameterize()
        self.fused = True


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
        # training and inference forms; fuse() makes conv a Conv2d and fc1/fc2 FusedLinear
        self.conv: ConvBN | nn.Conv2d = ConvBN(dim, dim, kernel_size, groups=dim)
        self.fc1: nn.Conv2d | FusedLinear = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2: nn.Conv2d | FusedLinear = nn.Conv2d(hidden, dim, 1)

        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """ConvFFN(x), or ``residual + ConvFFN(x)`` when ``residual`` is given (fused form only)."""
        if not self.fused:
            if residual is not None:
                raise ValueError("ConvFFN adds a residual only in its fused form")
            return self.fc2(self.act(self.fc1(self.conv(x))))
        assert isinstance(self.fc1, FusedLinear) and isinstance(self.fc2, FusedLinear)  # set by fuse()
        assert isinstance(self.conv, nn.Conv2d)  # set by fuse()
        return pointwise_mlp(self.fc1, self.fc2, fused_conv(self.conv, x), residual=residual)

    @torch.no_grad()
    def fuse(self, out_scale: torch.Tensor | None = None) -> None:
        """Fold the BN into the depthwise conv and ``out_scale`` (a layer scale) into ``fc2``;
        run ``fc1``/``fc2`` as matmuls with GELU / the residual add fused in."""
        if self.fused:
            return
        self.fused = True
        assert isinstance(self.conv, ConvBN)  # not fused yet
        weight, bias = self.conv.folded()
        self.conv = conv_from(weight, bias, groups=self.conv.conv.groups)
        assert isinstance(self.fc1, nn.Conv2d) and isinstance(self.fc2, nn.Conv2d)  # not fused yet
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
        self.layer_scale: nn.Parameter | None = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        if self.layer_scale is None:  # fused: the layer scale lives in mlp.fc2
            return self.mlp(x, residual=x)
        return x + self.layer_scale * self.mlp(x)

    def fuse(self) -> None:
        self.token_mixer.fuse()
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
        self.qkv: nn.Linear | FusedLinear = nn.Linear(dim, dim * 3, bias=False)
        self.proj: nn.Linear | FusedLinear = nn.Linear(dim, dim)
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
        assert isinstance(self.qkv, nn.Linear) and isinstance(self.proj, nn.Linear)  # not fused yet
        self.qkv = FusedLinear.from_module(self.qkv)
        self.proj = FusedLinear.from_module(self.proj, out_scale)


class AttentionBlock(nn.Module):
    """x = x + ls1 * MHSA(LayerNormChannel(x)); x = x + ls2 * ConvFFN(x)."""

    def __init__(self, dim: int, mlp_ratio: float, *, head_dim: int = 32, layer_scale_init: float = 1e-5) -> None:
        super().__init__()
        self.norm = LayerNormChannel(dim)
        self.token_mixer = MultiHeadSelfAttention(dim, head_dim)
        self.mlp = ConvFFN(dim, round(dim * mlp_ratio))
        self.layer_scale_1: nn.Parameter | None = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))
        self.layer_scale_2: nn.Parameter | None = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

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
