"""The records of :mod:`fastvlm.bench.limits` and what is made of them: the median and spread of
each fraction over rounds, the markdown report and the JSON file."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastvlm.bench.gpu_common import TINY
from fastvlm.measure import machine_line, markdown_table

REPORT_JSON = "limits.json"
REPORT_MD = "limits.md"
MATMUL = "matmul"
READ = "read"
FLOOR = "floor"  # a decode step of the decoder's depth and heads with tiny weights: ms, not a rate
STAGES = ("encoder", "prefill", "decode")
READ_DTYPE = "fp32"  # the read buffer's dtype (the bandwidth does not depend on it)


def limit_key(stage: str, dtype: str) -> tuple[str, str]:
    """The ceiling a stage is held against: the matmul rate of its dtype, or the read bandwidth."""
    return (READ, READ_DTYPE) if stage == "decode" else (MATMUL, dtype)


# ------------------------------------------------------------------------------ records


@dataclass
class Sample:
    """One measurement of one round: a ceiling or a stage."""

    round: int
    device: str
    stage: str  # "matmul", "read" or "floor" (ceilings), "encoder", "prefill" or "decode"
    dtype: str
    resolution: int | None  # stages only
    tokens: int | None  # encoder: visual tokens; prefill: prompt tokens; decode: KV length
    work: float  # FLOPs (matmul, encoder, prefill) or bytes (read, decode) per call
    ms: float
    per_s: float  # work / time
    limit_per_s: float | None = None  # the same round's ceiling (stages only)
    fraction: float | None = None  # per_s / limit_per_s
    floor_ms: float | None = None  # decode only: the same round's step floor in this dtype


@dataclass
class CeilingRow:
    """A ceiling over the rounds."""

    device: str
    kind: str  # "matmul", "read" or "floor"
    dtype: str
    work: float  # FLOPs, bytes, or 1 (a step)
    median_ms: float
    per_s: float  # median over the rounds
    min_per_s: float
    max_per_s: float


@dataclass
class StageRow:
    """A stage at one resolution and dtype over the rounds; rates and fractions are medians."""

    device: str
    stage: str
    resolution: int
    dtype: str
    tokens: int
    work: float  # FLOPs or bytes per call
    median_ms: float
    per_s: float
    limit: str  # "matmul" or "read"
    limit_per_s: float
    fraction: float
    min_fraction: float
    max_fraction: float
    tokens_per_s: float | None = None  # decode only
    bound_tokens_per_s: float | None = None  # decode only: the step's bytes at the read bandwidth
    floor_bound_tokens_per_s: float | None = None  # decode only: those bytes plus the step floor


@dataclass
class LimitsReport:
    meta: dict
    settings: dict
    ceilings: list[CeilingRow] = field(default_factory=list)
    rows: list[StageRow] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


# ------------------------------------------------------------------------------ summary and report


def summarize(samples: list[Sample]) -> tuple[list[CeilingRow], list[StageRow]]:
    """Ceilings and stages over the rounds: medians, and the min-max of each rate or fraction."""
    groups: dict[tuple[str, str, str, int | None], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.device, s.stage, s.dtype, s.resolution), []).append(s)
    ceilings, rows = [], []
    for (device, stage, dtype, resolution), group in groups.items():
        rates = [s.per_s for s in group]
        ms = statistics.median(s.ms for s in group)
        if resolution is None:
            ceilings.append(
                CeilingRow(
                    device=device,
                    kind=stage,
                    dtype=dtype,
                    work=group[0].work,
                    median_ms=ms,
                    per_s=statistics.median(rates),
                    min_per_s=min(rates),
                    max_per_s=max(rates),
                )
            )
            continue
        fractions = [s.fraction for s in group if s.fraction is not None]
        limits = [s.limit_per_s for s in group if s.limit_per_s is not None]
        row = StageRow(
            device=device,
            stage=stage,
            resolution=resolution,
            dtype=dtype,
            tokens=group[0].tokens or 0,
            work=group[0].work,
            median_ms=ms,
            per_s=statistics.median(rates),
            limit=limit_key(stage, dtype)[0],
            limit_per_s=statistics.median(limits),
            fraction=statistics.median(fractions),
            min_fraction=min(fractions),
            max_fraction=max(fractions),
        )
        if stage == "decode":
            row.tokens_per_s = statistics.median(1e3 / s.ms for s in group)
            row.bound_tokens_per_s = statistics.median(limit / s.work for s, limit in zip(group, limits, strict=True))
            step_s = [
                s.work / limit + s.floor_ms / 1e3
                for s, limit in zip(group, limits, strict=True)
                if s.floor_ms is not None
            ]
            row.floor_bound_tokens_per_s = statistics.median(1 / t for t in step_s) if step_s else None
        rows.append(row)
    return ceilings, rows


def _num(value: float) -> str:
    """Three significant figures, thousands separated."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _rate(kind: str, per_s: float) -> str:
    if kind == FLOOR:
        return f"{_num(per_s)} steps/s"
    return f"{_num(per_s / 1e9)} GB/s" if kind == READ else f"{_num(per_s / 1e9)} GFLOP/s"


