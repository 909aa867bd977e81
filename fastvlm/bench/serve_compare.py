"""Serving engines side by side: one load test against each, one table (``benchmarks/vllm_vs_fastvlm.py``).

Each engine's run is the ``serve_load.json`` that ``fastvlm bench-serve`` wrote for it
(its levels and meta); the same seeded workload went to each, so the rows compare the
servers and nothing else. The table has a row per engine and number of clients: requests
answered, errors, requests/s, output tokens/s, p50/p99 time to first token, p50
end-to-end latency, and the tokens per answer (equal across engines when the requests
asked for ``ignore_eos``, as the comparison script does).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastvlm.measure import machine_line, markdown_table

COMPARISON_NAME = "vllm_vs_fastvlm"
COLUMNS = ["engine", ">clients", ">requests", ">ok", ">errors", ">req/s", ">out tok/s", ">TTFT p50 ms"]
COLUMNS += [">TTFT p99 ms", ">e2e p50 ms", ">tok/answer"]


def read_run(path: Path) -> dict[str, Any]:
    """A ``serve_load.json``: {"meta": ..., "levels": [...]}."""
    run = json.loads(path.read_text())
    if not isinstance(run, dict) or "levels" not in run or "meta" not in run:
        raise ValueError(f"{path} is not a serve_load.json of fastvlm bench-serve (no levels or meta)")
    return run


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def comparison_rows(runs: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """One row per engine and level, engines in the order given."""
    rows = []
    for engine, run in runs.items():
        for level in run["levels"]:
            errors = sum(level["errors"].values())
            limit = " (time limit)" if level.get("stopped_by_time_limit") else ""
            rows.append(
                [
                    engine,
                    str(level["clients"]),
                    f"{level['requests']}{limit}",
                    str(level["ok"]),
                    str(errors),
                    _fmt(level["requests_per_s"], 2),
                    _fmt(level["output_tokens_per_s"], 1),
                    _fmt(level["ttft_p50_ms"]),
                    _fmt(level["ttft_p99_ms"]),
                    _fmt(level["e2e_p50_ms"]),
                    _fmt(level["mean_completion_tokens"], 1),
                ]
            )
    return rows


def comparison_markdown(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The report: the settings both runs shared, the machine, the table, each run's load averages."""
    first = next(iter(runs.values()))["meta"]
    eos = ", ignore_eos" if first.get("ignore_eos") else ""
    lines = [
        "# Serving engines side by side",
        "",
        f"Model {first.get('model', '?')}, {first.get('image_size')} px images "
        f"({first.get('shared_image_fraction', 0):.0%} shared), max_tokens {first.get('max_tokens')}{eos}, greedy, "
        f"streamed; the same seeded requests to each engine. Machine: {machine_line(first)}.",
        "",
        markdown_table(COLUMNS, comparison_rows(runs)),
        "",
    ]
    for engine, run in runs.items():
        meta = run["meta"]
        before, after = meta.get("load_average_before"), meta.get("load_average_after")
        loads = f"load average {_loads(before)} before, {_loads(after)} after" if before and after else ""
        flags = [*(meta.get("serve_args") or []), *(["--", *meta["vllm_args"]] if meta.get("vllm_args") else [])]
        lines.append(f"- {engine}: fastvlm serve flags {' '.join(flags) or '(none)'}; {loads}")
    return "\n".join(lines) + "\n"


def _loads(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def comparison_payload(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON written beside the table: each engine's run as it was."""
    return {"engines": list(runs), "runs": dict(runs)}
