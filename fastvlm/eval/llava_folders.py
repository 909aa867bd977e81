"""The layouts of LLaVA's evaluation folders: question file + annotations + images.

GQA, TextVQA, POPE and ScienceQA were scored by the paper with LLaVA's scripts, so these
readers follow LLaVA's files and its joins between them, and the scorers follow
LLaVA's ``eval_*.py`` scripts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import fastvlm.eval.metrics as M
from fastvlm.errors import DataError
from fastvlm.eval.data import find_dir, read_json, read_jsonl
from fastvlm.eval.layouts import (
    LETTER_ANSWER,
    LLAVA_MAX_NEW_TOKENS,
    Layout,
    Sample,
    Samples,
    detect_files,
    file_image,
    mean,
    need_fields,
    vqa_scorer,
)

# model_vqa_science's decoding limit (ScienceQA's answers come after a rationale).
LLAVA_SCIENCEQA_MAX_NEW_TOKENS = 1024

# ------------------------------------------------------------------------------ GQA


def read_gqa(folder: Path) -> Samples:
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
            need_fields(row, ("question_id", "image", "text"), f"{question_file}:{n}")
            qid = str(row["question_id"])
            if qid not in official:
                raise DataError(f"{question_file}:{n}: question {qid} is not in testdev_balanced_questions.json")
            yield Sample(
                id=qid,
                prompt=row["text"],
                image=file_image(images / row["image"]),
                reference={"answer": official[qid]["answer"]},
            )

    return Samples(len(rows), items())


def score_gqa(rows: list[dict]) -> dict:
    return {"accuracy": mean([M.gqa_correct(r["answer"], r["reference"]["answer"]) for r in rows])}


GQA = Layout(
    name="llava",
    protocol="LLaVA gqa.sh: rstrip('.').lower() vs the official answer",
    files="llava_gqa_testdev_balanced.jsonl, testdev_balanced_questions.json, images/",
    detect=detect_files("llava_gqa_testdev_balanced.jsonl"),
    read=read_gqa,
    score=score_gqa,
    headline="accuracy",
    max_new_tokens=LLAVA_MAX_NEW_TOKENS,
)

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


def read_textvqa(folder: Path) -> Samples:
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
            need_fields(row, ("question_id", "image", "text"), f"{question_file}:{n}")
            key = (row["question_id"], textvqa_question_from_prompt(row["text"]))
            if key not in by_key:
                raise DataError(f"{question_file}:{n}: no annotation for image {key[0]!r} and question {key[1]!r}")
            yield Sample(
                id=f"{row['question_id']}:{n}",
                prompt=row["text"],
                image=file_image(images / row["image"]),
                reference={"answers": by_key[key]["answers"]},
            )

    return Samples(len(rows), items())


TEXTVQA = Layout(
    name="llava",
    protocol="LLaVA eval_textvqa.py (m4c TextVQAAccuracyEvaluator)",
    files="llava_textvqa_val_v051_ocr.jsonl, TextVQA_0.5.1_val.json, train_images/",
    detect=detect_files("llava_textvqa_val_v051_ocr.jsonl"),
    read=read_textvqa,
    score=vqa_scorer("m4c"),
    headline="accuracy",
    max_new_tokens=LLAVA_MAX_NEW_TOKENS,
)

# ------------------------------------------------------------------------------ POPE


def read_pope(folder: Path) -> Samples:
    question_file = folder / "llava_pope_test.jsonl"
    rows = read_jsonl(question_file)
    label_dir = folder / "coco" if (folder / "coco").is_dir() else folder
    images = find_dir(folder, "val2014", "images")
    by_category: dict[str, list[int]] = defaultdict(list)
    for n, row in enumerate(rows, start=1):
        need_fields(row, ("question_id", "image", "text", "category"), f"{question_file}:{n}")
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
            yield Sample(
                id=str(row["question_id"]),
                prompt=row["text"],
                image=file_image(images / row["image"]),
                reference={"label": labels[i], "category": row["category"]},
            )

    return Samples(len(rows), items())


def score_pope(rows: list[dict]) -> dict:
    by_category: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_category[r["reference"]["category"]].append(r)
    per = {
        c: M.pope_scores([r["answer"] for r in rs], [r["reference"]["label"] for r in rs], rule="llava")
        for c, rs in sorted(by_category.items())
    }
    # LLaVA-1.5's reported POPE number: the F1 averaged over the three splits.
    return {
        "f1": mean([s["f1"] for s in per.values()]),
        "accuracy": mean([s["accuracy"] for s in per.values()]),
        "by_category": per,
    }


POPE = Layout(
    name="llava",
    protocol="LLaVA eval_pope.py (F1 averaged over the categories)",
    files="llava_pope_test.jsonl, coco/coco_pope_{adversarial,popular,random}.json, val2014/",
    detect=detect_files("llava_pope_test.jsonl"),
    read=read_pope,
    score=score_pope,
    headline="f1",
    max_new_tokens=LLAVA_MAX_NEW_TOKENS,
)

# ------------------------------------------------------------------------------ ScienceQA-IMG


def read_scienceqa(folder: Path) -> Samples:
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
            yield Sample(id=pid, prompt=question, image=file_image(images / r["image"]), reference=ref)

    return Samples(len(chosen), items())


def score_scienceqa(rows: list[dict]) -> dict:
    hits = [
        float(M.scienceqa_choice(r["answer"], r["reference"]["n_choices"]) == r["reference"]["answer"]) for r in rows
    ]
    return {"img_accuracy": mean(hits)}


SCIENCEQA = Layout(
    name="llava",
    protocol="LLaVA eval_science_qa.py (IMG-Accuracy)",
    files="llava_test_CQM-A.json, problems.json, pid_splits.json, test/",
    detect=detect_files("llava_test_CQM-A.json"),
    read=read_scienceqa,
    score=score_scienceqa,
    headline="img_accuracy",
    max_new_tokens=LLAVA_SCIENCEQA_MAX_NEW_TOKENS,
)
