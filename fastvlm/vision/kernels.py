"""Fused kernels for the fused tower: conv/matmul with GELU or a residual add in the epilogue.

Most of FastViTHD's compute is 1x1 convolutions (the ConvFFN expand/project pairs).
On a channels-last tensor a 1x1 conv is a matmul over the NHWC view, so the fused
tower runs them as :class:`FusedLinear`. On CPU, PyTorch's oneDNN backend then
(a) applies the GELU or adds the residual inside the matmul's output loop, saving a
full pass over the tower's largest activations, and (b) uses weights re-laid-out once
for its kernels instead of on every call, which matters most for the deep stages whose
maps are small (4x4 at 256 px) and whose weights are large. These are the same oneDNN
ops that ``torch.compile`` (inductor) emits for such patterns; calling them directly
means the fused tower needs no compilation step.

The depthwise convolutions (RepMixer, ConvFFN, RepCPE, the downsampling ones with a channel
multiplier of 2) run our own kernel (``fastvlm/csrc/depthwise_conv.cpp``, through
:func:`fused_conv`) where it is built: oneDNN's reaches about half our rate on the 7x7 ones
and needs the input copied with its channels repeated for a multiplier of 2.

Everywhere else (GPU, other dtypes, autograd, a torch build without oneDNN) the plain
PyTorch ops run. Both paths compute the same function up to float rounding.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fastvlm import native

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def onednn_fusion_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this torch build and CPU run oneDNN's fused epilogues in ``dtype`` correctly.

    Checked once per dtype on tiny inputs (bf16 needs CPU support, e.g. AVX512).
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.randn(1, 2, 3, 8, dtype=dtype)
        w, b = torch.randn(4, 8, dtype=dtype), torch.randn(4, dtype=dtype)
        res = torch.randn(1, 2, 3, 4, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 6)
        gelu = torch.ops.mkldnn._linear_pointwise(x, packed, b, "gelu", [], "none")
        added = torch.ops.mkldnn._linear_pointwise.binary(x, res, packed, b, "add")
        conv = torch.ops.mkldnn._convolution_pointwise(
            x.permute(0, 3, 1, 2), w[:, :, None, None], b, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none"
        )
        ref = F.linear(x.float(), w.float(), b.float())
        tol = 1e-5 if dtype == torch.float32 else 0.1
        return bool(
            torch.allclose(gelu.float(), F.gelu(ref), atol=tol)
            and torch.allclose(added.float(), ref + res.float(), atol=tol)
            and torch.allclose(conv.permute(0, 2, 3, 1).float(), F.gelu(ref), atol=tol)
        )
    except (AttributeError, RuntimeError):
        return False


def _use_onednn(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in _ONEDNN_DTYPES
        and not torch.is_grad_enabled()
        and onednn_fusion_available(x.dtype)
    )


def conv_gelu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """GELU(conv(x)) with exact (erf) GELU, in one oneDNN kernel where possible."""
    if _use_onednn(x):
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "gelu", [], "none"
        )
    return F.gelu(conv(x))


# False sends every depthwise conv of fused_conv to torch's (to measure one path against the other).
NATIVE_DEPTHWISE = True
NATIVE_DEPTHWISE_KERNELS = (3, 5, 7)  # kernel sides compiled into csrc/depthwise_conv.cpp
NATIVE_DEPTHWISE_REPEATS = (1, 2)  # channel multipliers it reads in place


def _native_depthwise(conv: nn.Conv2d, x: torch.Tensor, repeat: int, gelu: bool) -> Any | None:
    """Our depthwise op where it computes ``conv(repeat_channels(x, repeat))`` (then GELU), else None.

    A GELU is left to oneDNN's conv unless there are channels to repeat: ours applies it in a
    second pass over each output row, oneDNN inside the conv (the stem's 3x3 at 1024 px: 6.8
    against 5.7 ms), and only the repeat copy it saves pays for that.
    """
    k = conv.kernel_size[0]
    fits = (
        NATIVE_DEPTHWISE
        and (repeat > 1 or not gelu or not _use_onednn(x))
        and conv.groups == conv.out_channels == conv.in_channels
        and conv.kernel_size == (k, k)
        and k in NATIVE_DEPTHWISE_KERNELS
        and conv.padding == (k // 2, k // 2)
        and conv.stride in ((1, 1), (2, 2))
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and repeat in NATIVE_DEPTHWISE_REPEATS
        and x.dim() == 4
        and x.shape[1] * repeat == conv.out_channels
        and x.dtype == conv.weight.dtype == torch.float32
        and (conv.bias is None or conv.bias.dtype == torch.float32)
        and x.numel() > 0
        and not (conv._forward_hooks or conv._forward_pre_hooks)  # our op would skip them
        and native.eager_on_cpu(x)
        and not native.autograd_records(x, conv.weight, conv.bias)
    )
    return native.depthwise_conv_kernel() if fits else None


def fused_conv(conv: nn.Conv2d, x: torch.Tensor, *, repeat: int = 1, gelu: bool = False) -> torch.Tensor:
    """``conv`` (then exact GELU) on ``x`` with each channel repeated ``repeat`` times.

    A depthwise ``conv`` (see :func:`as_depthwise`) runs our kernel where it can, which reads the
    repeated channels in place; anything else repeats them (:func:`repeat_channels`) and runs
    torch's conv, with the GELU fused by oneDNN where possible (:func:`conv_gelu`). Our kernel's
    result is channels-last; torch's follows ``x`` (channels-last throughout the fused tower).
    """
    kernel = _native_depthwise(conv, x, repeat, gelu)
    if kernel is not None:
        return kernel(x, conv.weight, conv.bias, conv.stride[0], gelu)
    x = repeat_channels(x, repeat)
    return conv_gelu(conv, x) if gelu else conv(x)


def repeat_channels(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*repeats, H, W] with channel c copied to c*repeats ... c*repeats+repeats-1.

    Turns a grouped conv with one input and ``repeats`` outputs per group into a plain
    depthwise conv (one in, one out per group) with the same weights, for which oneDNN
    has fast kernels (its kernels for the former are 2-20x slower here). The result is
    channels-last.
    """
    if repeats == 1:
        return x
    b, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1).unsqueeze(-1).expand(b, h, w, c, repeats)
    return nhwc.reshape(b, h, w, c * repeats).permute(0, 3, 1, 2)


