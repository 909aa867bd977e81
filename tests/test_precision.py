"""``dtype="auto"``: precision per stage chosen by measurement, within the quality bound, cached.

Timing-dependent choices are pinned with a fake timer (``tune_precision(timer=...)``), so
no test asserts on wall-clock speed; the forced-slow candidate is timed for real, with a
wait far longer than the tiny model's forward.

Fixture finding (the xfails below): on the tiny fixture models the fp32 logits of the first
answer token have a top-2 margin of 0.0037, while int8 weight-only changes logits by up to
~0.09 (bf16 by ~0.07 but in the harmless direction here). So the int8 decoder, alone or with a
bf16 encoder, changes the first greedy token on this random-weight fixture, from the weights'
rounding alone (it does so with fp32 activations too, on our kernel or the dequantized weight); the quality
bound (top-1 agreement >= 99% on the probe) still admits it on the fixture (99.4%).
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from collections.abc import Callable, Mapping

import pytest
import torch

from fastvlm.errors import ConfigError
from fastvlm.model import FastVLM
from fastvlm.precision import (
    REFERENCE,
    Candidate,
    StageResult,
    apply_precision,
    default_candidates,
    machine_key,
    tune_precision,
)
from fastvlm.precision.cache import CACHE_DIR_ENV, CACHE_FILE
from fastvlm.precision.tune import MIN_SPEEDUP, pick
from tests.conftest import fixture_path

FIXTURES = ("apple_fastvlm_tiny", "hf_fastvlm_tiny")
IMAGE = ("apple_fastvlm_tiny", "image.png")
GOLDEN = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
SLOW_WAIT_S = 0.25  # per forward of the forced-slow candidate; the tiny model's forward takes milliseconds

# (encoder, decoder) paths whose greedy answer on the fixtures differs from fp32's: see the module docstring.
INT8_DECODERS = ("int8", "int8-head", "bf16+int8")
NEAR_TIE_FLIPS = {(e, d) for e in ("fp32", "bf16") for d in INT8_DECODERS}
PATHS = [(e, d) for e in ("fp32", "bf16") for d in ("fp32", "bf16", *INT8_DECODERS) if (e, d) != ("fp32", "fp32")]


@pytest.fixture(scope="module", params=FIXTURES)
def reference(request: pytest.FixtureRequest) -> FastVLM:
    return FastVLM.from_pretrained(fixture_path(request.param))


def _answer(model: FastVLM) -> list[int]:
    result = model.generate(
        image=fixture_path(*IMAGE), prompt=GOLDEN["prompt"], max_new_tokens=len(GOLDEN["greedy_token_ids"])
    )
    return result.token_ids  # type: ignore[union-attr]  # one prompt: one result


def _convert(model: FastVLM, encoder: str, decoder: str) -> FastVLM:
    """A copy of ``model`` with the named default candidates applied (what ``auto`` applies)."""
    by_name = {(c.stage, c.name): c for c in default_candidates()}
    converted = copy.deepcopy(model)
    for stage, name in (("encoder", encoder), ("decoder", decoder)):
        if name != REFERENCE:
            by_name[(stage, name)].apply(converted)
    return converted


def _fake_timer(ms: Mapping[str, float], calls: list[str] | None = None) -> Callable:
    """A timer that calls every function once and reports ``ms`` per candidate name (fp32: 10)."""

    def timer(fns: Mapping[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
        for name, fn in fns.items():
            fn()
            if calls is not None:
                calls.append(name)
        return {name: ms.get(name.split("/")[0], 10.0) for name in fns}

    return timer


# ------------------------------------------------------------------------------ (a) every path


@pytest.mark.parametrize(
    ("encoder", "decoder"),
    [
        pytest.param(
            *path,
            marks=pytest.mark.xfail(strict=True, reason="int8 error > the fixture's 0.0037 first-token margin"),
        )
        if path in NEAR_TIE_FLIPS
        else path
        for path in PATHS
    ],
)
def test_every_precision_path_answers_like_fp32_on_the_fixtures(reference: FastVLM, encoder: str, decoder: str):
    want = _answer(reference)
    assert want == GOLDEN["greedy_token_ids"]
    converted = _convert(reference, encoder, decoder)
    tower_dtype = next(converted.vision_tower.parameters()).dtype
    assert tower_dtype == (torch.bfloat16 if encoder == "bf16" else torch.float32)
    assert converted.quantization == (decoder.removeprefix("bf16+") if "int8" in decoder else None)
    assert _answer(converted) == want


def test_converting_a_stage_copy_leaves_the_reference_alone(reference: FastVLM):
    from fastvlm.precision import stage_copy

    before = {k: v.clone() for k, v in reference.state_dict().items()}
    clone = stage_copy(reference, ["decoder"])
    by_name = {(c.stage, c.name): c for c in default_candidates()}
    by_name[("decoder", "bf16")].apply(clone)
    clone.language_model.lm_head.register_forward_hook(lambda m, i, o: o * 0)
    assert clone.vision_tower is reference.vision_tower  # the other stage is shared, not copied
    assert reference.dtype == torch.float32 and clone.dtype == torch.bfloat16
    assert not reference.language_model.lm_head._forward_hooks
    after = reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------ (b), (c) the choice


def _slow(stage: str) -> Candidate:
    """Exact, but every forward of its stage waits first: admissible and slower than fp32."""

    def apply(model: FastVLM) -> None:
        module = model.projector if stage == "encoder" else model.language_model
        module.register_forward_pre_hook(lambda m, i: time.sleep(SLOW_WAIT_S))

    return Candidate(stage, "slow", apply)


def _inexact(stage: str) -> Candidate:
    """Changes the answer: the decoder's logits rolled by one token, or the visual tokens scrambled."""

    def apply(model: FastVLM) -> None:
        if stage == "decoder":
            model.language_model.lm_head.register_forward_hook(lambda m, i, out: out.roll(1, dims=-1))
        else:
            model.projector.register_forward_hook(lambda m, i, out: out.flip(-1) * 100)

    return Candidate(stage, "inexact", apply)


