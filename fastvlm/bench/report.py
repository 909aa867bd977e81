"""Writing the efficiency study: results.json, a markdown report and the paper's three figures.

Figures (PNG, matplotlib's non-interactive backend):
  fig3_latency_vs_resolution.png  encoder latency vs input side (the paper's Fig. 3)
  fig2_ttft_breakdown.png         vision + prefill stacked, by side (Fig. 2 / Fig. 5)
  fig4_ttft_vs_accuracy.png       measured TTFT vs *published* Avg-5, with the Pareto front (Fig. 4)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fastvlm.bench.baselines import ENCODERS
from fastvlm.bench.paper import PUBLISHED_AVG5, PUBLISHED_TTFT_MS
from fastvlm.bench.study import LONG_CALL_S, StudyResults

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURE_DPI = 130
# One marker per LLM in the accuracy figure.
LLM_MARKERS = {"qwen2-0.5b": "o", "qwen2-1.5b": "s", "qwen2-7b": "D", "vicuna-7b": "^"}
MEASURED_COLOR, PAPER_COLOR = "C0", "C7"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _side(resolution: int, tiles: int) -> str:
    return f"{resolution} (2x2+global)" if tiles > 1 else str(resolution)


def markdown_report(results: StudyResults) -> str:
    """results.md: the machine, then encoders, prefill, TTFT and the paper's ratios as tables."""
    m = results.meta
    machine = f"Machine: {m.get('cpu', '?')}" + (f", {m['gpu']}" if m.get("gpu") else "")
    lines = [
        "# FastVLM efficiency study",
        "",
        machine + f"; device {m['device']}, {m['dtype']}, torch {m.get('torch', '?')}, {m.get('cpu_threads', '?')} "
        f"CPU threads; median of {m['repeats']} run(s) after a warm-up (a call over {LONG_CALL_S:g} s is timed "
        "once); random weights of the published architectures.",
        "Paper columns: the paper's M1 Max measurements (Core ML on the Neural Engine for encoders, MLX fp16 for "
        "the LLM). Different hardware: compare ratios, not milliseconds. Prefill covers the visual tokens only, "
        "as in the paper.",
        "",
        "## Encoders",
        "",
        "| encoder | side | input px | tokens | params (M) | published (M) | GFLOPs | latency ms "
        "| MiB added by a call | paper ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results.encoders:
        lines.append(
            f"| {e.label} | {_side(e.resolution, e.tiles)} | {e.input_px} | {e.tokens} | {e.params_m:.1f} | "
            f"{_fmt(e.published_params_m)} | {e.gflops:,.1f} | {e.latency_ms:,.1f} | {_fmt(e.peak_mb, 0)} | "
            f"{_fmt(e.paper_latency_ms)}{f' ({e.paper_source})' if e.paper_latency_ms else ''} |"
        )
    if results.prefill:
        lines += [
            "",
            "## LLM prefill (visual tokens only)",
            "",
            "| LLM | dtype | tokens | prefill ms | paper ms |",
            "|---|---|---:|---:|---:|",
        ]
        for p in results.prefill:
            lines.append(f"| {p.llm} | {p.dtype} | {p.tokens} | {p.prefill_ms:,.1f} | {_fmt(p.paper_prefill_ms)} |")
    if results.ttft:
        lines += [
            "",
            "## Time to first token = vision + prefill",
            "",
            "| encoder | side | LLM | tokens | vision ms | prefill ms | TTFT ms | paper TTFT ms | published Avg-5 |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for t in results.ttft:
            avg5 = f"{t.published_avg5:.1f} ({t.avg5_source})" if t.published_avg5 is not None else "–"
            lines.append(
                f"| {ENCODERS[t.encoder].label} | {_side(t.resolution, t.tiles)} | {t.llm} | {t.tokens} | "
                f"{t.vision_ms:,.1f} | {t.prefill_ms:,.1f} | {t.ttft_ms:,.1f} | {_fmt(t.paper_ttft_ms, 0)} | {avg5} |"
            )
    lines += [
        "",
        "## The paper's ratios next to ours",
        "",
        "| claim | ours | paper | paper source | note |",
        "|---|---:|---:|---|---|",
    ]
    for r in results.ratios:
        lines.append(
            f"| {r.claim} | {_fmt(r.ours, 2)}{'x' if r.ours else ''} | {r.paper:.2f}x | {r.source} | {r.note} |"
        )
    lines += [
        "",
        "Tiled rows (AnyRes 2x2 + global view) run the 5 views as one batch of 5; the paper ran 5 passes. "
        "The paper's ConvNeXt-L numbers at 768/1024/1536 px are ConvLLaVA's 5-stage (stride 64) network, "
        "not the stride-32 ConvNeXt-L of Tab. 4 built here, so they are not compared.",
    ]
    if results.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in results.skipped]
    lines += [
        "",
        "Avg-5 (mean of GQA, TextVQA, POPE, DocVQA, SeedBench-I) is the paper's published accuracy, not measured here.",
    ]
    return "\n".join(lines) + "\n"


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with lower TTFT and higher accuracy, by increasing TTFT."""
    front, best = [], float("-inf")
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_figures(results: StudyResults, out: Path) -> list[Path]:
    """The paper's figures 3, 2 (when TTFT was measured) and 4 as PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")

    device = f"{results.meta['device']}, {results.meta['dtype']}"
    written = [_save(_latency_figure(results, device), out / "fig3_latency_vs_resolution.png")]
    if results.ttft:
        written.append(_save(_ttft_breakdown_figure(results, device), out / "fig2_ttft_breakdown.png"))
    written.append(_save(_accuracy_figure(results, device), out / "fig4_ttft_vs_accuracy.png"))
    return written


def _latency_figure(results: StudyResults, device: str) -> Figure:
    """Fig. 3: latency vs resolution per encoder."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(e.encoder for e in results.encoders):
        rows = sorted((e.resolution, e.latency_ms) for e in results.encoders if e.encoder == name and e.tiles == 1)
        ax.plot([r for r, _ in rows], [ms for _, ms in rows], marker="o", label=ENCODERS[name].label)
    ax.set_xlabel("input resolution (px per side)")
    ax.set_ylabel("encoder latency (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"Encoder latency vs resolution ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def _ttft_breakdown_figure(results: StudyResults, device: str) -> Figure:
    """Fig. 2: vision / prefill breakdown of TTFT by resolution, one panel per encoder (first LLM measured)."""
    import matplotlib.pyplot as plt

    llm = results.ttft[0].llm
    ttft = [t for t in results.ttft if t.llm == llm]
    encoders = list(dict.fromkeys(t.encoder for t in ttft))
    fig, axes = plt.subplots(1, len(encoders), figsize=(4.2 * len(encoders), 4.5), squeeze=False)
    for ax, name in zip(axes[0], encoders, strict=True):
        mine = sorted((t for t in ttft if t.encoder == name), key=lambda t: (t.tiles, t.resolution))
        labels = [_side(t.resolution, t.tiles) for t in mine]
        vision = [t.vision_ms for t in mine]
        prefill = [t.prefill_ms for t in mine]
        ax.bar(labels, vision, color="C0", label="vision encoding")
        ax.bar(labels, prefill, bottom=vision, color="C1", label=f"{llm} prefill")
        for k, t in enumerate(mine):
            ax.annotate(f"{t.tokens} tok", (k, t.ttft_ms), ha="center", va="bottom", fontsize=7)
        ax.set_title(ENCODERS[name].label)
        ax.set_xlabel("input resolution (px per side)")
        ax.set_ylabel("time to first token (ms)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"TTFT breakdown: vision + {llm} prefill ({device})")
    return fig


def _accuracy_figure(results: StudyResults, device: str) -> Figure:
    """Fig. 4: TTFT vs published accuracy, Pareto fronts; measured here (filled) and the paper's own (hollow)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    measured = [
        (t.ttft_ms, t.published_avg5, t.recipe, t.encoder, t.resolution, t.llm)
        for t in results.ttft
        if t.published_avg5 is not None
    ]
    paper = [
        (ms, PUBLISHED_AVG5[key][2], PUBLISHED_AVG5[key][1], *key)
        for key, ms in PUBLISHED_TTFT_MS.items()
        if key in PUBLISHED_AVG5
    ]
    _plot_series(ax, paper, filled=False, color=PAPER_COLOR)
    _plot_series(ax, measured, filled=True, color=MEASURED_COLOR)
    _accuracy_axes(ax, device)
    return fig


