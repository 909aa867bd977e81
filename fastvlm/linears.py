"""Linear layers for batch-1 decode on CPU, where a step reads every decoder weight once.

Decode at batch 1 multiplies a single row by each weight matrix (a GEMV): its speed is the
rate at which the weights stream from memory, so fewer bytes per weight should mean more
tokens per second. Two things stand in the way in eager PyTorch on CPU, and this module
works around both:

* **bf16 weights through ATen are not reliably faster than fp32**: ``aten::mm`` with one
  row takes a GEMM path, and ``torch.mv`` a reduced-precision GEMV kernel; which of the two
  reads bf16 weights faster, and whether either beats the fp32 layer, depends on the CPU
  (torch 2.13, 2-core Xeons: with AMX, ``mv`` reads at the memory's pace and ``mm`` no
  faster than fp32; without AMX, ``mv`` reads 8-9 GB/s where fp32 reads 28). Our kernel
  (:mod:`fastvlm.native`, ``float16_mm``) reads the row-major bf16/fp16 weight as it is
  stored at about the fp32 layer's pace, so half the bytes take about half the time.
  :class:`GemvLinear` runs it for up to :data:`FLOAT16_KERNEL_MAX_ROWS` rows on CPU; where
  it cannot (not built, a width that is not a multiple of 16, a non-contiguous weight, a call
  autograd records) one row takes ``torch.mv`` and more rows ``F.linear``.
* **int8 weights**: torchao's eager int8 tensor converts the whole weight to the activation
  dtype at every call (more bytes moved, not fewer). ATen has a CPU kernel for exactly
  this case, ``aten._weight_int8pack_mm(x, w_int8[N, K], scales[N])``, which reads the int8
  weight once and scales each output; in torch 2.13 it takes bf16, fp16 or fp32 activations
  (scales in the same dtype) but is vectorised for bf16 only (fp32 and fp16 are several
  times slower than the fp32 layer). :class:`Int8WeightOnlyLinear` therefore rounds a
  row's activations to bf16 for that kernel and returns the result in the input's dtype.
  Even so it reads about 10 GB/s where fp32 GEMV reads 21 (2-core Xeon), so where it can
  be compiled our own kernel (:mod:`fastvlm.native`) runs instead: activations at full
  precision (exact integer products of the weights and each row's activations at 28 bits on
  CPUs with AVX-512 VNNI, fp32 FMAs on others), the weight packed so that it streams front
  to back (:func:`pack_rows`), about 1.5-2x ATen's.
  For many rows (prefill) either kernel is slower than one dequantisation plus a GEMM, so
  above :data:`KERNEL_MAX_ROWS` rows (ATen's) or :data:`PACKED_KERNEL_MAX_ROWS` (ours) the
  weight is dequantised for that call.

Neither module changes what is stored under the layer's parameter names for a float model;
the int8 layer holds ``qweight`` (int8, [N, K] or packed) and ``scales`` ([N]) instead of ``weight``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastvlm import native
from fastvlm.native import autograd_records, eager_on_cpu

__all__ = [
    "FLOAT16_KERNEL_MAX_ROWS",
    "KERNEL_MAX_ROWS",
    "PACKED_KERNEL_MAX_ROWS",
    "GemvLinear",
    "Int8WeightOnlyLinear",
    "can_pack_rows",
    "pack_rows",
    "quantize_rows_int8",
    "unpack_rows",
]

KERNEL_MAX_ROWS = 16  # up to this many rows ATen's int8 kernel beats dequantise + GEMM (measured: 2-3x at 1-16 rows)
# Up to this many rows our kernel does. Measured on a 0.5B int8-head decoder's forward (2-core Xeon):
# 24 tokens 0.22 against 2.2 s, 96 tokens 0.8 against 1.8 s, 300 tokens 2.2 against 2.7 s.
PACKED_KERNEL_MAX_ROWS = 256
# Up to this many rows our bf16/fp16 kernel does (measured on a 4864x896 weight, 2-core Xeon with AVX-512:
# 0.35 against ATen's 0.57 ms at 1 row, 1.08 against 1.37 at 16 bf16 rows; fp16 is even with ATen at 16).
FLOAT16_KERNEL_MAX_ROWS = 16
GEMV_DTYPES = (torch.bfloat16, torch.float16)  # F.linear is as fast as mv for fp32; only these gain
INT8_MAX = 127
PACK_ROWS, PACK_CHUNK = 8, 16  # the native kernel's block: 8 output rows, 16 weights of each per step
FLOAT16_STEP = 16  # the bf16/fp16 kernel reads 16 weights of a row per step: widths must be multiples


class GemvLinear(nn.Linear):
    """``nn.Linear`` whose few-row bf16/fp16 CPU inputs go through a GEMV kernel (see the module docstring).

    Up to :data:`FLOAT16_KERNEL_MAX_ROWS` rows run our kernel where it is built (and the
    width is a multiple of 16), else one row runs ``torch.mv``. Same parameters, same state
    dict and same result as ``nn.Linear`` (up to the order of the fp32 accumulation); other
    inputs, devices and dtypes take ``F.linear`` unchanged. ``use_mv = False`` sends every
    input to ``F.linear``, and ``use_kernel = False`` takes ``torch.mv`` for one row instead of our
    kernel (to measure one path against another).
    """

    use_mv: bool = True
    use_kernel: bool = True

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> GemvLinear:
        """A GemvLinear that shares ``linear``'s weight and bias (no copy)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multiply(x, self.weight, self.bias)

    def multiply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` times ``weight`` [N, in] (plus ``bias``), by the path :meth:`forward` takes with this layer's settings.

        :meth:`forward` passes the layer's own weight; :mod:`fastvlm.greedy_head` passes a few
        rows of it, to compute those logits exactly as the whole head computes them.
        """
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            self.use_mv
            and weight.dtype in GEMV_DTYPES
            and x.dtype == weight.dtype
            and type(weight) in (torch.Tensor, nn.Parameter)
            and 0 < rows <= FLOAT16_KERNEL_MAX_ROWS
            and eager_on_cpu(x)
        ):
            kernel = None if autograd_records(x, weight, bias) else self.float16_kernel()
            if kernel is not None:
                out = kernel(x.reshape(rows, self.in_features), weight)
            elif rows == 1:
                out = torch.mv(weight, x.reshape(-1))
            else:
                return F.linear(x, weight, bias)
            if bias is not None:
                out = out + bias
            return out.reshape(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)

    def float16_kernel(self) -> Any | None:
        """Our GEMV op for this layer's few-row inputs of the weight's dtype, or None where it cannot run.

        None when it is not built here, ``use_kernel`` is off, the width is not a positive multiple
        of 16 or the weight is not contiguous. :mod:`fastvlm.decoding` asks this too, so that its
        one-call step takes the path :meth:`forward` takes.
        """
        fits = self.in_features > 0 and self.in_features % FLOAT16_STEP == 0 and self.weight.is_contiguous()
        return native.float16_kernel() if self.use_kernel and fits else None


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``(q [N, K] int8, scales [N] bf16)`` with ``weight ≈ q * scales[:, None]``.

    The scale maps each row's largest magnitude to 127 (as torchao's ``Int8WeightOnlyConfig``
    does), rounded to bf16 before the row is rounded against it; an all-zero row gets scale 1
    so that nothing divides by zero.
    """
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).to(torch.bfloat16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scales


def can_pack_rows(q: torch.Tensor) -> bool:
    """Whether an int8 [N, K] weight fits :func:`pack_rows`' layout (K a multiple of 16)."""
    return q.dim() == 2 and q.shape[1] % PACK_CHUNK == 0 and q.shape[1] > 0


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """``q`` [N, K] in the native kernel's layout [ceil(N/8), K/16, 8, 16] (zero rows pad the last group).

    Each group of 8 output rows becomes one contiguous block whose 128-byte steps hold the next
    16 weights of all 8 rows, so the kernel reads the weight front to back in one stream.
    """
    n, k = q.shape
    padded = -(-n // PACK_ROWS) * PACK_ROWS
    if padded != n:
        q = torch.cat([q, q.new_zeros(padded - n, k)])
    return q.reshape(padded // PACK_ROWS, PACK_ROWS, k // PACK_CHUNK, PACK_CHUNK).permute(0, 2, 1, 3).contiguous()


def unpack_rows(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The [rows, K] int8 weight :func:`pack_rows` packed (a new tensor)."""
    groups, chunks = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(groups * PACK_ROWS, chunks * PACK_CHUNK)[:rows].contiguous()


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer holding an int8 weight with one scale per output row; activations stay float.

    ``qweight`` (int8) and ``scales`` [out] bf16 (rows are rounded against the bf16 scale, so
    every path multiplies by the same weight) are buffers; ``bias`` stays in the model's dtype.
    ``qweight`` is [out, in], or, when the layer is built with ``pack=True``, the native
    kernel's layout (:func:`pack_rows`; ``packed`` is then True and :meth:`int8_weight` gives
    the [out, in] matrix back). Few rows on CPU run a kernel that reads one byte per weight:
    our VNNI/AVX-512/AVX2 kernel (:mod:`fastvlm.native`; full-precision activations) for a packed weight, up
    to :data:`PACKED_KERNEL_MAX_ROWS` rows, else ATen's ``_weight_int8pack_mm`` (bf16
    activations) up to :data:`KERNEL_MAX_ROWS`. More rows, and other devices, multiply by the
    dequantised weight.
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        packed = qweight.dim() == 4 and tuple(qweight.shape[2:]) == (PACK_ROWS, PACK_CHUNK)
        out_features = scales.shape[0] if scales.dim() == 1 else -1
        rows_ok = packed and qweight.shape[0] == -(-out_features // PACK_ROWS)
        if qweight.dtype != torch.int8 or not (qweight.dim() == 2 or rows_ok) or scales.dim() != 1:
            raise ValueError(
                f"expected an int8 [out, in] (or packed [ceil(out/8), in/16, 8, 16]) weight and [out] scales, "
                f"got {qweight.dtype} {tuple(qweight.shape)} and {tuple(scales.shape)}"
            )
        if not packed and scales.shape != qweight.shape[:1]:
            raise ValueError(
                f"expected [out] scales for an int8 {tuple(qweight.shape)} weight, got {tuple(scales.shape)}"
            )
        self.out_features = out_features
        self.in_features = qweight.shape[1] * PACK_CHUNK if packed else qweight.shape[1]
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = False
    ) -> Int8WeightOnlyLinear:
        """Quantize a float ``weight`` [out, in] (and keep ``bias``); ``pack`` lays it out for the native kernel.

        ``pack`` is ignored for a weight whose input width is not a multiple of 16.
        """
        q, scales = quantize_rows_int8(weight)
        return cls(pack_rows(q) if pack and can_pack_rows(q) else q, scales, bias)

    @property
    def packed(self) -> bool:
        """Whether ``qweight`` is in the native kernel's layout (:func:`pack_rows`) rather than [out, in]."""
        return self.qweight.dim() == 4

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight as [out, in] (unpacked when the layer holds it packed)."""
        return unpack_rows(self.qweight, self.out_features) if self.packed else self.qweight

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the layer multiplies by, as float [out, in] in ``dtype``."""
        return (self.int8_weight().float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        eager_cpu = rows > 0 and eager_on_cpu(x)
        kernel = native.int8_kernel() if self.packed and eager_cpu else None
        if kernel is not None and rows <= PACKED_KERNEL_MAX_ROWS:
            flat = x.reshape(rows, self.in_features).float()
            out = kernel(flat, self.qweight, self.scales.float())
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        elif eager_cpu and rows <= KERNEL_MAX_ROWS:
            scales = self.scales.to(torch.bfloat16)  # a no-op unless a module.to(dtype) converted the buffer
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.int8_weight(), scales)
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.dequantized(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"packed={self.packed}"
        )
