"""Throughput of ``fastvlm eval`` (samples/s) on a FastVLM-sized model, by batch size.

Timed as ``fastvlm eval`` times itself: decoding and preprocessing each batch's images
and batched greedy generation, over a GQA folder in LLaVA's layout written here with
synthetic images (reading the folder and scoring take milliseconds and are left out).
Batch size 1 is the baseline row, run in the same process. Random weights never emit the
end token early, so every answer is ``max_new_tokens`` long: a pessimistic figure for
short-answer benchmarks.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastvlm.bench.tokenizer import byte_tokenizer
from fastvlm.eval import evaluate
from fastvlm.eval.layouts import SHORT_ANSWER
from fastvlm.measure import markdown_table
from fastvlm.model import FastVLM
from fastvlm.presets import fastvlm_config
from fastvlm.train.synth import make_example


@dataclass
class EvalThroughputRow:
    device: str
    llm: str
    resolution: int
    batch_size: int
    samples: int
    max_new_tokens: int
    samples_per_s: float
    speedup: float  # over batch size 1 in the same process


def write_gqa_folder(folder: Path, samples: int, size: int, seed: int = 0) -> None:
    """A GQA folder in LLaVA's layout with synthetic scenes (question file, answers, images)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines, official = [], {}
    for i in range(samples):
        image, question, answer = make_example(rng, size)
        image.save(folder / "images" / f"s{i}.png")
        text = question.split("?")[0] + "?" + SHORT_ANSWER  # as LLaVA's GQA question file words them
        lines.append(json.dumps({"question_id": str(i), "image": f"s{i}.png", "text": text}))
        official[str(i)] = {"answer": answer.lower()}
    (folder / "llava_gqa_testdev_balanced.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "testdev_balanced_questions.json").write_text(json.dumps(official))


def measure_eval_throughput(
    llm: str = "0.5b",
    resolution: int = 1024,
    *,
    samples: int = 16,
    batch_sizes: tuple[int, ...] = (1, 8),
    max_new_tokens: int = 8,
    device: str = "cpu",
    progress: bool = False,
) -> list[EvalThroughputRow]:
    """One row per batch size: samples/s of a full ``evaluate`` run over ``samples`` samples."""
    model = FastVLM.from_config(fastvlm_config(llm, image_size=resolution), device=device, seed=0)
    model.tokenizer = byte_tokenizer()
    model.eval()
    rows: list[EvalThroughputRow] = []
    with tempfile.TemporaryDirectory(prefix="fastvlm-bench-eval-") as tmp:
        write_gqa_folder(Path(tmp) / "gqa", samples, resolution)
        warm = evaluate(model, "gqa", Path(tmp) / "gqa", Path(tmp) / "warm", limit=1, max_new_tokens=2, progress=False)
        assert warm["n"] == 1
        for batch in batch_sizes:
            result = evaluate(
                model,
                "gqa",
                Path(tmp) / "gqa",
                Path(tmp) / f"out-{batch}",
                batch_size=batch,
                max_new_tokens=max_new_tokens,
                progress=progress,
            )
            speed = result["throughput"]["samples_per_s"]
            base = rows[0].samples_per_s if rows else speed
            rows.append(
                EvalThroughputRow(
                    device=str(device),
                    llm=llm,
                    resolution=resolution,
                    batch_size=batch,
                    samples=samples,
                    max_new_tokens=max_new_tokens,
                    samples_per_s=speed,
                    speedup=speed / base,
                )
            )
    return rows


def format_eval_table(rows: list[EvalThroughputRow]) -> str:
    """The rows as a markdown table, one line per (device, resolution, batch size)."""
    columns = ["device", "LLM", ">px", ">batch", ">samples", ">new tokens", ">samples/s", ">vs batch 1"]
    cells = [
        [
            r.device,
            r.llm,
            str(r.resolution),
            str(r.batch_size),
            str(r.samples),
            str(r.max_new_tokens),
            f"{r.samples_per_s:.3f}",
            f"{r.speedup:.2f}x",
        ]
        for r in rows
    ]
    return markdown_table(columns, cells)
