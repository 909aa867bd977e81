"""Our compiled CPU kernels (``fastvlm/csrc``, loaded by :mod:`fastvlm.native`): int8 and bf16/fp16 GEMV,
the vision tower's depthwise convolutions, and a decode step's attention.

They must build on the machines the project runs on (x86-64 Linux with gcc), give the product
with the (dequantized) weight to fp32 rounding on each of their instruction sets, name their
bad inputs, and leave the layers working on ATen's kernels when they cannot be built or are
turned off.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastvlm import native
from fastvlm.errors import ConfigError
from fastvlm.linears import Int8WeightOnlyLinear, pack_rows, quantize_rows_int8, unpack_rows
from fastvlm.model import FastVLM
from fastvlm.quantization import decoder_linears, quantization_kernel, quantize_decoder
from tests.conftest import fixture_path

X86_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not X86_LINUX, reason="the kernel is written for x86-64 Linux")


def _isas() -> list[str]:
    order = ["vnni", "avx512", "avx2"]  # each CPU runs every set below its best
    best = native.int8_kernel_isa()
    return order[order.index(best) :] if best else []


def _op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, isa: str = "auto") -> torch.Tensor:
    return torch.ops.fastvlm_native.int8_packed_mm(x, packed, scales, isa)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=os.environ | env, timeout=300
    )


def test_the_kernel_builds_and_runs_here() -> None:
    assert native.int8_kernel() is not None, "the int8 kernel did not build (see the RuntimeWarning)"
    assert native.int8_kernel_isa() in ("vnni", "avx512", "avx2")


@pytest.mark.parametrize("isa", ["vnni", "avx512", "avx2"])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (7, 64), (8, 32), (99, 64), (256, 896)])
def test_kernel_matches_the_dequantized_weight(isa: str, n: int, k: int) -> None:
    if isa not in _isas():
        pytest.skip(f"this CPU has no {isa}")
    torch.manual_seed(n + k)
    q, scales = quantize_rows_int8(torch.randn(n, k))
    packed, weight = pack_rows(q), q.float() * scales.float()[:, None]
    for rows in (1, 2, 3, 4, 5, 16):
        x = torch.randn(rows, k)
        got, want = _op(x, packed, scales.float(), isa), F.linear(x, weight)
        assert got.shape == (rows, n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _needs_vnni() -> None:
    if "vnni" not in _isas():
        pytest.skip("this CPU has no AVX-512 VNNI")


def test_vnni_products_are_within_the_activation_rounding_of_float64() -> None:
    """Integer products, so the error is the activation's rounding to 28 bits of its row's largest value."""
    _needs_vnni()
    torch.manual_seed(0)
    q, scales = quantize_rows_int8(torch.randn(300, 896) * 0.02)
    packed, s = pack_rows(q), scales.float()
    x = torch.randn(5, 896)
    x[1, 7] = 60.0  # one outlier sets row 1's step
    x[3] = 0.0
    exact = x.double() @ (q.double() * s.double()[:, None]).T
    step = x.abs().amax(dim=1, keepdim=True).double() / (2**27 - 1)
    bound = 0.5 * step * (q.double().abs().sum(dim=1) * s.double())[None] + 2**-24 * exact.abs() + 1e-30
    for isa in ("vnni", "avx512"):
        got = _op(x, packed, s, isa).double()
        assert (got - exact).abs().le(bound if isa == "vnni" else 64 * bound).all(), isa
    assert torch.equal(_op(x, packed, s, "vnni")[3], torch.zeros(300))  # an all-zero row is exactly zero


def test_vnni_holds_its_widest_row_exactly_and_hands_wider_ones_to_the_fp32_path() -> None:
    _needs_vnni()
    widest = 2**17  # every digit sum of a row of this width still fits int32
    packed = pack_rows(torch.full((8, widest), 127, dtype=torch.int8))
    got = _op(torch.ones(1, widest), packed, torch.ones(8), "vnni")
    assert torch.equal(got, torch.full((1, 8), 127.0 * widest))
    wider = widest + 16
    packed = pack_rows(torch.randint(-127, 128, (8, wider), dtype=torch.int8))
    x = torch.randn(1, wider)
    assert torch.equal(_op(x, packed, torch.ones(8), "vnni"), _op(x, packed, torch.ones(8), "avx512"))


def test_vnni_rows_with_inf_or_nan_propagate_them_like_the_fp32_path() -> None:
    _needs_vnni()
    q, scales = quantize_rows_int8(torch.randn(24, 64))
    packed, s = pack_rows(q), scales.float()
    x = torch.randn(4, 64)
    x[1, 3], x[2, 5] = float("inf"), float("nan")
    got, fp32 = _op(x, packed, s, "vnni"), _op(x, packed, s, "avx512")
    assert torch.equal(got[1:3].isnan(), fp32[1:3].isnan()) and torch.equal(got[1:3].isinf(), fp32[1:3].isinf())
    assert got[2].isnan().all() and got[[0, 3]].isfinite().all()
    torch.testing.assert_close(got[[0, 3]], fp32[[0, 3]], rtol=1e-5, atol=1e-5)


def _float16_op(x: torch.Tensor, weight: torch.Tensor, isa: str = "auto") -> torch.Tensor:
    return torch.ops.fastvlm_native.float16_mm(x, weight, isa)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (7, 64), (8, 32), (99, 64), (256, 896)])
def test_float16_kernel_is_within_fp32_summation_of_the_exact_product(
    isa: str, dtype: torch.dtype, n: int, k: int
) -> None:
    """16-bit products are exact in fp32: the error is the fp32 sums' and the result's rounding to ``dtype``."""
    if isa not in _isas():
        pytest.skip(f"this CPU has no {isa}")
    torch.manual_seed(n + k)
    weight = torch.randn(n, k).to(dtype)
    for rows in (1, 2, 3, 4, 5, 16):
        x = torch.randn(rows, k).to(dtype)
        got = _float16_op(x, weight, isa)
        exact = x.double() @ weight.double().T
        assert got.shape == (rows, n) and got.dtype == dtype
        sums = (x.double().abs() @ weight.double().abs().T) * k * 2**-24  # fp32 summation error bound
        unit = 2**-8 if dtype == torch.bfloat16 else 2**-11  # half a unit in the last place of the result
        assert ((got.double() - exact).abs() <= unit * exact.abs() + sums + 1e-30).all()


def test_float16_kernel_agrees_across_instruction_sets_and_with_aten() -> None:
    torch.manual_seed(1)
    weight, x = torch.randn(300, 896).bfloat16(), torch.randn(3, 896).bfloat16()
    results = [_float16_op(x, weight, isa).float() for isa in _isas() if isa != "vnni"]
    aten = F.linear(x, weight).float()
    for got in results:
        torch.testing.assert_close(got, aten, rtol=2**-7, atol=1e-2)
        torch.testing.assert_close(got, results[0], rtol=2**-7, atol=1e-2)  # the sets sum in other orders
    assert torch.equal(_float16_op(torch.zeros(1, 896).bfloat16(), weight), torch.zeros(1, 300).bfloat16())


def test_float16_kernel_names_its_bad_inputs() -> None:
    weight = torch.randn(16, 32).bfloat16()
    cases = [
        ((torch.randn(1, 32).bfloat16(), weight.float()), "the weight must be bfloat16 or float16, got Float"),
        ((torch.randn(1, 32).half(), weight), "x must have the weight's dtype BFloat16, got Half"),
        ((torch.randn(1, 1, 32).bfloat16(), weight), r"x must be 2-D \[M, K\], got 3 dims"),
        ((torch.randn(1, 48).bfloat16(), torch.randn(16, 48).bfloat16().T.contiguous().T), r"not contiguous"),
        ((torch.randn(1, 48).bfloat16(), weight), "x has 48 columns, the weight 32"),
        (
            (torch.randn(1, 24).bfloat16(), torch.randn(16, 24).bfloat16()),
            r"width \(24\) must be a positive multiple of 16",
        ),
        ((torch.randn(1, 32).bfloat16(), weight, "sse2"), "unknown instruction set 'sse2'"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            _float16_op(*args)


def _depthwise_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    gelu: bool = False,
    isa: str = "auto",
) -> torch.Tensor:
    return torch.ops.fastvlm_native.depthwise_conv2d(x, weight, bias, stride, gelu, isa)


def _depthwise_reference(x, weight, bias, stride, gelu):
    """The same conv in float64 by torch: input channels repeated for a multiplier of 2, "same" padding."""
    repeat = weight.shape[0] // x.shape[1]
    k = weight.shape[-1]
    out = F.conv2d(
        x.double().repeat_interleave(repeat, 1),
        weight.double(),
        None if bias is None else bias.double(),
        stride,
        k // 2,
        1,
        weight.shape[0],
    )
    return F.gelu(out) if gelu else out


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize(
    ("channels", "side", "kernel", "stride", "repeat"),
    [
        (96, (17, 13), 7, 1, 1),  # whole vectors, strips and borders
        (33, (6, 7), 5, 1, 1),  # a masked last channel block
        (20, (9, 11), 3, 2, 2),  # stride 2 with a channel multiplier of 2
        (7, (3, 2), 7, 2, 2),  # a map smaller than the kernel, odd channels doubled
        (24, (1, 1), 7, 1, 1),  # one pixel: only the centre tap
        (18, (8, 8), 3, 2, 1),
        (40, (20, 19), 7, 2, 2),  # the downsampling convs' shape
        (32, (24, 40), 7, 1, 1),  # wide enough for strips with every tap inside the map
        (16, (40, 41), 7, 2, 2),
        (24, (20, 21), 5, 2, 1),
        (16, (20, 40), 3, 1, 2),
    ],
)
def test_depthwise_kernel_equals_the_float64_conv_to_fp32_rounding(
    isa: str, channels: int, side: tuple[int, int], kernel: int, stride: int, repeat: int
) -> None:
    if isa not in _isas():
        pytest.skip(f"this CPU has no {isa}")
    torch.manual_seed(channels + kernel)
    x = torch.randn(2, channels, *side).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(channels * repeat, 1, kernel, kernel), torch.randn(channels * repeat)
    for b in (bias, None):
        for gelu in (False, True):
            got = _depthwise_op(x, weight, b, stride, gelu, isa)
            exact = _depthwise_reference(x, weight, b, stride, gelu)
            assert got.shape == exact.shape and got.dtype == torch.float32
            assert got.is_contiguous(memory_format=torch.channels_last)
            # fp32 sums of k*k products (+ bias): each rounding within 2^-24 of the running magnitude
            magnitude = _depthwise_reference(x.abs(), weight.abs(), None if b is None else b.abs(), stride, False)
            bound = (kernel * kernel + 2) * 2**-24 * magnitude + 1e-6
            assert ((got.double() - exact).abs() <= bound).all(), (got.double() - exact).abs().max()


def test_depthwise_kernel_reads_any_memory_format_and_agrees_across_instruction_sets() -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 48, 12, 12)
    weight, bias = torch.randn(48, 1, 7, 7), torch.randn(48)
    reference = _depthwise_op(x.contiguous(memory_format=torch.channels_last), weight, bias)
    torch.testing.assert_close(_depthwise_op(x, weight, bias), reference, rtol=0, atol=0)  # NCHW in: same sums
    for isa in _isas():
        if isa != "vnni":
            torch.testing.assert_close(_depthwise_op(x, weight, bias, isa=isa), reference, rtol=1e-6, atol=1e-5)


def test_depthwise_kernel_names_its_bad_inputs() -> None:
    x, weight = torch.randn(1, 8, 6, 6), torch.randn(8, 1, 3, 3)
    cases = [
        ((x.double(), weight.double(), None), "float32 input and weight only, got Double and Double"),
        ((x[0], weight, None), r"x must be \[N, C, H, W\], got 3 dims"),
        ((x, torch.randn(8, 2, 3, 3), None), r"the weight must be \[C_out, 1, k, k\], got \[8, 2, 3, 3\]"),
        ((x, torch.randn(8, 1, 9, 9), None), "kernel side 9 is not compiled in"),
        ((x, weight, None, 3), "stride must be 1 or 2, got 3"),
        (
            (x, torch.randn(24, 1, 3, 3), None),
            "24 output channels from 8 inputs; expected a channel multiplier of 1 or 2",
        ),
        ((x, weight, torch.randn(4)), r"the bias must be float32 \[8\], got \[4\]"),
        ((x, weight, None, 1, False, "sse2"), "unknown instruction set 'sse2'"),
        (
            (torch.randn(1, 0, 4, 4), torch.randn(0, 1, 3, 3), None),
            r"must have channels and pixels, got \[1, 0, 4, 4\]",
        ),
        ((torch.randn(1, 8, 0, 5), weight, None, 2), r"must have channels and pixels, got \[1, 8, 0, 5\]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            _depthwise_op(*args)


def _attention_inputs(
    batch: int, heads: int, kv_heads: int, dim: int, length: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's query [B, heads, 1, D] (a transposed view, as the decoder makes it) and the first
    ``length`` positions of key/value buffers with room for more, as the decode steps pass them."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)
    keys, values = (torch.randn(batch, kv_heads, length + 7, dim, generator=gen).to(dtype) for _ in range(2))
    return query, keys[:, :, :length], values[:, :, :length]


def _exact_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T scale) v in float64, each key/value head repeated for the query heads sharing it."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = (t.double().repeat_interleave(groups, dim=1) for t in (keys, values))
    scores = (query.double() @ keys.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ values


def _padding_masks(batch: int, length: int) -> list[torch.Tensor]:
    """Masks [B or 1, 1, 1, L] as decode steps pass them: every other row left-padded, the first row's padding
    broadcast over the batch, and the same per-row padding read through a stride of 2."""
    attend = torch.ones(batch, length, dtype=torch.bool)
    attend[1::2, : length // 2] = False
    padded_first = torch.ones(1, length, dtype=torch.bool)
    padded_first[0, : (length + 1) // 2 - 1] = False  # at least one position stays
    strided = attend.repeat_interleave(2, dim=1)[:, ::2]
    assert strided.stride(1) == 2 and torch.equal(strided, attend)
    mostly_padding = torch.ones(batch, length, dtype=torch.bool)
    mostly_padding[:, : 2 * length // 3] = False  # a split call's first chunk attends to nothing
    return [m[:, None, None, :] for m in (attend, padded_first, strided, mostly_padding)]


@pytest.mark.skipif(native.decode_attention_kernel() is None, reason="fastvlm's CPU kernels did not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "dim", "length"),
    [
        (1, 14, 2, 64, 300),  # FastVLM-0.5B after a 256-token image and some text: two threads
        (1, 12, 2, 128, 1500),  # 1.5B's heads, a long context
        (3, 4, 2, 16, 17),  # the fixtures' heads, a small batch: one thread
        (2, 18, 1, 8, 40),  # 18 query heads on one key/value head: three passes of 8, the last partial
        (1, 2, 2, 8, 1),  # no shared heads, the first position only
    ],
)
def test_decode_attention_is_the_exact_attention_to_fp32_rounding(
    batch: int, heads: int, kv_heads: int, dim: int, length: int, dtype: torch.dtype
) -> None:
    """Against float64 softmax(q k^T s) v on the same (rounded) inputs, with and without a padding mask.

    fp32 products, sums and exp leave the output within 1e-5 of the values' largest magnitude (the
    length-1500 case is 1e-6 off); a bf16/fp16 output adds its own rounding, half a step of the output's dtype.
    """
    op = native.decode_attention_kernel()
    query, keys, values = _attention_inputs(batch, heads, kv_heads, dim, length, dtype)
    for mask in (None, *_padding_masks(batch, length)):
        with torch.inference_mode():
            out = op(query, keys, values, mask, 0.125)
        exact = _exact_attention(query, keys, values, mask, 0.125)
        assert out.shape == (batch, heads, 1, dim) and out.dtype == dtype and out.is_contiguous()
        bound = 1e-5 * values.abs().max().item() + torch.finfo(dtype).eps / 2 * exact.abs().max().item()
        assert (out.double() - exact).abs().max().item() <= bound


@pytest.mark.skipif(native.decode_attention_kernel() is None, reason="fastvlm's CPU kernels did not build")
@pytest.mark.skipif(native.decode_attention_kernel() is None, reason="fastvlm's CPU kernels did not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_split_over_positions_for_idle_threads_is_still_exact(dtype: torch.dtype) -> None:
    """With more threads than (row, key/value head) pairs, each pair's positions are split among them and
    the partial softmaxes merged: one row and one key/value head on 4 threads takes 4 chunks of 375."""
    op = native.decode_attention_kernel()
    query, keys, values = _attention_inputs(1, 8, 1, 64, 1500, dtype, seed=5)
    threads = torch.get_num_threads()
    results = {}
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            for index, mask in enumerate((None, *_padding_masks(1, 1500))):
                with torch.inference_mode():
                    out = op(query, keys, values, mask, 0.125)
                exact = _exact_attention(query, keys, values, mask, 0.125)
                bound = 1e-5 * values.abs().max().item() + torch.finfo(dtype).eps / 2 * exact.abs().max().item()
                assert (out.double() - exact).abs().max().item() <= bound
                results[count, index] = out
    finally:
        torch.set_num_threads(threads)
    if dtype == torch.float32:  # the split is real: its sums round differently from one pass
        assert not all(torch.equal(results[1, i], results[4, i]) for i in range(5))


def test_decode_attention_leaves_what_its_kernel_does_not_take_to_aten() -> None:
    """Turned off, float64, a head width that is not a multiple of 8 or a float mask: the op returns
    ATen's scaled_dot_product_attention of the same arguments, bit for bit."""
    op = native.decode_attention_kernel()
    query, keys, values = _attention_inputs(2, 4, 2, 16, 9, torch.float32)
    attend = torch.tensor([[True] * 9, [False] * 3 + [True] * 6])[:, None, None, :]
    additive = torch.zeros(2, 1, 1, 9).masked_fill(~attend, float("-inf"))

    def aten(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.25, enable_gqa=True)

    cases = [
        ((query, keys, values, attend), {"kernel": False}),
        ((query.double(), keys.double(), values.double(), attend), {}),
        ((query[..., :12], keys[..., :12], values[..., :12], attend), {}),
        ((query, keys, values, additive), {}),
    ]
    for (q, k, v, m), options in cases:
        with torch.inference_mode():
            assert torch.equal(op(q, k, v, m, 0.25, **options), aten(q, k, v, m))
    with torch.inference_mode():  # the kernel itself differs from ATen's in the last bits, so the cases above are real
        kernel_out = op(query, keys, values, attend, 0.25)
    assert not torch.equal(kernel_out, aten(query, keys, values, attend))


