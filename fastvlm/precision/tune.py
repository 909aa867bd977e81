"""Choosing, caching and applying the precision of each stage (see :mod:`fastvlm.precision`)."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastvlm.errors import ConfigError
from fastvlm.measure import markdown_table
from fastvlm.precision.cache import (
    default_cache_path,
    entry_key,
    machine_key,
    model_key,
    read_cache,
    write_cache,
)
from fastvlm.precision.candidates import REFERENCE, STAGES, Candidate, converted, default_candidates
from fastvlm.precision.quality import (
    MIN_AGREEMENT,
    PROBE_GREEDY_TOKENS,
    PROBE_PROMPTS,
    PROBE_SEED,
    PROBE_TOKENS_AFTER_IMAGE,
    Quality,
    check_quality,
    make_probe,
)
from fastvlm.precision.timing import ANSWER_TOKENS, Timer, default_timer, stage_timings

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

logger = logging.getLogger(__name__)

MIN_SPEEDUP = 1.05  # a lower precision must be at least this much faster than fp32 to be chosen
COMBINED = "combined"  # the table's stage for both chosen candidates together


@dataclass
class StageResult:
    """One row of the tuning table: a candidate's speed and quality."""

    stage: str  # "encoder", "decoder", or "combined" (both chosen lower precisions together)
    candidate: str
    ms: float | None  # encoder: one image; decoder: prefill + ANSWER_TOKENS x decode; combined: not timed
    prefill_ms: float | None = None
    decode_ms: float | None = None  # per token
    speedup: float | None = None  # fp32's ms / this ms
    agreement: float = 1.0  # next-token top-1 agreement with fp32 on the probe
    max_logit_diff: float = 0.0  # max |logit - fp32 logit| on the probe
    greedy_match: bool = True  # its own greedy continuation of the probe equals fp32's
    admissible: bool = True
    chosen: bool = False


@dataclass
class PrecisionChoice:
    """The candidate chosen per stage, with the measurements behind it (what the cache stores)."""

    encoder: str
    decoder: str
    rows: list[StageResult]
    machine: dict[str, Any]
    model: dict[str, Any]
    settings: dict[str, Any]
    measured_at: str
    key: str = ""
    from_cache: bool = False
    cache_path: str | None = None

    def describe(self) -> str:
        source = f"cached in {self.cache_path}" if self.from_cache else "measured"
        return f"encoder {self.encoder}, decoder {self.decoder} ({source}, {self.measured_at})"

    def to_json(self) -> dict[str, Any]:
        """The cache entry: everything but where it came from."""
        data = dataclasses.asdict(self)
        for name in ("key", "from_cache", "cache_path"):
            data.pop(name)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, key: str, cache_path: Path) -> PrecisionChoice:
        stored = {f.name for f in dataclasses.fields(cls)} - {"key", "from_cache", "cache_path", "rows"}
        rows = [StageResult(**row) for row in data["rows"]]
        return cls(**{k: data[k] for k in stored}, rows=rows, key=key, from_cache=True, cache_path=str(cache_path))

    def table(self) -> str:
        """The rows as a markdown table: times, speed-up, agreement, max logit diff, admissible, chosen."""
        columns = ["stage", "candidate", ">ms", ">prefill ms", ">decode ms/token", ">speed-up vs fp32"]
        columns += [">top-1 agreement", ">max logit diff", "greedy = fp32", "admissible", "chosen"]
        rows = [
            [
                r.stage,
                r.candidate,
                _fmt(r.ms, ".1f"),
                _fmt(r.prefill_ms, ".1f"),
                _fmt(r.decode_ms, ".2f"),
                _fmt(r.speedup, ".2f", "x"),
                f"{100 * r.agreement:.1f}%",
                f"{r.max_logit_diff:.3g}",
                "yes" if r.greedy_match else "no",
                "yes" if r.admissible else "no",
                "**yes**" if r.chosen else "",
            ]
            for r in self.rows
        ]
        return markdown_table(columns, rows)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def measure_precision(
    model: FastVLM,
    candidates: Sequence[Candidate],
    *,
    timer: Timer = default_timer,
    min_agreement: float = MIN_AGREEMENT,
) -> tuple[dict[str, str], list[StageResult]]:
    """Probe and time every candidate on ``model`` (fp32): the choice per stage, and the table rows."""
    _check_reference(model)
    probe = make_probe(model)
    rows: list[StageResult] = []
    choice: dict[str, str] = {}
    for stage in STAGES:
        models: dict[str, FastVLM] = {REFERENCE: model}
        quality: dict[str, Quality | None] = {REFERENCE: None}
        for candidate in (c for c in candidates if c.stage == stage):
            models[candidate.name] = converted(model, [candidate])
            quality[candidate.name] = check_quality(models[candidate.name], probe, min_agreement)
        timings = stage_timings(stage, models, probe.pixel_values[:1], timer)
        del models  # the stage's copies: free them before the next stage's
        base = timings[REFERENCE]["ms"]
        stage_rows = [_row(stage, name, timings[name], base, quality[name]) for name in quality]
        choice[stage] = pick(stage_rows)
        rows += stage_rows
    if all(name != REFERENCE for name in choice.values()):  # both stages leave fp32: probe them together
        by_name = {(c.stage, c.name): c for c in candidates}
        both = check_quality(converted(model, [by_name[(s, choice[s])] for s in STAGES]), probe, min_agreement)
        rows.append(_row(COMBINED, " + ".join(choice[s] for s in STAGES), None, None, both))
        if not both.admissible:  # keep the stage that saves more time
            saved = {s: _ms(rows, s, REFERENCE) - _ms(rows, s, choice[s]) for s in STAGES}
            choice[min(saved, key=lambda s: saved[s])] = REFERENCE
    for row in rows:
        row.chosen = choice.get(row.stage) == row.candidate
    return choice, rows


