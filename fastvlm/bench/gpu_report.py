"""The GPU benchmark's report as markdown: ceilings, three tables, the issue's targets, notes.

Columns (every latency is a median; see :mod:`fastvlm.bench.gpu` for the protocol):

* latency table, batch 1: ``encoder ms`` tower + projector, eager; ``graph ms`` the same
  replayed as one CUDA graph (launch overhead removed); ``GFLOP`` per image;
  ``TFLOP/s`` achieved by the eager encoder and its share of the measured matmul rate;
  ``prefill ms`` the decoder over the whole prompt (visual tokens given);
  ``TTFT ms`` pixels on the device to the first token, through the generation API.
* decode table: ``tok/s`` greedy decode steps, all rows together; ``bound tok/s`` the
  copy-bandwidth bound and ``of bound`` the share reached; ``peak GiB`` the most GPU
  memory allocated during one generation, weights included.
* static-cache table, batch 1: the generation API, a static cache uncompiled, and the
  same compiled; ``compile s`` the first compiled step; ``same tokens`` the share of
  greedy tokens equal to the uncompiled ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastvlm.measure import machine_line, markdown_table

if TYPE_CHECKING:
    from fastvlm.bench.gpu import GpuReport
    from fastvlm.bench.gpu_common import DecodeRow, LatencyRow

ENCODER_TARGET_MS = 5.0  # issue 15: encoder under 5 ms at 1024 px
TTFT_TARGET_MS = 20.0  # issue 15: FastVLM-0.5B TTFT under 20 ms at 1024 px
BOUND_TARGET = 0.5  # issue 15: batch-1 decode within 2x of the bandwidth bound
TARGET_PX = 1024


def fmt(value: float | None, spec: str = ",.1f", suffix: str = "") -> str:
    """A number for a table cell ('n/a' when it was not measured)."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _percent(value: float | None) -> str:
    return fmt(None if value is None else 100 * value, ".0f", "%")


def latency_table(report: GpuReport) -> str:
    columns = [
        "impl",
        "LLM",
        ">px",
        ">visual tok",
        ">prompt tok",
        ">encoder ms",
        ">graph ms",
        ">GFLOP",
        ">TFLOP/s",
        ">of matmul",
        ">prefill ms",
        ">TTFT ms",
    ]
    cells = [
        [
            r.impl,
            r.llm,
            str(r.resolution),
            str(r.visual_tokens),
            str(r.prompt_tokens),
            fmt(r.encoder_ms, ".2f"),
            fmt(r.encoder_graph_ms, ".2f"),
            fmt(r.encoder_gflops, ",.0f"),
            fmt(r.encoder_tflops_per_s),
            _percent(r.encoder_matmul_fraction),
            fmt(r.prefill_ms, ".2f"),
            fmt(r.ttft_ms, ".2f"),
        ]
        for r in report.latency
    ]
    return markdown_table(columns, cells)


def decode_table(report: GpuReport) -> str:
    columns = [
        "impl",
        "LLM",
        ">px",
        ">batch",
        ">KV tokens",
        ">tok/s",
        ">bound tok/s",
        ">of bound",
        ">peak GiB",
        ">weights GiB",
    ]
    cells = [
        [
            r.impl,
            r.llm,
            str(r.resolution),
            str(r.batch),
            str(r.kv_tokens),
            fmt(r.tokens_per_s, ",.0f"),
            fmt(r.bound_tokens_per_s, ",.0f"),
            _percent(r.bound_fraction),
            fmt(r.peak_gib, ".2f"),
            fmt(r.weights_gib, ".2f"),
        ]
        for r in report.decode
    ]
    return markdown_table(columns, cells)