@pytest.mark.skipif(native.decode_attention_kernel() is None, reason="fastvlm's CPU kernels did not build")
def test_decode_attention_of_a_row_with_nothing_to_attend_is_atens_zeros() -> None:
    """No position to attend in a row (not something decode steps make: the new position is always attended):
    the kernel gives what ATen's attention gives there, zeros, and the other rows are unaffected."""
    query, keys, values = _attention_inputs(2, 4, 2, 16, 5, torch.float32)
    attend = torch.tensor([[True] * 5, [False] * 5])[:, None, None, :]
    with torch.inference_mode():
        out = native.decode_attention_kernel()(query, keys, values, attend, 0.25)
    aten = F.scaled_dot_product_attention(query, keys, values, attn_mask=attend, scale=0.25, enable_gqa=True)
    assert torch.equal(out[1], aten[1]) and not out[1].any()
    assert torch.allclose(out[0], aten[0], rtol=0, atol=1e-6)


def test_packing_round_trips_and_pads_the_last_group_with_zeros() -> None:
    q = torch.randint(-127, 128, (13, 48), dtype=torch.int8)
    packed = pack_rows(q)
    assert packed.shape == (2, 3, 8, 16)
    assert torch.equal(packed[0, 1, 2], q[2, 16:32])  # block 0, chunk 1, row 2
    assert not packed[1, :, 5:].any()  # rows 13..15 do not exist
    assert torch.equal(unpack_rows(packed, 13), q)