def _same(stage: str) -> Candidate:
    return Candidate(stage, "same", lambda model: None)


def test_a_slower_candidate_is_not_chosen(reference: FastVLM, tmp_path):
    choice = tune_precision(reference, candidates=[_slow("encoder"), _slow("decoder")], cache_path=tmp_path / "p.json")
    assert (choice.encoder, choice.decoder) == (REFERENCE, REFERENCE)
    slow = [r for r in choice.rows if r.candidate == "slow"]
    assert [r.stage for r in slow] == ["encoder", "decoder"]
    for row in slow:
        assert row.admissible and row.agreement == 1.0 and row.max_logit_diff == 0.0 and row.greedy_match
        assert row.speedup is not None and row.speedup < 1 and not row.chosen


def test_an_inexact_candidate_is_never_chosen_however_fast(reference: FastVLM, tmp_path):
    candidates = [_inexact("encoder"), _inexact("decoder"), _same("encoder"), _same("decoder")]
    timer = _fake_timer({"fp32": 10.0, "same": 5.0, "inexact": 0.1})  # inexact: 100x faster than fp32
    choice = tune_precision(reference, candidates=candidates, cache_path=tmp_path / "p.json", timer=timer)
    assert (choice.encoder, choice.decoder) == ("same", "same")  # the fastest admissible one
    inexact = [r for r in choice.rows if r.candidate == "inexact"]
    assert len(inexact) == 2
    for row in inexact:
        assert not row.admissible and not row.chosen and row.agreement < 0.99 and row.max_logit_diff > 0
        assert row.speedup is not None and row.speedup > 50
    combined = [r for r in choice.rows if r.stage == "combined"]
    assert len(combined) == 1 and combined[0].admissible and combined[0].agreement == 1.0


def test_when_only_inexact_candidates_are_faster_fp32_is_kept(reference: FastVLM, tmp_path):
    timer = _fake_timer({"fp32": 10.0, "inexact": 0.1})
    choice = tune_precision(
        reference, candidates=[_inexact("encoder"), _inexact("decoder")], cache_path=tmp_path / "p.json", timer=timer
    )
    assert (choice.encoder, choice.decoder) == (REFERENCE, REFERENCE)
    assert [r.candidate for r in choice.rows if r.chosen] == [REFERENCE, REFERENCE]


def _row(name: str, ms: float, admissible: bool = True) -> StageResult:
    return StageResult(stage="decoder", candidate=name, ms=ms, speedup=10.0 / ms, admissible=admissible)


def test_pick_takes_the_fastest_admissible_candidate_only_if_it_pays():
    rows = [_row(REFERENCE, 10.0), _row("bf16", 4.0, admissible=False), _row("int8", 6.0), _row("x", 8.0)]
    assert pick(rows) == "int8"
    barely = 10.0 / (MIN_SPEEDUP - 0.01)  # faster than fp32, but by less than the margin
    assert pick([_row(REFERENCE, 10.0), _row("bf16", barely)]) == REFERENCE
    assert pick([_row(REFERENCE, 10.0), _row("bf16", 12.0)]) == REFERENCE


# ------------------------------------------------------------------------------ (d) the cache


