"""The int8-screened greedy head (``fastvlm.greedy_head``): the head's own argmax, with fewer bytes read."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch import nn

from fastvlm import native
from fastvlm.greedy_head import GreedyHead, greedy_head_of
from fastvlm.linears import FLOAT16_KERNEL_MAX_ROWS, GemvLinear
from fastvlm.model import FastVLM
from fastvlm.quantization import quantize_decoder
from fastvlm.serve.batch import DecodeBatch
from tests.bench.tiny import tiny_config
from tests.conftest import fixture_path

pytestmark = pytest.mark.skipif(native.int8_kernel() is None, reason="fastvlm's int8 kernel did not build")


def _head(rows: int, width: int, dtype: torch.dtype, *, spread: float = 1.0, seed: int = 0) -> GemvLinear:
    """A head whose rows are a shared direction plus noise of ``spread``: small spreads make near-ties."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(width, generator=gen) * 0.05
    weight = base + spread * 0.05 * torch.randn(rows, width, generator=gen)
    head = GemvLinear(width, rows, bias=False)
    head.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    return head


def _float64_logits(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ head.weight.double().T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spread", [1.0, 0.3])
def test_candidates_hold_every_row_that_can_win(dtype, spread):
    """Whatever the screen ranks first, the exact argmax (and every row tying the head's largest) is a candidate.

    The rows share a direction, so they nearly tie and the int8 screen's own argmax is
    sometimes wrong; the test asserts that happens, so that it tests the bound, not an easy case.
    """
    head = _head(2048, 64, dtype, spread=spread)
    screen = GreedyHead.build(head)
    assert screen is not None
    gen = torch.Generator().manual_seed(1)
    screen_wrong = 0
    with torch.inference_mode():
        for trial in range(60):
            x = (torch.randn(3, 64, generator=gen) * (0.1 + trial)).to(dtype)
            rows = screen.candidates(x)
            assert rows is not None and torch.equal(rows, rows.sort().values)
            exact = _float64_logits(head, x)
            theirs = head(x).float()
            for b in range(3):
                assert int(exact[b].argmax()) in rows.tolist()
                ties = (theirs[b] == theirs[b].max()).nonzero().squeeze(1)
                assert set(ties.tolist()) <= set(rows.tolist())
            screened = screen.screen(x.float())
            screen_wrong += int((screened.argmax(-1) != theirs.argmax(-1)).sum())
    assert screen_wrong > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_bound_holds_where_it_is_nearly_reached(dtype):
    """Hidden states along a row's int8 rounding error make that row's screen error as large as it can be.

    The bound must hold there, and it must be nearly reached (to 90%; 60% in bf16, whose
    output rounding takes a larger share of it), so that a tighter bound would fail this test.
    """
    head = _head(512, 64, dtype, seed=6)
    screen = GreedyHead.build(head)
    errors = head.weight.float() - screen.screen.dequantized(torch.float32)
    rows = torch.arange(0, 512, 37)
    x = (errors[rows] / errors[rows].norm(dim=1, keepdim=True) * 3.0).to(dtype)  # one adversarial row each
    with torch.inference_mode():
        values, bounds = screen.error_bounds(x)
        actual = (head(x).float() - values).abs()
    assert bool((actual <= bounds).all())
    reached = (actual / bounds)[torch.arange(len(rows)), rows]
    assert float(reached.min()) > (0.6 if dtype == torch.bfloat16 else 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_tokens_are_the_full_heads_argmax(dtype, batch):
    head = _head(4096, 128, dtype, spread=0.3, seed=2)
    screen = GreedyHead.build(head)
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for trial in range(40):
            x = (torch.randn(batch, 128, generator=gen) * (1 + trial / 4)).to(dtype)
            assert torch.equal(screen(x), head(x).argmax(-1))
    # fp32: where the top two candidates are closer than their summation error, the full head decides
    assert screen.calls + screen.fallbacks == 40 and screen.calls >= 30


def test_the_full_head_runs_where_the_screen_cannot_narrow_it_down():
    head = _head(1024, 64, torch.float32)
    screen = GreedyHead.build(head)
    half = GreedyHead.build(_head(1024, 64, torch.float16))
    with torch.inference_mode():
        zeros = torch.zeros(2, 64)  # every logit 0: every row a candidate
        assert screen.candidates(zeros) is None
        assert torch.equal(screen(zeros), head(zeros).argmax(-1))
        nan = torch.full((1, 64), float("nan"))
        assert screen.candidates(nan) is None
        huge = torch.full((1, 64), 6e4, dtype=torch.float16)  # logits past fp16's range: ties at infinity
        assert half.candidates(huge) is None and half.candidates(huge / 6e4) is not None
        assert screen.fallbacks == 1  # candidates() alone does not count
        with pytest.raises(ValueError, match=r"expected hidden states \[B, 64\]"):
            screen(torch.zeros(1, 1, 64))


def test_a_head_with_a_nan_weight_is_read_whole():
    head = _head(512, 64, torch.float32)
    with torch.no_grad():
        head.weight[7, 3] = float("nan")
    screen = GreedyHead.build(head)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        assert torch.equal(screen(x), head(x).argmax(-1)) and screen.fallbacks == 1


def test_bf16_batches_past_our_gemv_kernel_read_the_whole_head():
    head = _head(1024, 64, torch.bfloat16)
    screen = GreedyHead.build(head)
    x = torch.randn(FLOAT16_KERNEL_MAX_ROWS + 1, 64).bfloat16()  # F.linear would take these rows
    with torch.inference_mode():
        assert screen.candidates(x) is None
        assert torch.equal(screen(x), head(x).argmax(-1))


def test_reduced_precision_fp32_matmuls_turn_the_screen_off():
    head = _head(512, 64, torch.float32)
    assert GreedyHead.unsupported_reason(head) is None
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # fp32 matmuls in bf16: outside the bound
    try:
        assert "reduced precision" in GreedyHead.unsupported_reason(head)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_heads_it_cannot_stand_in_for_are_named():
    assert "bias" in GreedyHead.unsupported_reason(nn.Linear(64, 100))
    assert "multiple of 16" in GreedyHead.unsupported_reason(nn.Linear(60, 100, bias=False))
    assert "float64" in GreedyHead.unsupported_reason(nn.Linear(64, 100, bias=False).double())
    assert "meta" in GreedyHead.unsupported_reason(nn.Linear(64, 100, bias=False, device="meta"))
    hooked = nn.Linear(64, 100, bias=False)
    hooked.register_forward_hook(lambda *_: None)
    assert "hooks" in GreedyHead.unsupported_reason(hooked)
    with torch.inference_mode():
        frozen = nn.Linear(64, 100, bias=False)
    assert "inference tensor" in GreedyHead.unsupported_reason(frozen)
    assert GreedyHead.build(hooked) is None


def _screen_isas() -> list[str]:
    """The instruction sets the compiled candidates op runs here, from x86-64's baseline up."""
    levels = ["baseline", "avx2", "avx512"]
    return levels[: levels.index(torch.ops.fastvlm_native.screen_candidates_isa()) + 1]


def _candidates_each_way(screen: GreedyHead, x: torch.Tensor, monkeypatch) -> list[torch.Tensor | None]:
    """``screen.candidates(x)`` through the compiled op at each instruction set here, then through ATen ops."""
    op = native.screen_candidates_kernel()
    assert op is not None
    results = []
    with monkeypatch.context() as patch:
        for isa in _screen_isas():
            patch.setattr(native, "screen_candidates_kernel", lambda isa=isa: functools.partial(op, isa=isa))
            results.append(screen.candidates(x))
        patch.setattr(native, "screen_candidates_kernel", lambda: None)
        results.append(screen.candidates(x))
    return results


def _assert_same_rows(results: list[torch.Tensor | None]) -> torch.Tensor | None:
    reference = results[-1]  # the ATen path's
    for rows in results[:-1]:
        assert (rows is None) == (reference is None)
        assert rows is None or (rows.dtype == torch.int64 and torch.equal(rows, reference))
    return reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spread", [1.0, 0.3])
def test_the_compiled_op_picks_the_aten_paths_rows(dtype, spread, monkeypatch):
    """Random heads (near-ties among them), 1-3 rows, scales from 1e-30 (all rows tie at 0: None) to 3e3: the same.

    2003 rows: not a multiple of the op's 64-value steps, so the tails are read too.
    """
    head = _head(2003, 64, dtype, spread=spread, seed=7)
    screen = GreedyHead.build(head)
    gen = torch.Generator().manual_seed(8)
    answered = 0
    with torch.inference_mode():
        for trial in range(45):
            scale = [1e-30, 1e-3, 0.5, 3.0, 40.0, 3e3][trial % 6]
            x = (torch.randn(trial % 3 + 1, 64, generator=gen) * scale).to(dtype)
            rows = _assert_same_rows(_candidates_each_way(screen, x, monkeypatch))
            answered += rows is not None
    assert 15 <= answered < 45  # both outcomes are compared


def test_the_compiled_op_picks_the_aten_paths_rows_for_a_full_size_vocabulary(monkeypatch):
    head = _head(151_936, 64, torch.float32, spread=0.3, seed=9)
    screen = GreedyHead.build(head)
    gen = torch.Generator().manual_seed(10)
    with torch.inference_mode():
        for batch in (1, 2, 3):
            rows = _assert_same_rows(_candidates_each_way(screen, torch.randn(batch, 64, generator=gen), monkeypatch))
            assert rows is not None and 0 < rows.numel() < 2000


def test_the_compiled_op_returns_none_where_the_aten_path_does(monkeypatch):
    fp32 = GreedyHead.build(_head(1024, 64, torch.float32))
    fp16 = GreedyHead.build(_head(1024, 64, torch.float16))
    poisoned = torch.randn(3, 64)
    poisoned[1, 5] = float("nan")
    cases = [
        (fp32, torch.zeros(2, 64)),  # every row a candidate: too many
        (fp32, torch.full((1, 64), float("nan"))),
        (fp32, poisoned),
        (fp32, torch.full((2, 64), float("inf"))),
        (fp32, torch.full((2, 64), 1e20)),  # finite, but ||x|| overflows fp32: every row reaches a lower bound of -inf
        (fp16, torch.full((1, 64), 6e4, dtype=torch.float16)),  # logits past largest_safe
        (fp16, torch.full((1, 64), -6e4, dtype=torch.float16)),  # ... by magnitude
    ]
    with torch.inference_mode():
        for screen, x in cases:
            assert _candidates_each_way(screen, x, monkeypatch) == [None] * (len(_screen_isas()) + 1)


def _crafted(values: torch.Tensor, row_bounds: torch.Tensor) -> GreedyHead:
    """A screen whose int8 product returns ``values`` [B, V] and whose row bounds are ``row_bounds``: exact ties,
    signed zeros and non-finite values the int8 kernel would rarely give, fed to both paths alike."""
    screen = GreedyHead.build(_head(values.shape[1], 64, torch.float32))
    screen.screen = lambda x: values.clone()
    screen.row_bounds, screen.max_row_bound = row_bounds, float(row_bounds.max())
    return screen


def test_a_tie_for_the_largest_value_takes_its_first_index_as_torch_max_does(monkeypatch):
    """The first index's own bound sets the lower bound: rows 5 and 9 tie, and their bounds decide about row 20."""
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0  # scale ~ 1
    values = torch.full((1, 1000), -5.0)
    values[0, [5, 9, 20]] = torch.tensor([1.0, 1.0, 0.7])
    for first_bound, expected in ((0.001, [5, 9]), (0.5, [5, 9, 20])):
        bounds = torch.full((1000,), 0.001)
        bounds[5], bounds[9] = first_bound, 0.501 - first_bound
        screen = _crafted(values, bounds)
        with torch.inference_mode():
            rows = _assert_same_rows(_candidates_each_way(screen, x, monkeypatch))
        assert rows.tolist() == expected
    zeros = torch.full((1, 1000), -5.0)  # -0.0 and +0.0 tie: the first (-0.0) is torch.max's pick
    zeros[0, 300], zeros[0, 700], zeros[0, 800] = -0.0, 0.0, -0.3
    bounds = torch.full((1000,), 0.001)
    bounds[700] = 0.5
    screen = _crafted(zeros, bounds)
    with torch.inference_mode():
        assert _assert_same_rows(_candidates_each_way(screen, x, monkeypatch)).tolist() == [300, 700]


def test_the_candidate_limit_counts_the_prefiltered_rows(monkeypatch):
    """At most 1/8 of the rows (256 of 2048) pass the prefilter, or the full head runs; either side of the limit."""
    x = torch.full((2, 64), 0.125)
    bounds = torch.full((2048,), 0.001)
    for passing, answered in ((256, True), (257, False)):
        values = torch.full((2, 2048), -5.0)
        values[0, :200] = 1.0
        values[1, 2048 - passing + 200 :] = 1.0  # the second row's passing rows add to the first's
        screen = _crafted(values, bounds)
        with torch.inference_mode():
            rows = _assert_same_rows(_candidates_each_way(screen, x, monkeypatch))
        assert (rows is not None) == answered and (rows is None or rows.numel() == passing)


def test_non_finite_screen_values_anywhere_read_the_whole_head(monkeypatch):
    x = torch.randn(2, 64)
    bounds = torch.full((1000,), 0.001)
    for where in (0, 517, 999):  # the first, a middle and the last (past the op's 64-value steps) value
        for bad in (float("nan"), float("inf"), float("-inf")):
            values = torch.randn(2, 1000)
            values[1, where] = bad
            screen = _crafted(values, bounds)
            with torch.inference_mode():
                assert _assert_same_rows(_candidates_each_way(screen, x, monkeypatch)) is None


def test_without_the_compiled_op_the_aten_path_runs(monkeypatch):
    head = _head(1024, 64, torch.float32)
    screen = GreedyHead.build(head)
    x = torch.randn(2, 64)
    calls = []
    reference = GreedyHead._candidates_by_aten
    monkeypatch.setattr(GreedyHead, "_candidates_by_aten", lambda self, h: calls.append(h) or reference(self, h))
    assert native.screen_candidates_kernel() is not None  # built here, so the op answers
    with torch.inference_mode():
        assert torch.equal(screen(x), head(x).argmax(-1)) and calls == []
        monkeypatch.setattr(native, "screen_candidates_kernel", lambda: None)
        assert torch.equal(screen(x), head(x).argmax(-1)) and len(calls) == 1
    assert screen.calls == 2 and screen.fallbacks == 0


@pytest.fixture(scope="module")
def model() -> FastVLM:
    return FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"))


def _golden() -> dict:
    return json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())


def test_fixture_greedy_tokens_come_through_the_screen(model):
    golden = _golden()
    image = fixture_path("apple_fastvlm_tiny", "image.png")
    model.greedy_head = None
    result = model.generate(image=image, prompt=golden["prompt"], max_new_tokens=len(golden["greedy_token_ids"]))
    assert result.token_ids == golden["greedy_token_ids"]
    screen = model.greedy_head
    assert screen is not None and screen.calls == len(golden["greedy_token_ids"]) - 1 and screen.fallbacks == 0


@pytest.mark.parametrize("variant", ["fp32", "bf16", "fp32+int8"])
def test_screened_generation_equals_full_head_generation(variant):
    """A random model with a real-sized vocabulary, a left-padded batch of two, 24 greedy steps each way."""
    config = tiny_config()
    config.text.vocab_size, config.text.hidden_size, config.text.intermediate_size = 20000, 64, 128
    model = FastVLM.from_config(config, dtype=torch.bfloat16 if variant == "bf16" else torch.float32, seed=3)
    if variant.endswith("int8"):
        quantize_decoder(model, "int8", kernel="fastvlm")  # the tied head stays fp32, and screened
    ids = torch.randint(100, 19000, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def run(screened: bool) -> list[list[int]]:
        model.screen_greedy_head = screened
        from fastvlm.generation import generate_tokens

        rows = [token.tolist() for token, _ in generate_tokens(model, ids, mask, max_new_tokens=24)]
        return [list(column) for column in zip(*rows, strict=True)]

    full = run(False)
    assert model.greedy_head is None
    screened = run(True)
    assert screened == full
    assert model.greedy_head.calls == 23 and model.greedy_head.fallbacks == 0


def test_a_changed_head_gets_a_new_screen(model):
    model = copy.deepcopy(model)
    head = model.language_model.lm_head
    first = greedy_head_of(model)
    assert first is not None and greedy_head_of(model) is first
    x = torch.randn(2, head.in_features)
    with torch.inference_mode():
        assert torch.equal(first(x), head(x).argmax(-1))
    hot = int(head(x).argmin(dim=-1)[0])  # a row that wins only once changed
    changes = [
        lambda: head.weight.data.mul_(-1.0),  # through .data: no version bump, seen by the sampled rows
        lambda: head.weight.mul_(0.5),  # in place: bumps the version counter
        lambda: head.weight[hot].copy_(x[0] * 10),  # one row, in place: the version counter again
    ]
    for change in changes:
        with torch.no_grad():
            change()
        screen = greedy_head_of(model)
        assert screen is not None and screen is not first
        with torch.inference_mode():
            assert torch.equal(screen(x), head(x).argmax(-1))
        first = screen
    assert int(screen(x)[0]) == hot  # the changed row is found
    model.screen_greedy_head = False
    assert greedy_head_of(model) is None and model.greedy_head is None  # off: the int8 copy is let go


def test_quantized_or_hooked_heads_are_read_whole(model):
    int8_head = quantize_decoder(copy.deepcopy(model), "int8-head", kernel="fastvlm")
    assert greedy_head_of(int8_head) is None  # the head is already int8
    hooked = copy.deepcopy(model)
    assert greedy_head_of(hooked) is not None
    handle = hooked.language_model.lm_head.register_forward_hook(lambda *_: None)
    assert greedy_head_of(hooked) is None  # a hook added after the screen was built still turns it off
    handle.remove()
    assert greedy_head_of(hooked) is not None


def test_a_served_greedy_batch_steps_through_the_screen(model):
    ids = torch.randint(10, 380, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.inference_mode():
        batches = []
        for _ in range(2):
            batch, logits = DecodeBatch.prefill(model, ids, mask)
            batch.last_tokens = logits.argmax(-1)
            batches.append(batch)
        model.greedy_head = None
        for _ in range(6):
            tokens = batches[0].greedy_step()
            batches[1].last_tokens = batches[1].step().argmax(-1)
            batches[0].last_tokens = tokens
            assert torch.equal(tokens, batches[1].last_tokens)
    assert model.greedy_head is not None and model.greedy_head.calls == 6