def _plot_series(ax: Axes, series: list[tuple], *, filled: bool, color: str) -> None:
    """Points (ms, accuracy, recipe, encoder, side, LLM) with their labels, and one Pareto front per recipe."""
    for ms, acc, _, enc, res, llm in series:
        ax.scatter(
            ms, acc, marker=LLM_MARKERS.get(llm, "o"), s=48, facecolors=color if filled else "none", edgecolors=color
        )
        label = f"{ENCODERS[enc].label if enc in ENCODERS else enc}@{res}"
        ax.annotate(label, (ms, acc), fontsize=6.5, xytext=(4, 3), textcoords="offset points", color=color)
    for recipe in {r for _, _, r, *_ in series}:  # accuracies are comparable within one training recipe only
        front = _pareto([(ms, acc) for ms, acc, r, *_ in series if r == recipe])
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color=color, linestyle="--" if filled else ":", linewidth=1)


def _accuracy_axes(ax: Axes, device: str) -> None:
    """Fig. 4's log TTFT axis, labels, title and legend."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("Avg-5 accuracy as PUBLISHED in the paper (%)")
    ax.set_title(
        "TTFT vs accuracy per (encoder@resolution, LLM); accuracy: published, not measured\n"
        "Pareto fronts per training recipe (Vicuna-7B: LLaVA-1.5 recipe; Qwen2: 15M+1.1M)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, linestyle="", color="gray", label=llm) for llm, m in LLM_MARKERS.items()]
    handles += [
        plt.Line2D(
            [], [], marker="o", color=MEASURED_COLOR, linestyle="--", label=f"TTFT measured here ({device}) + front"
        ),
        plt.Line2D(
            [],
            [],
            marker="o",
            color=PAPER_COLOR,
            markerfacecolor="none",
            linestyle=":",
            label="TTFT published (M1 Max) + front",
        ),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def write_report(results: StudyResults, out: Path) -> list[Path]:
    """results.json, results.md and the figures in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_dict(), indent=2) + "\n")
    (out / "results.md").write_text(markdown_report(results))
    return [out / "results.json", out / "results.md", *plot_figures(results, out)]
