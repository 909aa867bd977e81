"""The layouts of lmms-eval's parquet releases, prompted and scored as lmms-eval v0.2.2 does.

Each task is a ``*_sample`` function that turns one parquet row into the exact prompt
lmms-eval's task yaml builds (its ``doc_to_text`` with the model's pre- and post-prompt),
a scorer that reproduces the task's ``process_results`` and aggregation, and the
:class:`~fastvlm.eval.layouts.Layout` that ties them to the dataset's split and columns.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

import fastvlm.eval.metrics as M
from fastvlm.errors import DataError
from fastvlm.eval.data import parquet_rows
from fastvlm.eval.layouts import (
    LETTER_ANSWER,
    LMMS_EVAL_MAX_NEW_TOKENS,
    SHORT_ANSWER,
    Layout,
    Sample,
    cell_image,
    lettered,
    lmms_layout,
    mean,
    vqa_scorer,
)

# Decoding limits set by the tasks' lmms-eval yamls (generation_kwargs.max_new_tokens).
SHORT_MAX_NEW_TOKENS = 16  # VQAv2, ChartQA, ScienceQA-IMG, MMMU, AI2D, RealWorldQA
DOCVQA_MAX_NEW_TOKENS = 32  # DocVQA and InfoVQA
OCRBENCH_MAX_NEW_TOKENS = 128
POPE_MAX_NEW_TOKENS = 128
CHARTQA_POST_PROMPT = "\nAnswer the question with a single word."
HUMAN_SPLIT = "human_test"  # ChartQA's human-written questions; the rest are augmented
MMMU_MULTIPLE_CHOICE = "multiple-choice"

# ------------------------------------------------------------------------------ TextVQA, VQAv2, DocVQA, InfoVQA


def textvqa_sample(row: dict, i: int, folder: Path) -> Sample:
    prompt = row["question"].capitalize() + SHORT_ANSWER
    return Sample(
        id=str(row["question_id"]),
        prompt=prompt,
        image=cell_image(row["image"], folder),
        reference={"answers": row["answers"]},
    )


def vqav2_sample(row: dict, i: int, folder: Path) -> Sample:
    answers = [a["answer"] for a in row["answers"]]
    return Sample(
        id=str(row["question_id"]),
        prompt=row["question"] + SHORT_ANSWER,
        image=cell_image(row["image"], folder),
        reference={"answers": answers},
    )


def docvqa_sample(row: dict, i: int, folder: Path) -> Sample:
    return Sample(
        id=str(row["questionId"]),
        prompt=row["question"] + SHORT_ANSWER,
        image=cell_image(row["image"], folder),
        reference={"answers": list(row["answers"])},
    )


def score_anls(rows: list[dict]) -> dict:
    """``anls`` as lmms-eval v0.2.x reports it for docvqa_val / infovqa_val, and the true ANLS.

    Their target is the list of answers, so lmms-eval's multiple-target path scores each
    answer alone with ``anls`` and records 1.0 if any is non-zero (similarity >= 0.5), else
    0.0: the reported number is the share of questions within the threshold. The standard
    ANLS (best similarity per question, 0 under the threshold, averaged) is ``anls_continuous``.
    """
    lmms = [float(any(M.anls(r["answer"], [a]) for a in r["reference"]["answers"])) for r in rows]
    return {
        "anls": mean(lmms),
        "anls_continuous": mean([M.anls(r["answer"], r["reference"]["answers"]) for r in rows]),
    }


# ------------------------------------------------------------------------------ ChartQA, OCRBench


def chartqa_sample(row: dict, i: int, folder: Path) -> Sample:
    return Sample(
        id=str(i),
        prompt=row["question"] + CHARTQA_POST_PROMPT,
        image=cell_image(row["image"], folder),
        reference={"answer": row["answer"], "type": row["type"]},
    )


def score_chartqa(rows: list[dict]) -> dict:
    scores = [(r["reference"]["type"], M.relaxed_accuracy(r["answer"], r["reference"]["answer"])) for r in rows]
    out = {"relaxed_overall": mean([s for _, s in scores])}
    human = [s for t, s in scores if t == HUMAN_SPLIT]
    augmented = [s for t, s in scores if t != HUMAN_SPLIT]
    if human:
        out["relaxed_human_split"] = mean(human)
    if augmented:
        out["relaxed_augmented_split"] = mean(augmented)
    return out


def ocrbench_sample(row: dict, i: int, folder: Path) -> Sample:
    answer = row["answer"] if isinstance(row["answer"], str) else list(row["answer"])
    reference = {"answers": answer, "dataset": row["dataset"], "question_type": row["question_type"]}
    return Sample(
        id=str(i), prompt=row["question"].strip(), image=cell_image(row["image"], folder), reference=reference
    )


def score_ocrbench(rows: list[dict]) -> dict:
    by_type: dict[str, int] = defaultdict(int)
    correct = 0
    for r in rows:
        ref = r["reference"]
        hit = int(M.ocrbench_correct(r["answer"], ref["answers"], ref["dataset"]))
        by_type[ref["question_type"]] += hit
        correct += hit
    # lmms-eval divides the count by 1000 (the full set); over n samples that is correct / n.
    return {"accuracy": correct / len(rows) if rows else 0.0, "correct": correct, "correct_by_type": dict(by_type)}


# ------------------------------------------------------------------------------ POPE, ScienceQA-IMG


def pope_sample(row: dict, i: int, folder: Path) -> Sample:
    # question_id restarts in each category; the dataset's "id" column is unique
    sample_id = str(row["id"]) if row.get("id") is not None else f"{row['category']}:{row['question_id']}"
    return Sample(
        id=sample_id,
        prompt=row["question"].strip() + SHORT_ANSWER,
        image=cell_image(row["image"], folder),
        reference={"label": row["answer"], "category": row["category"]},
    )


def score_pope(rows: list[dict]) -> dict:
    return M.pope_scores([r["answer"] for r in rows], [r["reference"]["label"] for r in rows], rule="lmms-eval")


def scienceqa_sample(row: dict, i: int, folder: Path) -> Sample | None:
    if row["image"] is None:
        return None
    choices = lettered(list(row["choices"]))
    context = f"Context: {row['hint']}\n" if row["hint"] else ""
    return Sample(
        id=str(i),
        prompt=f"{context}{row['question']}\n{choices}{LETTER_ANSWER}",
        image=cell_image(row["image"], folder),
        reference={"answer": row["answer"], "n_choices": len(row["choices"])},
    )


def score_scienceqa(rows: list[dict]) -> dict:
    hits = [M.scienceqa_lmms_correct(r["answer"], r["reference"]["answer"], r["reference"]["n_choices"]) for r in rows]
    return {"exact_match": mean(hits)}


# ------------------------------------------------------------------------------ SeedBench, AI2D, RealWorldQA


def count_seedbench_images(files: list[Path]) -> int:
    """SeedBench-I's size: the image questions among the shards' rows."""
    return sum(row["data_type"] == "image" for row in parquet_rows(files, columns=["data_type"]))


def seedbench_sample(row: dict, i: int, folder: Path) -> Sample | None:
    if row["data_type"] != "image":  # SeedBench-I: the video questions are left out
        return None
    prompt = (
        f"{row['question']}\nA. {row['choice_a']}\nB. {row['choice_b']}\nC. {row['choice_c']}\n"
        f"D. {row['choice_d']}{LETTER_ANSWER}"
    )
    cells = row["image"] if isinstance(row["image"], list) else [row["image"]]
    return Sample(
        id=str(row.get("question_id", i)),
        prompt=prompt,
        image=cell_image(cells[0], folder),
        reference={"answer": row["answer"]},
    )


def score_seedbench(rows: list[dict]) -> dict:
    return {"seed_image": mean([M.seedbench_correct(r["answer"], r["reference"]["answer"]) for r in rows])}


def ai2d_sample(row: dict, i: int, folder: Path) -> Sample:
    options = list(row["options"])
    target = M.option_letters(len(options))[int(row["answer"])]
    return Sample(
        id=str(i),
        prompt=f"{row['question']}\n{lettered(options)}{LETTER_ANSWER}",
        image=cell_image(row["image"], folder),
        reference={"answer": target},
    )


def ai2d_answer(text: str, reference: dict) -> str:
    return M.ai2d_choice(text).strip()  # the filter sees the raw text; the strip comes after


def realworldqa_sample(row: dict, i: int, folder: Path) -> Sample:
    question = row["question"].strip()  # lmms-eval's default post-prompt is empty: the question is kept whole
    return Sample(
        id=str(i),
        prompt=question,
        image=cell_image(row["image"], folder),
        reference={"answer": row["answer"], "question": row["question"]},
    )


def realworldqa_answer(text: str, reference: dict) -> str:
    return M.realworldqa_choice(text, reference["question"]).strip()  # filters on the raw text, then strip


def score_exact_match(rows: list[dict]) -> dict:
    """HF exact match (case and punctuation ignored) of the filtered answer: AI2D, RealWorldQA."""
    return {"exact_match": mean([M.exact_match(r["answer"], r["reference"]["answer"]) for r in rows])}


# ------------------------------------------------------------------------------ MMMU


def _mmmu_prompt(row: dict) -> str:
    if row["question_type"] == MMMU_MULTIPLE_CHOICE:
        options = M.mmmu_options(row["options"])
        return f"{row['question']}\n{lettered(options)}\n\n{LETTER_ANSWER.strip()}"
    return f"{row['question']}\n\n{SHORT_ANSWER.strip()}"


def mmmu_sample(row: dict, i: int, folder: Path) -> Sample:
    prompt = _mmmu_prompt(row)
    names = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", prompt)})
    cells = [row.get(n) for n in names if row.get(n) is not None]
    # FastVLM takes one image per prompt: the first one referenced is used (the count is recorded).
    image = cell_image(cells[0], folder) if cells else None
    reference = {
        "answer": row["answer"],
        "question_type": row["question_type"],
        "options": row["options"],
        "images_referenced": len(names),
    }
    return Sample(id=str(row["id"]), prompt=prompt, image=image, reference=reference)


def mmmu_subject(sample_id: str) -> str:
    """'validation_Art_Theory_12' -> 'Art_Theory' (MMMU's ``extract_subset_name``)."""
    split = sample_id.split("_")[0]
    match = re.search(rf"^{re.escape(split)}_(.+?)_\d+$", sample_id)
    if match is None:
        raise DataError(f"MMMU id {sample_id!r} is not of the form <split>_<subject>_<number>")
    return match.group(1)


def score_mmmu(rows: list[dict], seed: int = 0) -> dict:
    rng = random.Random(seed)  # the parser's random fallback, drawn in dataset order
    by_subject: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        ref = r["reference"]
        if ref["question_type"] == MMMU_MULTIPLE_CHOICE:
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


# ------------------------------------------------------------------------------ the layouts

TEXTVQA = lmms_layout(
    split="validation",
    columns=("question_id", "question", "answers", "image"),
    make=textvqa_sample,
    score=vqa_scorer("textvqa"),
    headline="accuracy",
    max_new_tokens=LMMS_EVAL_MAX_NEW_TOKENS,
    dataset="lmms-lab/textvqa",
)
VQAV2 = lmms_layout(
    split="validation",
    columns=("question_id", "question", "answers", "image"),
    make=vqav2_sample,
    score=vqa_scorer("vqav2"),
    headline="accuracy",
    max_new_tokens=SHORT_MAX_NEW_TOKENS,
    dataset="lmms-lab/VQAv2",
)


def _docvqa_layout(config: str) -> Layout:
    """DocVQA and InfoVQA: two configs of the lmms-lab/DocVQA repo, read and scored alike."""
    return lmms_layout(
        split="validation",
        columns=("questionId", "question", "answers", "image"),
        make=docvqa_sample,
        score=score_anls,
        headline="anls",
        max_new_tokens=DOCVQA_MAX_NEW_TOKENS,
        config=config,
        dataset="lmms-lab/DocVQA",
    )


DOCVQA = _docvqa_layout("DocVQA")
INFOVQA = _docvqa_layout("InfographicVQA")
CHARTQA = lmms_layout(
    split="test",
    columns=("type", "question", "answer", "image"),
    make=chartqa_sample,
    score=score_chartqa,
    headline="relaxed_overall",
    max_new_tokens=SHORT_MAX_NEW_TOKENS,
    dataset="lmms-lab/ChartQA",
)
OCRBENCH = lmms_layout(
    split="test",
    columns=("dataset", "question", "question_type", "answer", "image"),
    make=ocrbench_sample,
    score=score_ocrbench,
    headline="accuracy",
    max_new_tokens=OCRBENCH_MAX_NEW_TOKENS,
    dataset="echo840/OCRBench",
)
POPE = lmms_layout(
    split="test",
    columns=("question_id", "question", "answer", "category", "image"),
    make=pope_sample,
    score=score_pope,
    headline="f1",
    max_new_tokens=POPE_MAX_NEW_TOKENS,
    dataset="lmms-lab/POPE",
)
SCIENCEQA = lmms_layout(
    split="test",
    columns=("question", "choices", "answer", "hint", "image"),
    make=scienceqa_sample,
    score=score_scienceqa,
    headline="exact_match",
    max_new_tokens=SHORT_MAX_NEW_TOKENS,
    config="ScienceQA-IMG",
    dataset="lmms-lab/ScienceQA",
)
SEEDBENCH = lmms_layout(
    split="test",
    columns=("question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type", "image"),
    make=seedbench_sample,
    score=score_seedbench,
    headline="seed_image",
    max_new_tokens=LMMS_EVAL_MAX_NEW_TOKENS,
    dataset="lmms-lab/SEED-Bench",
    count=count_seedbench_images,
)
MMMU = lmms_layout(
    split="validation",
    columns=("id", "question", "options", "answer", "question_type"),
    make=mmmu_sample,
    score=score_mmmu,
    headline="accuracy",
    max_new_tokens=SHORT_MAX_NEW_TOKENS,
    dataset="lmms-lab/MMMU",
)
AI2D = lmms_layout(
    split="test",
    columns=("question", "options", "answer", "image"),
    make=ai2d_sample,
    score=score_exact_match,
    headline="exact_match",
    max_new_tokens=SHORT_MAX_NEW_TOKENS,
    dataset="lmms-lab/ai2d",
    answer=ai2d_answer,
)
REALWORLDQA = lmms_layout(
    split="test",
    columns=("question", "answer", "image"),
    make=realworldqa_sample,
    score=score_exact_match,
    headline="exact_match",
    max_new_tokens=SHORT_MAX_NEW_TOKENS,
    dataset="lmms-lab/RealWorldQA",
    answer=realworldqa_answer,
)
