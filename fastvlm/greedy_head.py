"""The greedy next token without reading the whole LM head: an int8 screen, then the rows that can win.

A batch-1 decode step reads every decoder weight once, so its time is bytes over memory
bandwidth. The LM head is the largest single read: FastVLM-0.5B's tied 151,936 x 896 head is
545 MB of the 1,976 MB an fp32 step reads (27.5%; 1.5B: 18%, 7B: 7%). Greedy decoding needs
only the argmax of the logits, not the logits, and almost every row of the head is far from
winning. :class:`GreedyHead` finds the argmax reading a quarter of the head's bytes (an fp32
head; half of a bf16 one), and the token it returns is the head's own argmax, not an
approximation of it:

1. **Screen.** ``a = s q x`` with an int8 copy of the head (one scale per row, made once;
   our packed int8 kernel, :mod:`fastvlm.native`).
2. **Bound.** For every row ``r``, ``|z_r - a_r| <= B_r``, where ``z_r`` is the logit the head
   itself computes (its weight ``w_r``, its dtype, fp32 accumulation):

   - the weight's rounding to int8: ``|w_r x - s_r q_r x| <= ||w_r - s_r q_r|| ||x||``
     (Cauchy-Schwarz);
   - the head's fp32 summation: at most ``g_n ||w_r|| ||x||``, ``g_n = n u / (1 - n u)``,
     ``u = 2^-24``, ``n`` the width (the standard dot-product bound);
   - the screen's own rounding (activations to 28 bits of their largest value with VNNI,
     fp32 FMAs otherwise): at most ``(g_n + 2^-27 sqrt(n)) ||s_r q_r|| ||x||``;
   - the head's rounding of its output to its dtype (bf16: 2^-8 relative) and the fp32
     arithmetic of the bound itself, covered by a margin relative to ``max |a|``.

   The per-row part (``k_r``, the three norms above; ``||s_r q_r|| <= ||w_r|| + ||w_r - s_r q_r||``)
   is computed once, in fp32, and rounded up past its own rounding error and underflow.
3. **Candidates.** The largest logit is at least ``L = a_t - B_t`` (``t`` the screen's
   argmax), so only rows with ``a_r + B_r >= L`` can reach it; a row whose value ties the
   largest is among them too.
4. **Exact rows.** The candidates' logits are computed by the head's own path
   (:meth:`fastvlm.linears.GemvLinear.multiply`) on those rows of its weight, and the
   token is the first candidate (lowest id) holding the largest, as ``argmax`` picks.

For a bf16 or fp16 head those logits are bit for bit the full head's: our GEMV kernel
computes each row alone (so those heads are screened only up to the rows it takes). For an
fp32 head, BLAS may block a few rows differently from the whole matrix and round the last
bit differently, so the winner must also lead every other candidate by more than both
roundings (``2 g_n sum |w_i x_i|`` each, :func:`_order_is_certain`); where it does not (a
near-tie), the full head decides. Either way the token is the full head's argmax.

On a random FastVLM-0.5B head (2-core Xeon, fp32, one row) the screen takes 4.9 ms where the
full head takes 18.9 ms, with 1-35 candidates (bf16: 4.7 against 10.1 ms). Where it would not
pay or cannot run, the full head runs: more than :data:`MAX_CANDIDATE_FRACTION` of the rows as
candidates (a hidden state of zeros makes every row one), non-finite values, logits near the
largest value of the head's dtype (fp16 could overflow to ties at infinity), more rows than
the int8 kernel takes.

Only greedy decoding (temperature 0) uses it: sampling and log-probabilities need every
logit. It holds an int8 copy of the head (+25% of an fp32 head's bytes in memory: 136 MB for
0.5B) and a reference to the head's weight with its version counter: a weight changed in
place (training, ``load_state_dict``) or replaced makes :meth:`GreedyHead.matches` false, and
:func:`greedy_head_of` builds a new one. A change made through ``.data`` bumps no counter; it
is seen only if it touches one of 64 rows sampled at each call, so after such a change set
``model.greedy_head = None``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastvlm import native
from fastvlm.linears import (
    FLOAT16_KERNEL_MAX_ROWS,
    PACKED_KERNEL_MAX_ROWS,
    GemvLinear,
    Int8WeightOnlyLinear,
    can_pack_rows,
    pack_rows,
    quantize_rows_int8,
)

if TYPE_CHECKING:  # model.py imports decoding, which imports this module
    from fastvlm.model import FastVLM

__all__ = ["MAX_CANDIDATE_FRACTION", "SCREENED_DTYPES", "GreedyHead", "greedy_head_of"]

SCREENED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# More candidates than this fraction of the rows: gathering them costs more than reading the
# head, so the full head runs for that call.
MAX_CANDIDATE_FRACTION = 1 / 8
_UNIT_ROUNDOFF_FP32 = 2.0**-24
_MARGIN = 2.0**-20  # relative: the fp32 arithmetic of the bound (a few roundings of 2^-24 each)
_SAMPLE_ROWS = 64  # rows compared at each use, to see a weight changed behind the version counter
_BUILD_CHUNK_ROWS = 8192  # rows measured at a time (bounds the temporaries)


class GreedyHead:
    """The exact argmax of ``head(x)`` through an int8 screen (see the module docstring).

    Build it with :meth:`build`; call it with the hidden states the head takes ([B, H], the
    final norm's output) to get each row's token id [B].
    """

    def __init__(self, head: nn.Linear, screen: Int8WeightOnlyLinear, row_bounds: torch.Tensor) -> None:
        self.head = head
        self.weight = head.weight
        self.version = head.weight._version
        self.data_ptr = head.weight.data_ptr()
        self.sample_stride = max(1, head.weight.shape[0] // _SAMPLE_ROWS)
        self.sample = head.weight.detach()[:: self.sample_stride].clone()  # changes made through .data skip _version
        self.screen = screen
        self.row_bounds = row_bounds  # k_r [V] fp32, rounded up: |z_r - a_r| <= ||x|| k_r + output rounding
        self.max_row_bound = float(row_bounds.max()) if row_bounds.numel() else 0.0
        # fp32 heads: the candidates' logits may round differently from the full product's (bf16/fp16 ones are
        # bit for bit the same: our GEMV kernel computes each row alone), so the order is checked (_order_is_certain)
        self.check_order = head.weight.dtype == torch.float32
        self.finite = math.isfinite(self.max_row_bound)  # a NaN or inf weight: every call reads the full head
        self.output_roundoff = float(torch.finfo(head.weight.dtype).eps) / 2
        self.tiny = float(torch.finfo(head.weight.dtype).smallest_normal)
        self.largest_safe = float(torch.finfo(head.weight.dtype).max) / 4
        self.calls = 0  # calls answered by the screen
        self.fallbacks = 0  # calls that ran the full head instead

    @property
    def read_bytes(self) -> int:
        """Bytes a call reads besides the candidate rows: the int8 copy, its scales, row bounds and sampled rows."""
        tensors = (self.screen.qweight, self.screen.scales, self.row_bounds, self.sample)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def saved_bytes(self) -> int:
        """Bytes a decode step reads less than through the full head (its weight, less :attr:`read_bytes`)."""
        return self.weight.numel() * self.weight.element_size() - self.read_bytes

    @staticmethod
    def unsupported_reason(head: nn.Module) -> str | None:
        """Why a :class:`GreedyHead` cannot stand in for ``head`` (None: it can)."""
        if type(head) not in (nn.Linear, GemvLinear):
            return f"the head is a {type(head).__name__}, not an nn.Linear"
        weight = head.weight
        if type(weight) not in (torch.Tensor, nn.Parameter):
            return f"the head's weight is a {type(weight).__name__}, not a plain tensor"
        if head.bias is not None:
            return "the head has a bias"
        bypassed = native.bypassed_forward(head)
        if bypassed is not None:
            return f"the head {bypassed}, which the screen would skip"
        if native.global_hooks_registered():
            return "global module hooks are registered, which the screen would skip"
        if weight.device.type != "cpu":
            return f"the head is on {weight.device}; the int8 screen runs on the CPU"
        if weight.dtype not in SCREENED_DTYPES:
            return f"the head's weight is {weight.dtype}, not one of {[str(d) for d in SCREENED_DTYPES]}"
        if weight.is_inference():
            return "the head's weight is an inference tensor, which has no version counter to see changes by"
        if not can_pack_rows(weight):
            return f"the head's width {weight.shape[1]} is not a positive multiple of 16 (the int8 kernel's step)"
        if weight.dtype == torch.float32 and _reduced_fp32_matmul():
            return "fp32 matmuls run at reduced precision here (torch.set_float32_matmul_precision), outside the bound"
        row_wise = isinstance(head, GemvLinear) and head.use_mv and head.float16_kernel() is not None
        if weight.dtype != torch.float32 and not row_wise:
            return "a bf16/fp16 head needs fastvlm's GEMV kernel (GemvLinear), which computes each row alone"
        if native.int8_kernel() is None:
            return "fastvlm's int8 kernel is not built here (fastvlm.native)"
        return None

    @classmethod
    def build(cls, head: nn.Module) -> GreedyHead | None:
        """The screen for ``head``, or None where :meth:`unsupported_reason` gives a reason."""
        if cls.unsupported_reason(head) is not None:
            return None
        assert isinstance(head, nn.Linear)
        with torch.no_grad():
            weight = head.weight.detach()
            rows, width = weight.shape
            gamma = _summation_bound(width)
            screen_rounding = gamma + 2.0**-27 * math.sqrt(width)
            quantized = torch.empty(rows, width, dtype=torch.int8)
            scales = torch.empty(rows, dtype=torch.bfloat16)
            bounds = torch.empty(rows)
            for start in range(0, rows, _BUILD_CHUNK_ROWS):  # a chunk at a time: its temporaries stay in cache
                chunk = slice(start, start + _BUILD_CHUNK_ROWS)
                exact = weight[chunk].float()
                q, s = quantize_rows_int8(exact)
                quantized[chunk], scales[chunk] = q, s
                # w - s q in fp32 (s q itself is exact: an 8-bit scale times a 7-bit integer)
                rounding = _row_norms(torch.addcmul(exact, q.float(), s.float()[:, None], value=-1))
                norm = _row_norms(exact)
                # ||s q|| <= ||w|| + ||w - s q||
                bounds[chunk] = rounding + gamma * norm + screen_rounding * (norm + rounding)
            screen = Int8WeightOnlyLinear(pack_rows(quantized), scales, None)
        return cls(head, screen, bounds * (1 + 2.0**-10))

    def matches(self, head: nn.Module) -> bool:
        """Whether this screen was built from ``head``'s weight as it is now.

        The same module and parameter, its version counter unchanged (an in-place change bumps
        it), the same storage (``module.to()`` swaps ``.data``), and the same values in 64 rows
        spread over the vocabulary (a change made through ``.data`` bumps no counter).
        """
        weight = self.weight
        return (
            head is self.head
            and head.weight is weight
            and weight._version == self.version
            and weight.data_ptr() == self.data_ptr
            and torch.equal(weight.detach()[:: self.sample_stride], self.sample)
        )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's greedy token id [B] for hidden states [B, H] (the head's input)."""
        if hidden.dim() != 2 or hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(f"expected hidden states [B, {self.weight.shape[1]}], got {tuple(hidden.shape)}")
        rows = self.candidates(hidden)
        tokens = None if rows is None else self._argmax_of_rows(hidden, rows)
        if tokens is None:
            self.fallbacks += 1
            return self.head(hidden).argmax(dim=-1)
        self.calls += 1
        return tokens

    def _argmax_of_rows(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """The full head's argmax from the candidate ``rows``' exact logits; None: an fp32 near-tie (run the head)."""
        weight = self.weight[rows]
        if isinstance(self.head, GemvLinear):
            logits = self.head.multiply(hidden, weight)
        else:
            logits = torch.nn.functional.linear(hidden, weight)
        best = logits.argmax(dim=-1)
        if self.check_order and not _order_is_certain(hidden, weight, logits, best):
            return None
        return rows[best]

    def error_bounds(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The screen's values ``a`` [B, V] and bounds ``B`` [B, V] with ``|head(hidden) - a| <= B``; None: no screen.

        None for a batch the int8 kernel does not take, or non-finite values.
        """
        screened = self._screen(hidden)
        if screened is None:
            return None
        values, scale, slack = screened
        return values, scale * self.row_bounds + slack

    def _screened(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``hidden`` as fp32 ``x`` [B, H] and the screen's values ``a = s q x`` [B, V]; None where it cannot run."""
        if not self.finite or not native.eager_on_cpu(hidden):
            return None
        if not 0 < hidden.shape[0] <= _max_rows(self.head):
            return None
        x = hidden.float()
        return x, self.screen(x)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's ``scale`` [B]: ||x||, rounded up past its fp32 summation, times (1 + u_out) for the output
        rounding of the bound term ``scale * row_bounds``."""
        return _row_norms(x) * (1 + 2 * self.output_roundoff)

    def _screen(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``a`` [B, V], and ``scale``, ``slack`` [B, 1] of the bound ``scale * row_bounds + slack``."""
        screen = self._screened(hidden)
        if screen is None:
            return None
        x, screened = screen
        magnitude = screened.abs().amax(dim=-1, keepdim=True)
        if not (bool(torch.isfinite(magnitude).all()) and bool(torch.isfinite(x).all())):
            return None
        if float(magnitude.max()) > self.largest_safe:  # the head's output might overflow its dtype: ties at inf
            return None
        scale = self._scale(x)[:, None]
        slack = (self.output_roundoff + _MARGIN) * (magnitude + scale * self.max_row_bound) + self.tiny
        return screened, scale, slack

    def candidates(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The ids [C] (ascending) of every row that can hold some row's largest logit; None: run the full head.

        Our compiled op (:func:`fastvlm.native.screen_candidates_kernel`) picks the same rows as
        :meth:`_candidates_by_aten` in one call instead of about 20 ATen ops (0.5-1.2 ms a step for a
        151,936-row head); the Python path runs where the library is not built.
        """
        kernel = native.screen_candidates_kernel()
        if kernel is None:
            return self._candidates_by_aten(hidden)
        screen = self._screened(hidden)
        if screen is None:
            return None
        x, screened = screen
        most = math.floor(MAX_CANDIDATE_FRACTION * self.weight.shape[0])  # the count _candidates_by_aten allows
        ids, status = kernel(
            screened,
            x,
            self.row_bounds,
            self._scale(x),
            self.output_roundoff + _MARGIN,
            self.max_row_bound,
            self.tiny,
            self.largest_safe,
            most,
        )
        return ids if status == 0 else None  # 1: non-finite values or past largest_safe; 2: too many candidates

    def _candidates_by_aten(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """:meth:`candidates` through ATen ops: the reference the compiled op is tested against."""
        screen = self._screen(hidden)
        if screen is None:
            return None
        screened, scale, slack = screen
        largest, top = screened.max(dim=-1, keepdim=True)
        lower = largest - scale * self.row_bounds[top] - slack  # the largest logit is at least this
        maybe = screened >= lower - scale * self.max_row_bound - slack  # a superset, with the widest bound
        ids = maybe.any(dim=0).nonzero().squeeze(1)
        if ids.numel() > MAX_CANDIDATE_FRACTION * self.weight.shape[0]:
            return None
        keep = screened[:, ids] + scale * self.row_bounds[ids] + slack >= lower  # each row's own bound
        return ids[keep.any(dim=0)]


def greedy_head_of(model: FastVLM) -> GreedyHead | None:
    """The model's :class:`GreedyHead`, or None where greedy steps read the full head.

    None when ``model.screen_greedy_head`` is off or the head cannot be screened
    (:meth:`GreedyHead.unsupported_reason`: not a plain linear layer on the CPU, an int8 head
    already, no int8 kernel, hooks). Made on first use (``FastVLM.from_pretrained`` asks for it
    once the inference model is loaded) and kept as ``model.greedy_head``; made again when the
    head or its weight changed since (:meth:`GreedyHead.matches`). After changing the head's
    weight through ``.data`` (which no version counter sees), set ``model.greedy_head = None``.
    """
    head = model.language_model.lm_head
    current = model.greedy_head
    if not model.screen_greedy_head or (current is not None and current.head is not head):
        current = model.greedy_head = None  # turned off or the head replaced: free the int8 copy
    if not model.screen_greedy_head or GreedyHead.unsupported_reason(head) is not None:  # hooks may come and go
        return None
    if current is None or not current.matches(head):
        current = model.greedy_head = GreedyHead.build(head)
    return current


def _summation_bound(width: int) -> float:
    """``g_n = n u / (1 - n u)``: an fp32 dot product of ``n`` terms is within ``g_n sum |w_i x_i|`` of exact."""
    return width * _UNIT_ROUNDOFF_FP32 / (1 - width * _UNIT_ROUNDOFF_FP32)


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean norm in fp32, rounded up: past the summation's rounding, and past underflow.

    Squares below fp32's smallest value are lost (or rounded, as subnormals); over ``n`` terms that
    takes at most ``sqrt(n) 2^-63`` off a norm, far below the absolute ``2^-40`` added.
    """
    return rows.norm(dim=1) * (1 + _summation_bound(rows.shape[1]) * 64) + 2.0**-40


def _max_rows(head: nn.Linear) -> int:
    """The most rows a call screens: the int8 kernel's limit; for bf16/fp16, the rows our GEMV kernel takes."""
    if head.weight.dtype == torch.float32:
        return PACKED_KERNEL_MAX_ROWS
    return min(PACKED_KERNEL_MAX_ROWS, FLOAT16_KERNEL_MAX_ROWS)


def _reduced_fp32_matmul() -> bool:
    """Whether fp32 matmuls may run in a lower precision here (bf16 or TF32), which the bound does not cover."""
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    reduced_mkldnn = getattr(mkldnn, "fp32_precision", "none") not in ("none", "ieee")
    return torch.get_float32_matmul_precision() != "highest" or reduced_mkldnn


def _order_is_certain(hidden: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, best: torch.Tensor) -> bool:
    """Whether the full fp32 head would rank ``best`` [B] first among the candidates (``weight`` [C, H]) too.

    The candidates' ``logits`` [B, C] and the full product's may round differently (BLAS blocks a
    few rows another way), each within ``e_r = g_n sum_i |w_ri x_i|`` of the exact value; if
    ``best`` leads every other candidate by more than ``2 (e_best + e_r)``, both orders agree.
    """
    x = hidden.float()
    sums = torch.nn.functional.linear(x.abs(), weight.float().abs())  # [B, C]: sum_i |w_ri x_i|, to 2^-24 n
    error = 2 * _summation_bound(x.shape[1]) * (1 + 2.0**-10) * sums
    values = logits.float()
    reach = values + error
    reach.scatter_(1, best[:, None], float("-inf"))
    lead = values.gather(1, best[:, None]) - error.gather(1, best[:, None])
    return bool((lead > reach.amax(dim=-1, keepdim=True)).all())