def as_depthwise(conv: nn.Conv2d) -> tuple[nn.Conv2d, int]:
    """For a conv with one input channel per group and a channel multiplier m > 1, the
    equivalent depthwise conv on the input repeated m times (see :func:`repeat_channels`)
    and m; any other conv comes back unchanged with m = 1."""
    multiplier = conv.out_channels // conv.in_channels
    if conv.groups != conv.in_channels or multiplier <= 1:
        return conv, 1
    depthwise = nn.Conv2d(
        conv.out_channels,
        conv.out_channels,
        cast("tuple[int, int]", conv.kernel_size),
        cast("tuple[int, int]", conv.stride),
        cast("tuple[int, int]", conv.padding),
        groups=conv.out_channels,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    depthwise.weight = conv.weight  # [out, 1, k, k] in both readings
    depthwise.bias = conv.bias
    return depthwise, multiplier


class FusedLinear(nn.Module):
    """y = x W^T + b over the last axis, optionally followed by GELU or plus a residual.

    The oneDNN copy of the weight is made on first use and remade when the weight tensor
    is replaced, moved or cast, or changed in place through autograd-visible ops (its
    version counter); a write through ``.data`` bypasses that counter, so call
    ``reset_cache()`` after one. The copy is never saved or copied with the module.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._packed: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_module(cls, module: nn.Conv2d | nn.Linear, out_scale: torch.Tensor | None = None) -> FusedLinear:
        """From a 1x1 Conv2d (groups 1) or a Linear, optionally with each output scaled by ``out_scale``.

        The module's own tensors are left untouched (they may be shared with a state dict).
        """
        if isinstance(module, nn.Conv2d) and (
            module.kernel_size != (1, 1) or module.groups != 1 or module.stride != (1, 1)
        ):
            raise ValueError(f"only a 1x1, stride-1, ungrouped conv is a linear map; got {module}")
        weight, bias = module.weight.flatten(1), module.bias
        if out_scale is not None:
            scale = out_scale.reshape(-1)
            weight = weight * scale.unsqueeze(1)
            bias = bias * scale if bias is not None else None
        return cls(weight, bias)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_packed": None}  # the oneDNN copy is opaque: rebuild it on use

    def reset_cache(self) -> None:
        self._packed = None

    def _packed_weight(self, tokens: int) -> torch.Tensor:
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # an inference tensor (made under inference_mode) has no version counter
            version = -1
        key = (w.data_ptr(), version, w.dtype, w.device)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w, tokens))
        return self._packed[1]

    def forward(self, x: torch.Tensor, *, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        if gelu and residual is not None:
            raise ValueError("FusedLinear applies GELU or adds a residual, not both")
        if _use_onednn(x) and (residual is None or residual.dtype == x.dtype):
            x = x.contiguous()
            weight = self._packed_weight(x.numel() // x.shape[-1])
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, self.bias, "add")
            return torch.ops.mkldnn._linear_pointwise(
                x, weight, self.bias, "gelu" if gelu else "none", [], "none" if gelu else ""
            )
        y = F.linear(x, self.weight, self.bias)
        if gelu:
            return F.gelu(y)
        return y if residual is None else y + residual


def pointwise_conv(
    linear: FusedLinear, x: torch.Tensor, *, gelu: bool = False, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """A 1x1 conv on an NCHW tensor as a matmul over its NHWC view (free when x is channels-last).

    The result is NCHW-shaped and channels-last in memory.
    """
    res = residual.permute(0, 2, 3, 1) if residual is not None else None
    return linear(x.permute(0, 2, 3, 1), gelu=gelu, residual=res).permute(0, 3, 1, 2)


# Token-chunking of the fused MLP (see pointwise_mlp): maps with more tokens than
# MLP_CHUNK_MIN_TOKENS run in chunks of MLP_CHUNK_TOKENS. Measured on 2-core Xeon and EPYC
# machines: the 128x128 and 256x256 maps of a 1024-px FastViTHD (widths 192 and 96) gain
# 20-40% per MLP, 10% over the whole tower; maps of 4096 tokens or fewer gain nothing.
MLP_CHUNK_TOKENS = 2048
MLP_CHUNK_MIN_TOKENS = 4096


def pointwise_mlp(
    fc1: FusedLinear, fc2: FusedLinear, x: torch.Tensor, *, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``fc2(GELU(fc1(x)))`` (plus ``residual``) over the channels of an NCHW-shaped tensor.

    The hidden activations are the tower's largest tensors (4x the width). On large maps
    they are computed a chunk of tokens at a time, so each chunk's hidden block is still in
    cache when ``fc2`` reads it instead of making a round trip through memory. The result
    is NCHW-shaped and channels-last in memory, as :func:`pointwise_conv` returns.
    """
    nhwc = x.permute(0, 2, 3, 1)
    b, h, w, c = nhwc.shape
    tokens = b * h * w
    if tokens <= MLP_CHUNK_MIN_TOKENS or not _use_onednn(nhwc):
        return pointwise_conv(fc2, pointwise_conv(fc1, x, gelu=True), residual=residual)
    flat = nhwc.reshape(tokens, c)
    flat_residual = residual.permute(0, 2, 3, 1).reshape(tokens, c) if residual is not None else None
    out = torch.empty((tokens, fc2.weight.shape[0]), dtype=x.dtype, device=x.device)
    for start in range(0, tokens, MLP_CHUNK_TOKENS):
        chunk = slice(start, start + MLP_CHUNK_TOKENS)
        res = flat_residual[chunk] if flat_residual is not None else None
        out[chunk] = fc2(fc1(flat[chunk], gelu=True), residual=res)
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)
