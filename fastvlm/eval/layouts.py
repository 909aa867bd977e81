"""What a data layout is, and the pieces every layout reader is built from.

A :class:`Layout` is one public release of a benchmark's data (LLaVA's evaluation folder,
or lmms-eval's parquet files): how to recognise it in a folder, how to read it into
:class:`Sample`\\ s, how to pick the scored answer out of the decoded text, and how to
score. Readers yield samples whose images are decoded only when the sample is run, and
whose ``reference`` holds (as JSON) everything the scorer needs, so a predictions file
can be rescored without the data. The layouts themselves live in
:mod:`fastvlm.eval.llava_folders` and :mod:`fastvlm.eval.lmms_parquet`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

import fastvlm.eval.metrics as M
from fastvlm.errors import DataError
from fastvlm.eval.data import decode_image_cell, has_parquet, parquet_files, parquet_num_rows, parquet_rows
from fastvlm.processing import load_image

# The prompt suffixes of LLaVA's evaluation files, which lmms-eval's task yamls copy.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
LMMS_EVAL_MAX_NEW_TOKENS = 1024  # lmms-eval's LLaVA model default, for tasks whose yaml sets none
LLAVA_MAX_NEW_TOKENS = 128  # model_vqa_loader's default


@dataclass
class Sample:
    id: str
    prompt: str
    image: Callable[..., Image.Image] | None  # called with max_pixels=
    reference: dict


@dataclass
class Samples:
    total: int
    items: Iterator[Sample]


def strip_answer(text: str, reference: dict) -> str:
    """The scored answer of LLaVA's scripts: the decoded text, stripped."""
    return text.strip()


@dataclass(frozen=True)
class Layout:
    name: str
    protocol: str
    files: str  # what the folder must hold, for docs and errors
    detect: Callable[[Path], bool]
    read: Callable[[Path], Samples]
    score: Callable[[list[dict]], dict]
    headline: str
    max_new_tokens: int
    # What the protocol scores, from the decoded text: LLaVA's scripts strip it; lmms-eval runs
    # the task's filters on the raw text and then strips (ConfigurableTask.process_results).
    answer: Callable[[str, dict], str] = strip_answer


# A parquet row, its index and the dataset folder -> the Sample (None skips the row).
SampleMaker = Callable[[dict, int, Path], Sample | None]


def lettered(options: list[str]) -> str:
    """Options listed one per line as ``A. text``, the way lmms-eval's MC prompts list them."""
    return "\n".join(f"{letter}. {o}" for letter, o in zip(M.option_letters(len(options)), options, strict=True))


def mean(values: list[float]) -> float:
    """lmms-eval's ``mean`` aggregation (and the LLaVA scripts' sum / len)."""
    return sum(values) / len(values) if values else 0.0


def file_image(path: Path) -> Callable[..., Image.Image]:
    """An image file, decoded when called (with ``max_pixels=``)."""
    # Neither LLaVA's loaders nor the datasets library lmms-eval used apply EXIF orientation.
    return partial(load_image, path, exif_transpose=False)


def cell_image(cell: Any, folder: Path) -> Callable[..., Image.Image]:
    """A parquet image cell, decoded when called (with ``max_pixels=``)."""
    return partial(decode_image_cell, cell, folder)


def need_fields(row: dict, keys: tuple[str, ...], where: str) -> None:
    """Refuse a record that lacks one of ``keys`` (``where`` names the record in the error)."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where} lacks field(s) {missing}")


def detect_files(*names: str) -> Callable[[Path], bool]:
    """A layout test: the folder holds every one of ``names``."""
    return lambda folder: all((folder / n).exists() for n in names)


def vqa_scorer(rule: str) -> Callable[[list[dict]], dict]:
    """VQA accuracy over the reference answers, with ``rule``'s answer normalisation."""

    def score(rows: list[dict]) -> dict:
        return {"accuracy": mean([M.vqa_accuracy(r["answer"], r["reference"]["answers"], rule=rule) for r in rows])}

    return score


def parquet_layout_reader(
    split: str,
    config: str | None,
    columns: tuple[str, ...],
    make: SampleMaker,
    count: Callable[[list[Path]], int] = parquet_num_rows,
) -> Callable[[Path], Samples]:
    """A reader for a parquet release: ``make(row, index, folder)`` builds each Sample (None
    skips the row); ``count(files)`` is the number of samples, for the progress bar."""

    def read(folder: Path) -> Samples:
        files = parquet_files(folder, split, config)

        def items() -> Iterator[Sample]:
            for i, row in enumerate(parquet_rows(files)):
                need_fields(row, columns, f"{files[0].parent}/{split} row {i}")
                sample = make(row, i, folder)
                if sample is not None:
                    yield sample

        return Samples(count(files), items())

    return read


def lmms_layout(
    *,
    split: str,
    columns: tuple[str, ...],
    make: SampleMaker,
    score: Callable[[list[dict]], dict],
    headline: str,
    max_new_tokens: int,
    dataset: str,
    config: str | None = None,
    answer: Callable[[str, dict], str] = strip_answer,
    count: Callable[[list[Path]], int] = parquet_num_rows,
) -> Layout:
    """The layout of a task's lmms-eval parquet release (``dataset`` is its Hugging Face repo)."""
    where = f"{config}/" if config else ""
    return Layout(
        name="lmms-eval",
        protocol=f"lmms-eval v0.2.2 ({dataset})",
        files=f"{where}{split}-*.parquet (from the {dataset} dataset repo)",
        detect=has_parquet,
        read=parquet_layout_reader(split, config, columns, make, count),
        score=score,
        headline=headline,
        max_new_tokens=max_new_tokens,
        answer=answer,
    )
