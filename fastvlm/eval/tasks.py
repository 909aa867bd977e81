"""The paper's benchmarks: where each reads its data, how it prompts, how it is scored.

A :class:`Task` has one or more :class:`Layout`\\ s, one per public release of its data.
GQA, TextVQA, POPE and ScienceQA were scored by the paper with LLaVA's scripts, so their
first layout is LLaVA's evaluation folder (question file + annotations + images) and
scoring follows LLaVA; TextVQA, POPE and ScienceQA-IMG also accept lmms-eval's parquet
release, scored as lmms-eval scores it. All other tasks read lmms-eval's parquet files and
follow lmms-eval v0.2.2. The layout is picked from the files found in the data folder.

A reader yields :class:`Sample`\\ s whose images are decoded only when the sample is run,
and whose ``reference`` holds (as JSON) everything the scorer needs, so a predictions
file can be rescored without the data.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image

from fastvlm.eval import metrics as M
from fastvlm.eval.data import (
    DataError,
    decode_image_cell,
    find_dir,
    has_parquet,
    parquet_files,
    parquet_num_rows,
    parquet_rows,
    read_json,
    read_jsonl,
)
from fastvlm.processing import load_image

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


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    layouts: tuple[Layout, ...]

    def layout_for(self, folder: Path) -> Layout:
        if not folder.is_dir():
            raise DataError(f"{self.name}: data folder {folder} does not exist")
        for layout in self.layouts:
            if layout.detect(folder):
                return layout
        expected = "; or ".join(f"{lay.name}: {lay.files}" for lay in self.layouts)
        raise DataError(f"{self.name}: {folder} holds none of the expected layouts ({expected})")


def lettered(options: list[str]) -> str:
    """Options listed one per line as ``A. text``, the way lmms-eval's MC prompts list them."""
    return "\n".join(f"{letter}. {o}" for letter, o in zip(M.option_letters(len(options)), options, strict=True))


def _mean(values: list[float]) -> float:
    """lmms-eval's ``mean`` aggregation (and the LLaVA scripts' sum / len)."""
    return sum(values) / len(values) if values else 0.0


def _file_image(path: Path) -> Callable[..., Image.Image]:
    # Neither LLaVA's loaders nor the datasets library lmms-eval used apply EXIF orientation.
    return partial(load_image, path, exif_transpose=False)


def _cell_image(cell, folder: Path) -> Callable[..., Image.Image]:
    return partial(decode_image_cell, cell, folder)


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where} lacks field(s) {missing}")


def _parquet_layout_reader(split: str, config: str | None, columns: tuple[str, ...], make, count=parquet_num_rows):
    """A reader for a parquet release: ``make(row, index, folder)`` builds each Sample (None
    skips the row); ``count(files)`` is the number of samples, for the progress bar."""

    def read(folder: Path) -> Samples:
        files = parquet_files(folder, split, config)

        def items() -> Iterator[Sample]:
            for i, row in enumerate(parquet_rows(files)):
                _need(row, columns, f"{files[0].parent}/{split} row {i}")
                sample = make(row, i, folder)
                if sample is not None:
                    yield sample

        return Samples(count(files), items())

    return read


def _detect_files(*names: str) -> Callable[[Path], bool]:
    return lambda folder: all((folder / n).exists() for n in names)


# ------------------------------------------------------------------------------ GQA (LLaVA)


def _read_gqa(folder: Path) -> Samples:
    question_file = folder / "llava_gqa_testdev_balanced.jsonl"
    rows = read_jsonl(question_file)
    # LLaVA's gqa.sh keeps the official files (and images) in gqa/data/
    official_file = folder / "testdev_balanced_questions.json"
    if not official_file.exists() and (folder / "data" / official_file.name).exists():
        official_file = folder / "data" / official_file.name
    official = read_json(official_file)
    images = find_dir(folder, "images", "data/images")

    def items() -> Iterator[Sample]:
        for n, row in enumerate(rows, start=1):
            _need(row, ("question_id", "image", "text"), f"{question_file}:{n}")
            qid = str(row["question_id"])
            if qid not in official:
                raise DataError(f"{question_file}:{n}: question {qid} is not in testdev_balanced_questions.json")
            yield Sample(qid, row["text"], _file_image(images / row["image"]), {"answer": official[qid]["answer"]})

    return Samples(len(rows), items())


