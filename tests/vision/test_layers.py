"""Each re-parameterisable block computes the same function before and after folding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastvlm.bench.encoder import randomize_statistics
from fastvlm.vision import FastViTConfig, FastViTHD
from fastvlm.vision.blocks import AttentionBlock, RepCPE, RepMixer, RepMixerBlock
from fastvlm.vision.mobileone import LargeKernelConv, MobileOneBlock
from tests.conftest import assert_close_to_reference


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, BN statistics and layer scales far from their defaults, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    return module.eval()


def check_reparameterize(module: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        before = module(x)
        module.reparameterize()
        after = module(x)
    assert module.reparam_conv is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    assert_close_to_reference(after, before)


@pytest.mark.parametrize(
    "in_ch,out_ch,kernel,stride,groups,scale",
    [
        (8, 8, 3, 1, 1, True),  # conv + scale + skip branches
        (8, 8, 3, 2, 8, False),  # depthwise, stride 2, no scale (stem-like)
        (8, 8, 1, 1, 1, True),  # 1x1 with skip (stem / PatchEmbed pointwise)
        (3, 8, 3, 2, 1, False),  # first stem conv
        (8, 16, 3, 1, 8, True),  # conv_exp: grouped, widening, no skip
    ],
)
def test_mobileone_reparameterize(in_ch, out_ch, kernel, stride, groups, scale):
    block = randomize(MobileOneBlock(in_ch, out_ch, kernel, stride, groups, scale_branch=scale, inference_mode=False))
    check_reparameterize(block, torch.randn(2, in_ch, 12, 12))


def test_mobileone_with_se_reparameterize():
    block = randomize(MobileOneBlock(16, 32, 3, 1, 16, use_se=True, inference_mode=False))
    check_reparameterize(block, torch.randn(2, 16, 8, 8))


def test_mobileone_with_several_conv_branches_reparameterize():
    block = randomize(MobileOneBlock(8, 8, 3, 1, 1, num_conv_branches=3, inference_mode=False))
    check_reparameterize(block, torch.randn(1, 8, 10, 10))


def test_large_kernel_conv_reparameterize():
    block = randomize(LargeKernelConv(8, 16, 7, 2, 3, inference_mode=False))
    check_reparameterize(block, torch.randn(2, 8, 16, 16))


def test_repmixer_reparameterize():
    block = randomize(RepMixer(8, 3, inference_mode=False))
    check_reparameterize(block, torch.randn(2, 8, 10, 10))


def test_repcpe_reparameterize():
    block = randomize(RepCPE(8, 7, inference_mode=False))
    check_reparameterize(block, torch.randn(2, 8, 9, 9))


def test_reparameterize_is_idempotent():
    block = randomize(RepMixer(8, 3, inference_mode=False))
    block.reparameterize()
    weight = block.reparam_conv.weight.clone()
    block.reparameterize()
    assert torch.equal(block.reparam_conv.weight, weight)


@pytest.mark.parametrize("block_cls", [RepMixerBlock, AttentionBlock])
def test_block_fuse_folds_batchnorm_and_layer_scales(block_cls):
    block = randomize(block_cls(64, 4.0))
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        before = block(x)
        block.fuse()
        after = block(x.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert not [n for n, _ in block.named_parameters() if "layer_scale" in n]
    assert_close_to_reference(after, before)


def _random_tower(config: FastViTConfig | None = None, seed: int = 0) -> FastViTHD:
    return randomize(FastViTHD(config), seed)


def test_full_size_training_form_reparameterize_and_fuse():
    """Full FastViTHD, training form -> inference form -> fused form: one function."""
    torch.manual_seed(0)
    tower = FastViTHD(FastViTConfig(inference_mode=False)).eval()
    randomize_statistics(tower, seed=1, layer_scale_max=0.1)
    x = torch.rand(1, 3, 128, 192)  # non-square, multiples of 64
    with torch.no_grad():
        train_out = tower(x)
        tower.reparameterize()
        assert tower.config.inference_mode
        inference_out = tower(x)
        tower.fuse()
        fused_out = tower(x)
    assert train_out.shape == (1, 3072, 2, 3)
    assert_close_to_reference(inference_out, train_out)
    assert_close_to_reference(fused_out, inference_out)


def test_fuse_is_idempotent_and_freezes_weights():
    tower = _random_tower(FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128)))
    x = torch.rand(1, 3, 64, 64)
    tower.fuse()
    with torch.no_grad():
        first = tower(x)
    tower.fuse()
    with torch.no_grad():
        assert torch.equal(tower(x), first)
    assert not any(p.requires_grad for p in tower.parameters())


def test_fuse_to_bfloat16_keeps_float32_interface():
    config = FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(16, 32, 64, 128, 256))
    tower = FastViTHD(config).eval()  # default init keeps activations at a scale bf16 represents well
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        ref = tower(x)
        out = copy.deepcopy(tower).fuse(dtype=torch.bfloat16)(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # bf16 has an 8-bit mantissa: agreement to a few percent of the output scale
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("shape", [(1, 3, 100, 128), (1, 3, 64, 96), (3, 64, 64), (1, 1, 64, 64)])
def test_bad_input_shapes_are_rejected_with_the_reason(shape):
    tower = FastViTHD(FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128)))
    with pytest.raises(ValueError, match="multiple of the tower stride 64|expected pixel_values"):
        tower(torch.rand(shape))


def test_any_multiple_of_stride_works_and_token_count():
    tower = FastViTHD(FastViTConfig(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128))).eval()
    with torch.no_grad():
        tokens = tower.image_embeddings(torch.rand(2, 3, 192, 128))
    assert tokens.shape == (2, 6, 256)
    for side, n in [(256, 16), (512, 64), (768, 144), (1024, 256)]:
        assert tower.config.num_tokens(side) == n


def test_config_validation_messages():
    with pytest.raises(ValueError, match="widths has 2 entries"):
        FastViTConfig(depths=(1, 1, 1), widths=(8, 16))
    with pytest.raises(ValueError, match="unknown token mixer"):
        FastViTConfig(token_mixers=("repmixer", "repmixer", "repmixer", "attention", "conv"))
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        FastViTConfig(widths=(96, 192, 384, 770, 1536))
    config = FastViTConfig()
    assert FastViTConfig.from_dict(config.to_dict()) == config