def _work(kind: str, work: float) -> str:
    return {MATMUL: f"{_num(work / 1e9)} GFLOP", READ: f"{_num(work / 1e6)} MB", FLOOR: "1 step"}[kind]


def _range(kind: str, low: float, high: float) -> str:
    scale = 1 if kind == FLOOR else 1e9
    return f"{_num(low / scale)}–{_num(high / scale)}"


def _percent(row: StageRow) -> str:
    return f"{_num(100 * row.fraction)}% ({_num(100 * row.min_fraction)}–{_num(100 * row.max_fraction)}%)"


def format_report(report: LimitsReport) -> str:
    """The report as markdown: a header naming the machine, the ceilings, then the stages."""
    s = report.settings
    ceiling_names = {
        MATMUL: f"matmul {s['matmul_n']}²",
        READ: f"read (sum over {s['buffer_mib']} MiB)",
        FLOOR: "decode step floor (same depth and heads, tiny weights)",
    }
    ceilings = [
        [
            c.device,
            ceiling_names[c.kind],
            c.dtype,
            _work(c.kind, c.work),
            f"{c.median_ms:,.1f}",
            _rate(c.kind, c.per_s),
            _range(c.kind, c.min_per_s, c.max_per_s),
        ]
        for c in report.ceilings
    ]
    stages = [
        [
            r.device,
            r.stage,
            str(r.resolution),
            r.dtype,
            str(r.tokens),
            f"{_num(r.work / 1e6)} MB/step" if r.limit == READ else f"{_num(r.work / 1e9)} GFLOP",
            f"{r.median_ms:,.1f}",
            _rate(r.limit, r.per_s),
            f"{r.limit} {_rate(r.limit, r.limit_per_s)}",
            _percent(r),
            "" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}",
            "" if r.bound_tokens_per_s is None else f"{r.bound_tokens_per_s:.1f}",
            "" if r.floor_bound_tokens_per_s is None else f"{r.floor_bound_tokens_per_s:.1f}",
        ]
        for r in report.rows
    ]
    model = "tiny smoke model" if s["llm"] == TINY else f"FastVLM-{s['llm'].upper()}"
    header = [
        f"# {model} against this machine's limits (random weights, batch 1)",
        "",
        f"{machine_line(report.meta)}, transformers {report.meta['transformers']}.",
        f"{s['rounds']} rounds, one after another (ceilings included); in each, a ceiling, encoder or prefill is the "
        f"median of {s['repeats']} calls after {s['warmup']} warm-up, decode the median of {s['decode_steps']} steps "
        f"after {s['decode_warmup']}. Prompt: {s['text_tokens']} text tokens + the visual tokens. Fractions are "
        "taken within a round: median over rounds (min–max). Bound tok/s: the decode step's bytes at the read "
        "bandwidth; with floor: plus the decode step floor, what a step of the same depth and heads costs with "
        "tiny weights (Python, small ops, attention over the same KV length).",
        "",
        "## Ceilings",
        "",
        markdown_table(["device", "ceiling", "dtype", ">work", ">median ms", ">rate", ">min–max"], ceilings),
        "",
        "## Stages",
        "",
        markdown_table(
            [
                "device",
                "stage",
                ">px",
                "dtype",
                ">tokens",
                ">work",
                ">median ms",
                ">achieved",
                "limit",
                ">fraction",
                ">tok/s",
                ">bound tok/s",
                ">with floor",
            ],
            stages,
        ),
    ]
    return "\n".join(header) + "\n"


def write_report(report: LimitsReport, out_dir: str | Path) -> list[Path]:
    """``limits.json`` (meta, settings, ceilings, rows, every round's samples) and ``limits.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {out / REPORT_JSON: json.dumps(asdict(report), indent=2) + "\n", out / REPORT_MD: format_report(report)}
    for path, text in files.items():
        path.write_text(text)
    return list(files)