def _score_gqa(rows: list[dict]) -> dict:
    return {"accuracy": _mean([M.gqa_correct(r["answer"], r["reference"]["answer"]) for r in rows])}


# ------------------------------------------------------------------------------ TextVQA


def textvqa_question_from_prompt(prompt: str) -> str:
    """LLaVA ``eval_textvqa.py``'s ``prompt_processor``: the question inside a prompt, lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise DataError(f"cannot find the question in the TextVQA prompt {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise DataError(f"cannot find the question in the TextVQA prompt {prompt!r}")
    return question.lower()


def _read_textvqa_llava(folder: Path) -> Samples:
    question_file = folder / "llava_textvqa_val_v051_ocr.jsonl"
    rows = read_jsonl(question_file)
    annotations = read_json(folder / "TextVQA_0.5.1_val.json")
    if not isinstance(annotations, dict) or "data" not in annotations:
        raise DataError(f"{folder / 'TextVQA_0.5.1_val.json'} has no 'data' list")
    # LLaVA joins on (image_id, lower-cased question): its question file's "question_id" is the image id.
    by_key = {(a["image_id"], a["question"].lower()): a for a in annotations["data"]}
    images = find_dir(folder, "train_images", "images")

    def items() -> Iterator[Sample]:
        for n, row in enumerate(rows, start=1):
            _need(row, ("question_id", "image", "text"), f"{question_file}:{n}")
            key = (row["question_id"], textvqa_question_from_prompt(row["text"]))
            if key not in by_key:
                raise DataError(f"{question_file}:{n}: no annotation for image {key[0]!r} and question {key[1]!r}")
            answers = by_key[key]["answers"]
            yield Sample(f"{row['question_id']}:{n}", row["text"], _file_image(images / row["image"]),
                         {"answers": answers})  # fmt: skip

    return Samples(len(rows), items())


def _textvqa_lmms_sample(row: dict, i: int, folder: Path) -> Sample:
    prompt = row["question"].capitalize() + SHORT_ANSWER
    return Sample(str(row["question_id"]), prompt, _cell_image(row["image"], folder), {"answers": row["answers"]})


def _vqa_scorer(rule: str) -> Callable[[list[dict]], dict]:
    def score(rows: list[dict]) -> dict:
        return {"accuracy": _mean([M.vqa_accuracy(r["answer"], r["reference"]["answers"], rule=rule) for r in rows])}

    return score


# ------------------------------------------------------------------------------ VQAv2, DocVQA, InfoVQA


def _vqav2_sample(row: dict, i: int, folder: Path) -> Sample:
    answers = [a["answer"] for a in row["answers"]]
    return Sample(str(row["question_id"]), row["question"] + SHORT_ANSWER, _cell_image(row["image"], folder),
                  {"answers": answers})  # fmt: skip


def _docvqa_sample(row: dict, i: int, folder: Path) -> Sample:
    return Sample(str(row["questionId"]), row["question"] + SHORT_ANSWER, _cell_image(row["image"], folder),
                  {"answers": list(row["answers"])})  # fmt: skip


def _score_anls(rows: list[dict]) -> dict:
    """``anls`` as lmms-eval v0.2.x reports it for docvqa_val / infovqa_val, and the true ANLS.

    Their target is the list of answers, so lmms-eval's multiple-target path scores each
    answer alone with ``anls`` and records 1.0 if any is non-zero (similarity >= 0.5), else
    0.0: the reported number is the share of questions within the threshold. The standard
    ANLS (best similarity per question, 0 under the threshold, averaged) is ``anls_continuous``.
    """
    lmms = [float(any(M.anls(r["answer"], [a]) for a in r["reference"]["answers"])) for r in rows]
    return {
        "anls": _mean(lmms),
        "anls_continuous": _mean([M.anls(r["answer"], r["reference"]["answers"]) for r in rows]),
    }


# ------------------------------------------------------------------------------ ChartQA, OCRBench


def _chartqa_sample(row: dict, i: int, folder: Path) -> Sample:
    return Sample(str(i), row["question"] + "\nAnswer the question with a single word.",
                  _cell_image(row["image"], folder), {"answer": row["answer"], "type": row["type"]})  # fmt: skip


def _score_chartqa(rows: list[dict]) -> dict:
    scores = [(r["reference"]["type"], M.relaxed_accuracy(r["answer"], r["reference"]["answer"])) for r in rows]
    out = {"relaxed_overall": _mean([s for _, s in scores])}
    human = [s for t, s in scores if t == "human_test"]
    augmented = [s for t, s in scores if t != "human_test"]
    if human:
        out["relaxed_human_split"] = _mean(human)
    if augmented:
        out["relaxed_augmented_split"] = _mean(augmented)
    return out


def _ocrbench_sample(row: dict, i: int, folder: Path) -> Sample:
    answer = row["answer"] if isinstance(row["answer"], str) else list(row["answer"])
    reference = {"answers": answer, "dataset": row["dataset"], "question_type": row["question_type"]}
    return Sample(str(i), row["question"].strip(), _cell_image(row["image"], folder), reference)


def _score_ocrbench(rows: list[dict]) -> dict:
    by_type: dict[str, int] = defaultdict(int)
    correct = 0
    for r in rows:
        ref = r["reference"]
        hit = int(M.ocrbench_correct(r["answer"], ref["answers"], ref["dataset"]))
        by_type[ref["question_type"]] += hit
        correct += hit
    # lmms-eval divides the count by 1000 (the full set); over n samples that is correct / n.
    return {"accuracy": correct / len(rows) if rows else 0.0, "correct": correct, "correct_by_type": dict(by_type)}


# ------------------------------------------------------------------------------ POPE


def _read_pope_llava(folder: Path) -> Samples:
    question_file = folder / "llava_pope_test.jsonl"
    rows = read_jsonl(question_file)
    label_dir = folder / "coco" if (folder / "coco").is_dir() else folder
    images = find_dir(folder, "val2014", "images")
    by_category: dict[str, list[int]] = defaultdict(list)
    for n, row in enumerate(rows, start=1):
        _need(row, ("question_id", "image", "text", "category"), f"{question_file}:{n}")
        by_category[row["category"]].append(n - 1)
    labels: dict[int, str] = {}
    for category, positions in by_category.items():
        label_file = label_dir / f"coco_pope_{category}.json"
        label_rows = read_jsonl(label_file)
        if len(label_rows) < len(positions):
            raise DataError(f"{label_file} has {len(label_rows)} labels for {len(positions)} '{category}' questions")
        # eval_pope.py pairs the k-th answer of a category with the k-th line of its label file.
        for k, pos in enumerate(positions):
            labels[pos] = label_rows[k]["label"]

    def items() -> Iterator[Sample]:
        for i, row in enumerate(rows):
            yield Sample(str(row["question_id"]), row["text"], _file_image(images / row["image"]),
                         {"label": labels[i], "category": row["category"]})  # fmt: skip

    return Samples(len(rows), items())


def _score_pope_llava(rows: list[dict]) -> dict:
    by_category: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_category[r["reference"]["category"]].append(r)
    per = {
        c: M.pope_scores([r["answer"] for r in rs], [r["reference"]["label"] for r in rs], rule="llava")
        for c, rs in sorted(by_category.items())
    }
    # LLaVA-1.5's reported POPE number: the F1 averaged over the three splits.
    return {
        "f1": _mean([s["f1"] for s in per.values()]),
        "accuracy": _mean([s["accuracy"] for s in per.values()]),
        "by_category": per,
    }


def _pope_lmms_sample(row: dict, i: int, folder: Path) -> Sample:
    # question_id restarts in each category; the dataset's "id" column is unique
    sample_id = str(row["id"]) if row.get("id") is not None else f"{row['category']}:{row['question_id']}"
    return Sample(sample_id, row["question"].strip() + SHORT_ANSWER, _cell_image(row["image"], folder),
                  {"label": row["answer"], "category": row["category"]})  # fmt: skip


def _score_pope_lmms(rows: list[dict]) -> dict:
    return M.pope_scores([r["answer"] for r in rows], [r["reference"]["label"] for r in rows], rule="lmms-eval")


# ------------------------------------------------------------------------------ ScienceQA-IMG


def _read_sqa_llava(folder: Path) -> Samples:
    records = read_json(folder / "llava_test_CQM-A.json")
    problems = read_json(folder / "problems.json")
    test_ids = set(read_json(folder / "pid_splits.json").get("test", []))
    images = find_dir(folder, "test", "images/test", "images")
    # IMG-Accuracy counts only the questions with an image, so only those are run.
    chosen = [r for r in records if "image" in r and str(r.get("id")) in test_ids]

    def items() -> Iterator[Sample]:
        for r in chosen:
            pid = str(r["id"])
            if pid not in problems:
                raise DataError(f"problem {pid} of llava_test_CQM-A.json is not in problems.json")
            question = r["conversations"][0]["value"].replace("<image>", "").strip() + LETTER_ANSWER
            ref = {"answer": problems[pid]["answer"], "n_choices": len(problems[pid]["choices"])}
            yield Sample(pid, question, _file_image(images / r["image"]), ref)

    return Samples(len(chosen), items())


def _score_sqa_llava(rows: list[dict]) -> dict:
    hits = [float(M.scienceqa_choice(r["answer"], r["reference"]["n_choices"]) == r["reference"]["answer"])
            for r in rows]  # fmt: skip
    return {"img_accuracy": _mean(hits)}


def _sqa_lmms_sample(row: dict, i: int, folder: Path) -> Sample | None:
    if row["image"] is None:
        return None
    choices = lettered(list(row["choices"]))
    context = f"Context: {row['hint']}\n" if row["hint"] else ""
    prompt = f"{context}{row['question']}\n{choices}{LETTER_ANSWER}"
    return Sample(str(i), prompt, _cell_image(row["image"], folder),
                  {"answer": row["answer"], "n_choices": len(row["choices"])})  # fmt: skip


def _score_sqa_lmms(rows: list[dict]) -> dict:
    hits = [M.scienceqa_lmms_correct(r["answer"], r["reference"]["answer"], r["reference"]["n_choices"]) for r in rows]
    return {"exact_match": _mean(hits)}


# ------------------------------------------------------------------------------ SeedBench, AI2D, RealWorldQA


def _seedbench_images(files: list[Path]) -> int:
    return sum(row["data_type"] == "image" for row in parquet_rows(files, columns=["data_type"]))


def _seedbench_sample(row: dict, i: int, folder: Path) -> Sample | None:
    if row["data_type"] != "image":  # SeedBench-I: the video questions are left out
        return None
    prompt = (f"{row['question']}\nA. {row['choice_a']}\nB. {row['choice_b']}\nC. {row['choice_c']}\n"
              f"D. {row['choice_d']}{LETTER_ANSWER}")  # fmt: skip
    cells = row["image"] if isinstance(row["image"], list) else [row["image"]]
    return Sample(str(row.get("question_id", i)), prompt, _cell_image(cells[0], folder), {"answer": row["answer"]})


def _score_seedbench(rows: list[dict]) -> dict:
    return {"seed_image": _mean([M.seedbench_correct(r["answer"], r["reference"]["answer"]) for r in rows])}


def _ai2d_sample(row: dict, i: int, folder: Path) -> Sample:
    options = list(row["options"])
    choices = lettered(options)
    target = M.option_letters(len(options))[int(row["answer"])]
    return Sample(str(i), f"{row['question']}\n{choices}{LETTER_ANSWER}", _cell_image(row["image"], folder),
                  {"answer": target})  # fmt: skip


def _ai2d_answer(text: str, reference: dict) -> str:
    return M.ai2d_choice(text).strip()  # the filter sees the raw text; the strip comes after


def _realworldqa_sample(row: dict, i: int, folder: Path) -> Sample:
    question = row["question"].strip()  # lmms-eval's default post-prompt is empty: the question is kept whole
    return Sample(str(i), question, _cell_image(row["image"], folder),
                  {"answer": row["answer"], "question": row["question"]})  # fmt: skip


def _realworldqa_answer(text: str, reference: dict) -> str:
    return M.realworldqa_choice(text, reference["question"]).strip()  # filters on the raw text, then strip


def _score_exact_match(rows: list[dict]) -> dict:
    """HF exact match (case and punctuation ignored) of the filtered answer: AI2D, RealWorldQA."""
    return {"exact_match": _mean([M.exact_match(r["answer"], r["reference"]["answer"]) for r in rows])}


# ------------------------------------------------------------------------------ MMMU


def _mmmu_prompt(row: dict) -> str:
    if row["question_type"] == "multiple-choice":
        options = M.mmmu_options(row["options"])
        return f"{row['question']}\n{lettered(options)}\n\n{LETTER_ANSWER.strip()}"
    return f"{row['question']}\n\n{SHORT_ANSWER.strip()}"


def _mmmu_sample(row: dict, i: int, folder: Path) -> Sample:
    prompt = _mmmu_prompt(row)
    names = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", prompt)})
    cells = [row.get(n) for n in names if row.get(n) is not None]
    # FastVLM takes one image per prompt: the first one referenced is used (the count is recorded).
    image = _cell_image(cells[0], folder) if cells else None
    reference = {"answer": row["answer"], "question_type": row["question_type"], "options": row["options"],
                 "images_referenced": len(names)}  # fmt: skip
    return Sample(str(row["id"]), prompt, image, reference)


def mmmu_subject(sample_id: str) -> str:
    """'validation_Art_Theory_12' -> 'Art_Theory' (MMMU's ``extract_subset_name``)."""
    split = sample_id.split("_")[0]
    match = re.search(rf"^{re.escape(split)}_(.+?)_\d+$", sample_id)
    if match is None:
        raise DataError(f"MMMU id {sample_id!r} is not of the form <split>_<subject>_<number>")
    return match.group(1)


def _score_mmmu(rows: list[dict], seed: int = 0) -> dict:
    rng = random.Random(seed)  # the parser's random fallback, drawn in dataset order
    by_subject: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        ref = r["reference"]
        if ref["question_type"] == "multiple-choice":
            letter = M.mmmu_parse_choice(r["answer"], M.mmmu_options(ref["options"]), rng)
            hit = M.mmmu_choice_correct(letter, ref["answer"])
        else:
            hit = M.mmmu_open_correct(M.mmmu_parse_open(r["answer"]), ref["answer"])
        by_subject[mmmu_subject(r["id"])].append(hit)
    accs = {s: sum(h) / len(h) for s, h in by_subject.items()}
    n = sum(len(h) for h in by_subject.values())
    # Instance-level accuracy, computed as MMMU does (weighted subject accuracies, 5 decimals).
    overall = sum(accs[s] * len(h) for s, h in by_subject.items()) / n if n else 0
    return {
        "accuracy": round(overall, 5),
        "by_subject": {s: round(a, 5) for s, a in sorted(accs.items())},
        "multi_image_samples": sum(r["reference"]["images_referenced"] > 1 for r in rows),
    }


# ------------------------------------------------------------------------------ the registry


def _lmms(split: str, columns: tuple[str, ...], make, score, headline: str, max_new_tokens: int,
          config: str | None = None, dataset: str = "", answer=strip_answer, count=parquet_num_rows,
          ) -> Layout:  # fmt: skip
    where = f"{config}/" if config else ""
    return Layout(
        name="lmms-eval",
        protocol=f"lmms-eval v0.2.2 ({dataset})",
        files=f"{where}{split}-*.parquet (from the {dataset} dataset repo)",
        detect=has_parquet,
        read=_parquet_layout_reader(split, config, columns, make, count),
        score=score,
        headline=headline,
        max_new_tokens=max_new_tokens,
        answer=answer,
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("gqa", "GQA (testdev-balanced)", (
            Layout("llava", "LLaVA gqa.sh: rstrip('.').lower() vs the official answer",
                   "llava_gqa_testdev_balanced.jsonl, testdev_balanced_questions.json, images/",
                   _detect_files("llava_gqa_testdev_balanced.jsonl"), _read_gqa, _score_gqa, "accuracy",
                   LLAVA_MAX_NEW_TOKENS),
        )),
        Task("textvqa", "TextVQA (val)", (
            Layout("llava", "LLaVA eval_textvqa.py (m4c TextVQAAccuracyEvaluator)",
                   "llava_textvqa_val_v051_ocr.jsonl, TextVQA_0.5.1_val.json, train_images/",
                   _detect_files("llava_textvqa_val_v051_ocr.jsonl"), _read_textvqa_llava, _vqa_scorer("m4c"),
                   "accuracy", LLAVA_MAX_NEW_TOKENS),
            _lmms("validation", ("question_id", "question", "answers", "image"), _textvqa_lmms_sample,
                  _vqa_scorer("textvqa"), "accuracy", LMMS_EVAL_MAX_NEW_TOKENS, dataset="lmms-lab/textvqa"),
        )),
        Task("vqav2", "VQAv2 (val)", (
            _lmms("validation", ("question_id", "question", "answers", "image"), _vqav2_sample, _vqa_scorer("vqav2"),
                  "accuracy", 16, dataset="lmms-lab/VQAv2"),
        )),
        Task("docvqa", "DocVQA (val)", (
            _lmms("validation", ("questionId", "question", "answers", "image"), _docvqa_sample, _score_anls, "anls",
                  32, config="DocVQA", dataset="lmms-lab/DocVQA"),
        )),
        Task("infovqa", "InfoVQA (val)", (
            _lmms("validation", ("questionId", "question", "answers", "image"), _docvqa_sample, _score_anls, "anls",
                  32, config="InfographicVQA", dataset="lmms-lab/DocVQA"),
        )),
        Task("chartqa", "ChartQA (test, human + augmented)", (
            _lmms("test", ("type", "question", "answer", "image"), _chartqa_sample, _score_chartqa,
                  "relaxed_overall", 16, dataset="lmms-lab/ChartQA"),
        )),
        Task("ocrbench", "OCRBench", (
            _lmms("test", ("dataset", "question", "question_type", "answer", "image"), _ocrbench_sample,
                  _score_ocrbench, "accuracy", 128, dataset="echo840/OCRBench"),
        )),
        Task("pope", "POPE (adversarial, popular, random)", (
            Layout("llava", "LLaVA eval_pope.py (F1 averaged over the categories)",
                   "llava_pope_test.jsonl, coco/coco_pope_{adversarial,popular,random}.json, val2014/",
                   _detect_files("llava_pope_test.jsonl"), _read_pope_llava, _score_pope_llava, "f1",
                   LLAVA_MAX_NEW_TOKENS),
            _lmms("test", ("question_id", "question", "answer", "category", "image"), _pope_lmms_sample,
                  _score_pope_lmms, "f1", 128, dataset="lmms-lab/POPE"),
        )),
        Task("scienceqa_img", "ScienceQA-IMG (test)", (
            Layout("llava", "LLaVA eval_science_qa.py (IMG-Accuracy)",
                   "llava_test_CQM-A.json, problems.json, pid_splits.json, test/",
                   _detect_files("llava_test_CQM-A.json"), _read_sqa_llava, _score_sqa_llava, "img_accuracy", 1024),
            _lmms("test", ("question", "choices", "answer", "hint", "image"), _sqa_lmms_sample, _score_sqa_lmms,
                  "exact_match", 16, config="ScienceQA-IMG", dataset="lmms-lab/ScienceQA"),
        )),
        Task("seedbench", "SeedBench (image)", (
            _lmms("test", ("question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type", "image"),
                  _seedbench_sample, _score_seedbench, "seed_image", LMMS_EVAL_MAX_NEW_TOKENS,
                  dataset="lmms-lab/SEED-Bench", count=_seedbench_images),
        )),
        Task("mmmu", "MMMU (val)", (
            _lmms("validation", ("id", "question", "options", "answer", "question_type"), _mmmu_sample, _score_mmmu,
                  "accuracy", 16, dataset="lmms-lab/MMMU"),
        )),
        Task("ai2d", "AI2D (test)", (
            _lmms("test", ("question", "options", "answer", "image"), _ai2d_sample, _score_exact_match,
                  "exact_match", 16, dataset="lmms-lab/ai2d", answer=_ai2d_answer),
        )),
        Task("realworldqa", "RealWorldQA (test)", (
            _lmms("test", ("question", "answer", "image"), _realworldqa_sample, _score_exact_match, "exact_match",
                  16, dataset="lmms-lab/RealWorldQA", answer=_realworldqa_answer),
        )),
    ]
}  # fmt: skip


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