def compiled_table(report: GpuReport) -> str:
    columns = [
        "LLM",
        "mode",
        ">KV tokens",
        ">API tok/s",
        ">static eager tok/s",
        ">compiled tok/s",
        ">compile s",
        ">speed-up",
        ">of bound",
        ">same tokens",
    ]
    cells = [
        [
            r.llm,
            r.mode or "eager only",
            str(r.kv_tokens),
            fmt(r.generate_tokens_per_s, ",.0f"),
            fmt(r.eager_static_tokens_per_s, ",.0f"),
            fmt(r.compiled_tokens_per_s, ",.0f"),
            fmt(r.compile_s, ".0f"),
            fmt(r.speedup, ".2f", "x"),
            _percent(r.bound_fraction),
            _percent(r.same_tokens),
        ]
        for r in report.compiled_decode
    ]
    return markdown_table(columns, cells)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def target_lines(report: GpuReport) -> list[str]:
    """The issue's targets against our rows: encoder and 0.5B TTFT at 1024 px, batch-1 decode vs its bound."""
    lines = []
    for r in report.latency:
        if r.impl != "fastvlm" or r.resolution != TARGET_PX:
            continue
        timed = [t for t in (r.encoder_ms, r.encoder_graph_ms) if t is not None]
        if timed:
            best = min(timed)
            verdict = _met(best < ENCODER_TARGET_MS)
            lines.append(f"encoder < {ENCODER_TARGET_MS:g} ms ({r.llm} projector): {best:.2f} ms at best, {verdict}")
        if r.llm == "0.5b" and r.ttft_ms is not None:
            lines.append(f"0.5B TTFT < {TTFT_TARGET_MS:g} ms: {r.ttft_ms:.2f} ms, {_met(r.ttft_ms < TTFT_TARGET_MS)}")
    best_fraction: dict[str, float] = {}
    for d in report.decode:
        if d.impl == "fastvlm" and d.batch == 1 and d.bound_fraction is not None:
            best_fraction[d.llm] = max(best_fraction.get(d.llm, 0.0), d.bound_fraction)
    for c in report.compiled_decode:
        if c.bound_fraction is not None:
            best_fraction[c.llm] = max(best_fraction.get(c.llm, 0.0), c.bound_fraction)
    for llm, fraction in best_fraction.items():
        lines.append(
            f"{llm} batch-1 decode within 2x of the bandwidth bound: {100 * fraction:.0f}% of it at best "
            f"(API or compiled), {_met(fraction >= BOUND_TARGET)}"
        )
    return lines


def format_report(report: GpuReport) -> str:
    """The whole report as markdown (what ``gpu_speed.md`` holds)."""
    c = report.ceilings
    title = f"# FastVLM on {c.device_name if c else 'an unmeasured device'}, random weights, {report.settings['dtype']}"
    parts = [title, "", machine_line(report.meta) + f"; transformers {report.meta.get('transformers')}", ""]
    if c:
        parts += [
            f"Ceilings measured in this run: device copy {fmt(c.copy_gb_per_s, ',.0f')} GB/s (bytes read + "
            f"written, {c.copy_mib} MiB buffers); {c.matmul_dtype} matmul {c.matmul_n}^3 "
            f"{fmt(c.matmul_tflops, ',.0f')} TFLOP/s.",
            "",
        ]
    parts += ["## Batch 1: encoder, prefill, TTFT", "", latency_table(report), ""]
    parts += ["## Decode", "", decode_table(report), ""]
    if report.compiled_decode:
        parts += ["## Batch-1 decode with a static KV cache, eager and compiled", "", compiled_table(report), ""]
    parts += ["## Targets (issue 15)", ""] + [f"- {line}" for line in target_lines(report)] + [""]
    rows: list[LatencyRow | DecodeRow] = [*report.latency, *report.decode]
    notes = [f"- {r.impl} {r.llm} {r.resolution} px {key}: {note}" for r in rows for key, note in r.notes.items()]
    notes += [f"- static decode {r.llm} {key}: {note}" for r in report.compiled_decode for key, note in r.notes.items()]
    notes += [f"- ceilings {key}: {note}" for key, note in (c.notes if c else {}).items()]
    notes += [f"- {line}" for line in report.skipped]
    if notes:
        parts += ["## Notes", "", *notes, ""]
    status = "complete" if report.complete else "INCOMPLETE (the run stopped early)"
    parts.append(f"{status}; {report.elapsed_s:.0f} s")
    return "\n".join(parts) + "\n"