def test_the_cache_skips_measurement_until_the_machine_changes_or_a_retune(reference: FastVLM, tmp_path):
    path = tmp_path / "cache" / "precision.json"
    calls: list[str] = []
    tune = lambda **kw: tune_precision(  # noqa: E731
        reference, candidates=[_same("decoder")], cache_path=path, timer=_fake_timer({"same": 5.0}, calls), **kw
    )
    first = tune()
    assert calls and not first.from_cache and first.decoder == "same"
    measured = len(calls)
    second = tune()
    assert len(calls) == measured  # read from the file, not measured
    assert second.from_cache and (second.encoder, second.decoder) == (first.encoder, first.decoder)
    assert second.rows == first.rows and second.key == first.key
    other_machine = {**machine_key(reference.device), "cpu": "another processor"}
    third = tune(machine=other_machine)
    assert len(calls) == 2 * measured and not third.from_cache and third.key != first.key
    tune(force=True)
    assert len(calls) == 3 * measured
    entries = json.loads(path.read_text())["entries"]
    assert set(entries) == {first.key, third.key}  # readable JSON holding measurements and choice
    assert entries[first.key]["decoder"] == "same" and entries[first.key]["rows"][0]["candidate"] == REFERENCE
    assert [p.name for p in path.parent.iterdir()] == ["precision.json"]  # no temporary file left


def test_a_corrupt_cache_file_warns_and_is_measured_again(reference: FastVLM, tmp_path):
    path = tmp_path / "precision.json"
    path.write_text('{"version": 1, "entries": {"trunc')
    calls: list[str] = []
    with pytest.warns(UserWarning, match="corrupt"):
        choice = tune_precision(reference, candidates=[], cache_path=path, timer=_fake_timer({}, calls))
    assert calls and not choice.from_cache
    assert choice.key in json.loads(path.read_text())["entries"]  # rewritten whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tune_precision(reference, candidates=[], cache_path=path).from_cache


def test_tuning_refuses_a_model_that_is_not_fp32(reference: FastVLM, tmp_path):
    with pytest.raises(ConfigError, match="fp32"):
        tune_precision(_convert(reference, "fp32", "bf16"), candidates=[], cache_path=tmp_path / "p.json")


# ------------------------------------------------------------------------------ (e) from_pretrained


def test_from_pretrained_auto_tunes_applies_and_caches_the_choice(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    folder = fixture_path(FIXTURES[0])
    model = FastVLM.from_pretrained(folder, dtype="auto")
    choice = model.precision
    assert choice is not None and not choice.from_cache
    assert (tmp_path / CACHE_FILE).is_file()
    assert {(r.stage, r.candidate) for r in choice.rows} >= {(c.stage, c.name) for c in default_candidates()}
    assert all(r.admissible for r in choice.rows if r.chosen)
    tower_dtype = next(model.vision_tower.parameters()).dtype
    assert tower_dtype == (torch.bfloat16 if choice.encoder == "bf16" else torch.float32)
    assert model.quantization == (choice.decoder.removeprefix("bf16+") if "int8" in choice.decoder else None)
    answer = _answer(model)
    if (choice.encoder, choice.decoder) not in NEAR_TIE_FLIPS:
        assert answer == GOLDEN["greedy_token_ids"]  # fp32's answer
    else:  # the chosen path is applied as tune chose it: the same answer as converting by hand
        assert answer == _answer(_convert(FastVLM.from_pretrained(folder), choice.encoder, choice.decoder))
    again = FastVLM.from_pretrained(folder, dtype="auto")
    assert again.precision is not None and again.precision.from_cache
    assert (again.precision.encoder, again.precision.decoder) == (choice.encoder, choice.decoder)


def test_apply_precision_converts_each_stage_as_chosen(tmp_path):
    folder = fixture_path(FIXTURES[0])
    timer = _fake_timer({})  # everything as fast as fp32
    choice = tune_precision(FastVLM.from_pretrained(folder), cache_path=tmp_path / "p.json", timer=timer)
    assert (choice.encoder, choice.decoder) == (REFERENCE, REFERENCE)
    choice.encoder, choice.decoder = "bf16", "bf16"
    model = apply_precision(FastVLM.from_pretrained(folder), choice)
    assert next(model.vision_tower.parameters()).dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    assert _answer(model) == GOLDEN["greedy_token_ids"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "auto", "quantization": "int8"}, "drop quantization"),
        ({"dtype": "auto", "fuse": False}, "fuse=True"),
        ({"dtype": "fp32"}, "torch dtype or 'auto'"),
    ],
)
def test_from_pretrained_rejects_auto_with_conflicting_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FastVLM.from_pretrained(fixture_path(FIXTURES[0]), **kwargs)


def test_int8_is_a_candidate_on_cpu_without_torchao_and_elsewhere_only_with_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    on_cpu = {(c.stage, c.name) for c in default_candidates("cpu")}
    on_gpu = {(c.stage, c.name) for c in default_candidates("meta")}  # any device that is not the CPU
    assert {("decoder", "int8"), ("decoder", "int8-head"), ("decoder", "bf16+int8")} <= on_cpu
    assert on_gpu == {("encoder", "bf16"), ("decoder", "bf16")}