def test_kernel_names_its_bad_inputs() -> None:
    q, scales = quantize_rows_int8(torch.randn(16, 32))
    packed, s = pack_rows(q), scales.float()
    cases = [
        ((torch.randn(1, 32, dtype=torch.bfloat16), packed, s, "auto"), "x must be 2-D float32"),
        ((torch.randn(1, 48), packed, s, "auto"), "x has 48 columns, the weight 32"),
        ((torch.randn(1, 32), packed, s[:5], "auto"), "5 scales need 1 row groups, the packed weight has 2"),
        ((torch.randn(1, 32), q, s, "auto"), r"packed must be int8 \[ceil\(N/8\), K/16, 8, 16\]"),
        ((torch.randn(1, 32), packed, s, "sse2"), "unknown instruction set 'sse2'"),
    ]
    assert _op(torch.randn(1, 32), packed, s[:9]).shape == (1, 9)  # 9 rows need 2 groups too: valid
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            _op(*args)


def test_quantize_decoder_packs_for_the_kernel_by_default_and_aten_on_request() -> None:
    reference = FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"))
    ours = quantize_decoder(FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny")), "int8-head")
    aten = quantize_decoder(FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny")), "int8-head", kernel="aten")
    assert quantization_kernel(ours) == "fastvlm" and quantization_kernel(aten) == "aten"
    assert quantization_kernel(reference) is None
    assert all(m.packed for m in decoder_linears(ours).values())  # the 387-row head included (padded)
    assert not any(m.packed for m in decoder_linears(aten).values())
    torch.manual_seed(0)
    for name, layer in decoder_linears(ours).items():  # same int8 weights, so the same products up to rounding
        other = decoder_linears(aten)[name]
        assert torch.equal(layer.int8_weight(), other.int8_weight()), name
        x = torch.randn(1, layer.in_features)
        exact = F.linear(x, layer.dequantized(torch.float32), layer.bias)
        ours_error = (layer(x) - exact).abs().max()
        aten_error = (other(x) - exact).abs().max()  # ATen rounds the activations to bf16
        assert ours_error <= 1e-5 * exact.abs().max() and ours_error <= aten_error, name


def test_turned_off_the_kernel_is_not_used_and_int8_still_runs() -> None:
    code = """
import torch
from fastvlm import native
from fastvlm.errors import ConfigError
from fastvlm.model import FastVLM
from fastvlm.quantization import quantization_kernel, quantize_decoder
from tests.conftest import fixture_path
assert native.int8_kernel() is None
try:
    quantize_decoder(FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny")), "int8", kernel="fastvlm")
except ConfigError as err:
    print("refused:", err)
model = FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"), quantization="int8")
print("kernel:", quantization_kernel(model))
print("logits:", model.language_model(torch.arange(3, 9)[None]).logits.shape)
"""
    result = _run_python(code, **{native.DISABLE_ENV: "0"})
    assert result.returncode == 0, result.stderr
    assert "refused: the fastvlm int8 kernel is not available here" in result.stdout
    assert "kernel: aten" in result.stdout and "logits: torch.Size([1, 6, 387])" in result.stdout


def test_a_failed_build_warns_once_and_falls_back(tmp_path: Path) -> None:
    code = """
import warnings
import torch
from fastvlm import native
from fastvlm.linears import Int8WeightOnlyLinear
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert native.int8_kernel() is None and native.int8_kernel() is None and native.decode_layers_kernel() is None
print("warnings:", len(caught), caught[0].message if caught else "")
layer = Int8WeightOnlyLinear.from_weight(torch.randn(16, 32), pack=True)
print("output:", layer(torch.randn(1, 32)).shape)  # a packed layer without the kernel: ATen on the unpacked weight
"""
    result = _run_python(code, CXX="/bin/false", **{native.CACHE_ENV: str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "warnings: 1 fastvlm's CPU kernels could not be built" in result.stdout
    assert "output: torch.Size([1, 16])" in result.stdout
    assert not list(tmp_path.rglob("*.so"))


def _forget_loaded() -> None:
    """Make the next accessor call look again (the environment changed)."""
    for accessor in (native._library, native.int8_kernel, native.float16_kernel, native.decode_layers_kernel):
        accessor.cache_clear()


def test_a_second_process_loads_the_built_kernel_without_compiling() -> None:
    assert native.int8_kernel() is not None  # built (or loaded) by this process
    result = _run_python("from fastvlm import native; print(native.int8_kernel_isa())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == native.int8_kernel_isa()
    assert "compiling" not in result.stderr


def test_fastvlm_kernel_on_request_is_refused_with_the_reason_when_it_cannot_run(monkeypatch) -> None:
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    _forget_loaded()
    try:
        with pytest.raises(ConfigError, match="use kernel='aten'"):
            quantize_decoder(FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny")), "int8", kernel="fastvlm")
    finally:
        monkeypatch.delenv(native.DISABLE_ENV)
        _forget_loaded()
    assert native.int8_kernel() is not None  # loads again once allowed


def test_a_packed_layer_reports_itself() -> None:
    layer = Int8WeightOnlyLinear.from_weight(torch.randn(24, 32), pack=True)
    assert "packed=True" in repr(layer) and layer.qweight.shape == (3, 2, 8, 16)
    unpackable = Int8WeightOnlyLinear.from_weight(torch.randn(24, 40), pack=True)  # 40 is not a multiple of 16
    assert unpackable.packed is False
    with pytest.raises(ValueError, match="packed"):
        Int8WeightOnlyLinear(torch.zeros(2, 2, 8, 16, dtype=torch.int8), torch.ones(24), None)  # 24 rows need 3 groups


def test_a_lock_left_by_a_killed_build_does_not_block_the_next(tmp_path: Path) -> None:
    folder = tmp_path / "kernels"
    code = "from fastvlm import native; print(native.int8_kernel_isa())"
    first = _run_python(code, **{native.CACHE_ENV: str(folder)})  # builds into the empty folder
    assert first.returncode == 0 and first.stdout.strip() in ("vnni", "avx512", "avx2"), first.stderr
    (build,) = folder.iterdir()
    for library in build.glob("*.so"):
        library.unlink()  # as if the build had been killed: no library, and its lock left behind
    lock = build / "lock"
    lock.touch()
    old = time.time() - 2 * native.STALE_LOCK_S
    os.utime(lock, (old, old))
    again = _run_python(code, **{native.CACHE_ENV: str(folder)})
    assert again.returncode == 0 and again.stdout.strip() == first.stdout.strip(), again.stderr
    assert "compiling" in again.stderr and not lock.exists()


def test_every_kernel_source_ships_with_the_package() -> None:
    """An installed (not editable) fastvlm must carry what native.py compiles: pyproject's package-data."""
    import fnmatch
    import json

    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    globs = json.loads(section.split('"fastvlm" =', 1)[1].splitlines()[0])  # a TOML list of strings is JSON too
    package = REPO / "fastvlm"
    needed = {path.relative_to(package).as_posix() for path in (*native.SOURCES, *native.HEADERS)}
    present = {path.relative_to(package).as_posix() for path in (package / "csrc").iterdir()}
    assert needed <= present
    assert all(any(fnmatch.fnmatch(name, glob) for glob in globs) for name in present), (present, globs)