def _row(
    stage: str, name: str, timing: Mapping[str, float] | None, base: float | None, quality: Quality | None
) -> StageResult:
    timing = timing or {}
    speedup = base / timing["ms"] if base is not None and timing else None
    row = StageResult(stage=stage, candidate=name, ms=timing.get("ms"), speedup=speedup)
    row.prefill_ms, row.decode_ms = timing.get("prefill_ms"), timing.get("decode_ms")
    if quality is not None:  # None: the fp32 reference itself
        row.agreement, row.max_logit_diff = quality.agreement, quality.max_logit_diff
        row.greedy_match, row.admissible = quality.greedy_match, quality.admissible
    return row


def pick(rows: Sequence[StageResult]) -> str:
    """The fastest admissible candidate of one stage if it beats fp32 by ``MIN_SPEEDUP``, else fp32.

    The margin keeps timing noise on a shared machine from trading accuracy for nothing.
    """
    timed = [r for r in rows if r.admissible and r.ms is not None]
    best = min(timed, key=lambda r: r.ms if r.ms is not None else float("inf"))
    return best.candidate if (best.speedup or 0.0) >= MIN_SPEEDUP else REFERENCE


def _ms(rows: Sequence[StageResult], stage: str, name: str) -> float:
    return next(r.ms or 0.0 for r in rows if r.stage == stage and r.candidate == name)


def _check_reference(model: FastVLM) -> None:
    if model.dtype != torch.float32 or model.quantization is not None:
        form = f"{model.dtype}" + (f", quantized {model.quantization}" if model.quantization else "")
        raise ConfigError(f"precision tuning starts from the fp32 model, its reference; this one is {form}")


def tune_precision(
    model: FastVLM,
    *,
    candidates: Sequence[Candidate] | None = None,
    cache_path: str | os.PathLike | None = None,
    force: bool = False,
    machine: Mapping[str, Any] | None = None,
    timer: Timer = default_timer,
    min_agreement: float = MIN_AGREEMENT,
) -> PrecisionChoice:
    """The precision per stage for ``model`` (fp32, as loaded) on this machine: cached, else measured.

    ``force`` measures again and replaces the cache entry. ``machine`` replaces this
    machine's key (:func:`~fastvlm.precision.cache.machine_key`) and ``timer`` the timing
    function: tests use both. ``model`` is left as it is; :func:`apply_precision` converts it.
    """
    candidates = default_candidates(model.device) if candidates is None else list(candidates)
    for c in candidates:
        if c.stage not in STAGES or c.name == REFERENCE:
            raise ConfigError(f"candidate {c.stage}/{c.name}: the stage must be one of {STAGES}, the name not fp32")
    _check_reference(model)
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    machine = dict(machine) if machine is not None else machine_key(model.device)
    described = model_key(model)
    settings = {
        "candidates": sorted(f"{c.stage}/{c.name}" for c in candidates),
        "min_agreement": min_agreement,
        "min_speedup": MIN_SPEEDUP,
        "answer_tokens": ANSWER_TOKENS,
        "probe": [PROBE_SEED, PROBE_PROMPTS, PROBE_TOKENS_AFTER_IMAGE, PROBE_GREEDY_TOKENS],
    }
    key = entry_key(machine, described, settings)
    entry = read_cache(path).get(key)
    if entry is not None and not force:
        try:
            return PrecisionChoice.from_json(entry, key=key, cache_path=path)
        except (KeyError, TypeError) as err:
            warnings.warn(f"precision cache {path}: entry {key} is malformed ({err!r}); measuring again", stacklevel=2)
    choice, rows = measure_precision(model, candidates, timer=timer, min_agreement=min_agreement)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = PrecisionChoice(
        encoder=choice["encoder"],
        decoder=choice["decoder"],
        rows=rows,
        machine=machine,
        model=described,
        settings=settings,
        measured_at=now,
        key=key,
        cache_path=str(path),
    )
    entries = read_cache(path)  # read again: another process may have added entries meanwhile
    entries[key] = result.to_json()
    write_cache(path, entries)
    return result


def apply_precision(model: FastVLM, choice: PrecisionChoice, candidates: Sequence[Candidate] | None = None) -> FastVLM:
    """Convert ``model`` in place to ``choice``'s precision per stage; sets ``model.precision``."""
    candidates = default_candidates(model.device) if candidates is None else list(candidates)
    by_name = {(c.stage, c.name): c for c in candidates}
    for stage in STAGES:
        name = getattr(choice, stage)
        if name == REFERENCE:
            continue
        if (stage, name) not in by_name:
            raise ConfigError(f"the chosen {stage} precision {name!r} is not available here; tune again (--retune)")
        by_name[(stage, name)].apply(model)
    model.precision = choice
    return model


def auto_precision(
    model: FastVLM,
    *,
    cache_path: str | os.PathLike | None = None,
    force: bool = False,
    candidates: Sequence[Candidate] | None = None,
) -> FastVLM:
    """``dtype="auto"``: tune (or read the cache), convert ``model`` to the choice and log it in one line."""
    choice = tune_precision(model, candidates=candidates, cache_path=cache_path, force=force)
    apply_precision(model, choice, candidates)
    logger.info("dtype=auto: %s", choice.describe())
    return model
