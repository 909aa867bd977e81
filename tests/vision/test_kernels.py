"""Fused epilogues and our depthwise convs: same results as plain ops, safe to copy, pickle and re-cast."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvlm import native
from fastvlm.vision import kernels
from fastvlm.vision.kernels import (
    MLP_CHUNK_MIN_TOKENS,
    MLP_CHUNK_TOKENS,
    FusedLinear,
    as_depthwise,
    conv_gelu,
    fused_conv,
    onednn_fusion_available,
    pointwise_conv,
    pointwise_mlp,
)
from tests.conftest import assert_close_to_reference


def test_onednn_fusion_is_available_on_this_cpu_build():
    # CI runs the CPU wheel of torch, which ships oneDNN; the fused path must really run there.
    assert onednn_fusion_available()


def test_fused_linear_gelu_and_residual_match_plain_ops():
    lin = nn.Linear(32, 48)
    fused = FusedLinear.from_module(lin)
    x = torch.randn(2, 5, 7, 32)
    res = torch.randn(2, 5, 7, 48)
    with torch.inference_mode():
        assert_close_to_reference(fused(x), lin(x))
        assert_close_to_reference(fused(x, gelu=True), F.gelu(lin(x)))
        assert_close_to_reference(fused(x, residual=res), lin(x) + res)
    with torch.enable_grad():  # grad mode takes the plain-PyTorch path: same numbers
        assert_close_to_reference(fused(x, gelu=True).detach(), F.gelu(lin(x)).detach())


def test_pointwise_conv_equals_a_1x1_conv_on_any_memory_format():
    conv = nn.Conv2d(16, 24, 1)
    fused = FusedLinear.from_module(conv)
    x = torch.randn(2, 16, 6, 5)
    res = torch.randn(2, 24, 6, 5)
    with torch.inference_mode():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = pointwise_conv(fused, inp, residual=res)
            assert out.shape == (2, 24, 6, 5)
            assert_close_to_reference(out, conv(x) + res)


def test_pointwise_mlp_in_token_chunks_equals_the_plain_mlp():
    # 2 x 48 x 48 = 4608 tokens: over the chunking threshold, with a last chunk shorter than the rest
    tokens = 2 * 48 * 48
    assert tokens > MLP_CHUNK_MIN_TOKENS and tokens % MLP_CHUNK_TOKENS
    fc1, fc2 = nn.Conv2d(12, 48, 1), nn.Conv2d(48, 12, 1)
    fused1, fused2 = FusedLinear.from_module(fc1), FusedLinear.from_module(fc2)
    x, res = torch.randn(2, 12, 48, 48), torch.randn(2, 12, 48, 48)
    small = x[:, :, :8, :8]  # under the threshold: one call per layer
    with torch.inference_mode():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = pointwise_mlp(fused1, fused2, inp, residual=res)
            assert out.shape == (2, 12, 48, 48)
            assert_close_to_reference(out, fc2(F.gelu(fc1(x))) + res)
            assert_close_to_reference(pointwise_mlp(fused1, fused2, inp), fc2(F.gelu(fc1(x))))
        assert_close_to_reference(pointwise_mlp(fused1, fused2, small), fc2(F.gelu(fc1(small))))


def test_conv_gelu_equals_conv_then_gelu():
    conv = nn.Conv2d(8, 16, 7, 2, 3, groups=8)
    x = torch.randn(1, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert_close_to_reference(conv_gelu(conv, x), F.gelu(conv(x)))


@pytest.fixture
def depthwise_calls(monkeypatch):
    """Counts the calls that reach our depthwise op (tests/test_native.py checks that it builds where it should)."""
    op = native.depthwise_conv_kernel()
    if op is None:
        pytest.skip("our depthwise kernel is not built here")
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return op(*args)

    monkeypatch.setattr(native, "depthwise_conv_kernel", lambda: counted)
    return calls


@pytest.mark.parametrize(("in_ch", "out_ch", "kernel", "stride"), [(24, 24, 3, 1), (24, 24, 7, 1), (12, 24, 7, 2)])
def test_fused_conv_runs_our_depthwise_kernel_and_equals_torch(
    depthwise_calls, monkeypatch, in_ch, out_ch, kernel, stride
):
    torch.manual_seed(kernel)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=in_ch)  # a multiplier of 2 in the last case
    depthwise, repeat = as_depthwise(conv)
    x = torch.randn(2, in_ch, 15, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for gelu in (False, True):
            expected = F.gelu(conv(x)) if gelu else conv(x)
            ours = fused_conv(depthwise, x, repeat=repeat, gelu=gelu)
            assert ours.is_contiguous(memory_format=torch.channels_last)
            assert_close_to_reference(ours, expected)
    calls = 1 if repeat == 1 and onednn_fusion_available() else 2  # then oneDNN's conv applies the GELU
    assert len(depthwise_calls) == calls
    monkeypatch.setattr(kernels, "NATIVE_DEPTHWISE", False)
    with torch.no_grad():
        assert_close_to_reference(fused_conv(depthwise, x, repeat=repeat, gelu=True), F.gelu(conv(x)))
    assert len(depthwise_calls) == calls


def test_fused_conv_leaves_hooked_convs_and_empty_maps_to_torch(depthwise_calls):
    conv = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    seen = []
    conv.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        x = torch.randn(1, 8, 6, 6)
        assert_close_to_reference(fused_conv(conv, x), F.conv2d(x, conv.weight, conv.bias, 1, 1, 1, 8))
        with pytest.raises(RuntimeError):  # torch's own error for a map smaller than the kernel
            fused_conv(nn.Conv2d(8, 8, 3, 2, 1, groups=8), torch.randn(1, 8, 0, 5))
    assert seen == [torch.Size([1, 8, 6, 6])] and depthwise_calls == []


def test_fused_conv_leaves_other_convs_dtypes_and_autograd_to_torch(depthwise_calls):
    dense = nn.Conv2d(3, 8, 3, 2, 1)  # the stem's first conv: not depthwise
    depthwise = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    dilated = nn.Conv2d(8, 8, 3, 1, 2, dilation=2, groups=8)
    x3, x8 = torch.randn(1, 3, 8, 8), torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert_close_to_reference(fused_conv(dense, x3, gelu=True), F.gelu(dense(x3)))
        assert_close_to_reference(fused_conv(dilated, x8), dilated(x8))
        half = depthwise.to(torch.bfloat16)
        assert_close_to_reference(fused_conv(half, x8.bfloat16()).float(), half(x8.bfloat16()).float())
        depthwise.float()
    leaf = x8.clone().requires_grad_()
    fused_conv(depthwise, leaf).sum().backward()  # our op has no backward: autograd must take torch's
    expected = torch.autograd.grad(depthwise(x8.clone().requires_grad_()).sum(), depthwise.weight)[0]
    assert leaf.grad is not None and depthwise.weight.grad is not None
    assert_close_to_reference(depthwise.weight.grad, expected)
    assert depthwise_calls == []


def test_packed_weight_is_rebuilt_when_the_weight_changes_and_never_copied():
    fused = FusedLinear.from_module(nn.Linear(8, 8))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        first = fused(x)
    assert fused._packed is not None
    clone = copy.deepcopy(fused)  # an opaque oneDNN tensor cannot be deep-copied: it must be dropped
    assert clone._packed is None
    torch.save(fused, io.BytesIO())  # saving a used module must not trip over the opaque tensor
    assert pickle.loads(pickle.dumps(fused))._packed is None
    with torch.no_grad():
        fused.weight.mul_(2)
    with torch.inference_mode():
        second = fused(x)
    assert_close_to_reference(second - fused.bias, 2 * (first - fused.bias))
    fused.to(torch.bfloat16)
    with torch.inference_mode():
        assert fused(x.bfloat16()).dtype == torch.bfloat16


def test_state_dict_of_fused_linear_is_plain_tensors():
    fused = FusedLinear.from_module(nn.Conv2d(4, 6, 1))
    with torch.inference_mode():
        fused(torch.randn(2, 4))
    sd = fused.state_dict()
    assert set(sd) == {"weight", "bias"} and sd["weight"].shape == (6, 4) and not sd["weight"].is_mkldnn
