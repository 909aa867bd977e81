"""The paper's benchmarks: each task and the public releases of its data it can read.

A :class:`Task` has one or more :class:`~fastvlm.eval.layouts.Layout`\\ s, one per public
release of its data. GQA, TextVQA, POPE and ScienceQA were scored by the paper with
LLaVA's scripts, so their first layout is LLaVA's evaluation folder (question file +
annotations + images, :mod:`fastvlm.eval.llava_folders`) and scoring follows LLaVA;
TextVQA, POPE and ScienceQA-IMG also accept lmms-eval's parquet release, scored as
lmms-eval scores it. All other tasks read lmms-eval's parquet files and follow lmms-eval
v0.2.2 (:mod:`fastvlm.eval.lmms_parquet`). The layout is picked from the files found in
the data folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fastvlm.eval.llava_folders as llava
import fastvlm.eval.lmms_parquet as lmms
from fastvlm.errors import DataError
from fastvlm.eval.layouts import Layout, Sample, Samples

__all__ = ["TASKS", "Layout", "Sample", "Samples", "Task", "get_task"]


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    layouts: tuple[Layout, ...]

    def layout_for(self, folder: Path) -> Layout:
        """The first of the task's layouts whose files ``folder`` holds."""
        if not folder.is_dir():
            raise DataError(f"{self.name}: data folder {folder} does not exist")
        for layout in self.layouts:
            if layout.detect(folder):
                return layout
        expected = "; or ".join(f"{lay.name}: {lay.files}" for lay in self.layouts)
        raise DataError(f"{self.name}: {folder} holds none of the expected layouts ({expected})")


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(name="gqa", title="GQA (testdev-balanced)", layouts=(llava.GQA,)),
        Task(name="textvqa", title="TextVQA (val)", layouts=(llava.TEXTVQA, lmms.TEXTVQA)),
        Task(name="vqav2", title="VQAv2 (val)", layouts=(lmms.VQAV2,)),
        Task(name="docvqa", title="DocVQA (val)", layouts=(lmms.DOCVQA,)),
        Task(name="infovqa", title="InfoVQA (val)", layouts=(lmms.INFOVQA,)),
        Task(name="chartqa", title="ChartQA (test, human + augmented)", layouts=(lmms.CHARTQA,)),
        Task(name="ocrbench", title="OCRBench", layouts=(lmms.OCRBENCH,)),
        Task(name="pope", title="POPE (adversarial, popular, random)", layouts=(llava.POPE, lmms.POPE)),
        Task(name="scienceqa_img", title="ScienceQA-IMG (test)", layouts=(llava.SCIENCEQA, lmms.SCIENCEQA)),
        Task(name="seedbench", title="SeedBench (image)", layouts=(lmms.SEEDBENCH,)),
        Task(name="mmmu", title="MMMU (val)", layouts=(lmms.MMMU,)),
        Task(name="ai2d", title="AI2D (test)", layouts=(lmms.AI2D,)),
        Task(name="realworldqa", title="RealWorldQA (test)", layouts=(lmms.REALWORLDQA,)),
    ]
}


def get_task(name: str) -> Task:
    """The task called ``name`` (a :class:`DataError` naming the known tasks if there is none)."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
