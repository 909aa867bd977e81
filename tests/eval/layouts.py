"""Tiny benchmark folders in each release's real layout, for the evaluation tests.

Each builder writes three (or so) samples into ``folder`` exactly as the public release
lays them out (LLaVA's question/annotation files and image folders, or the parquet shards
of the Hugging Face dataset lmms-eval loads) and returns a :class:`Built`: the answers a
scripted model should give to each prompt, and the headline score those answers earn
under the task's official rule, worked out by hand in the builder.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class Built:
    answers: dict[str, str]  # prompt -> the scripted model's answer
    score: float  # the headline score those answers earn
    n: int
    padded_score: float | None = None  # the score when every answer ends in "\n", where it differs


def png(color: tuple[int, int, int], size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def cell(color: tuple[int, int, int]) -> dict:
    """A Hugging Face ``Image`` feature cell."""
    return {"bytes": png(color), "path": None}


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa  # here, so that the LLaVA-folder builders also run where pyarrow is missing (the vLLM lane)
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(color))


RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def gqa(folder: Path) -> Built:
    questions = [
        ("201", "n1.jpg", "Is the sky blue?", "yes"),
        ("202", "n2.jpg", "What is on the table?", "cup"),
        ("203", "n3.jpg", "Which color is the car?", "red"),
    ]
    write_jsonl(
        folder / "llava_gqa_testdev_balanced.jsonl",
        [
            {"question_id": q, "image": img, "text": text + SHORT, "category": "default"}
            for q, img, text, _ in questions
        ],
    )
    official = {
        q: {"imageId": img[:-4], "question": text, "answer": ans, "types": {"structural": "query"}}
        for q, img, text, ans in questions
    }
    (folder / "testdev_balanced_questions.json").write_text(json.dumps(official))
    for _, img, _, _ in questions:
        save_image(folder / "images" / img)
    # "Yes." -> rstrip('.').lower() = "yes" (right); "Cup" -> "cup" (right); "red car" (wrong): 2/3
    return Built(
        {questions[0][2] + SHORT: "Yes.", questions[1][2] + SHORT: "Cup", questions[2][2] + SHORT: "red car"}, 2 / 3, 3
    )


TEXTVQA_ANSWERS = [["canon"] * 10, ["stop"] * 3 + ["stop sign"] * 7, ["10"] * 2 + ["ten"] * 2 + ["11"] * 6]


def textvqa_llava(folder: Path) -> Built:
    qs = ["what brand is this camera?", "what does the sign say?", "what number is shown?"]
    prompts = [f"{q}\nReference OCR token: Canon, STOP, 10{SHORT}" for q in qs]
    write_jsonl(
        folder / "llava_textvqa_val_v051_ocr.jsonl",
        [{"question_id": f"img{i}", "image": f"img{i}.jpg", "text": p} for i, p in enumerate(prompts)],
    )
    data = [
        {"question_id": 100 + i, "image_id": f"img{i}", "question": q.capitalize(), "answers": a}
        for i, (q, a) in enumerate(zip(qs, TEXTVQA_ANSWERS, strict=True))
    ]
    (folder / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    for i in range(3):
        save_image(folder / "train_images" / f"img{i}.jpg")
    # "Canon." -> "canon": 10 matches, 1.0. "Stop" -> "stop": 3 answers "stop"; leaving one of
    # them out leaves 2 (2/3), leaving a "stop sign" out leaves 3 (1): (3*2/3 + 7*1)/10 = 0.9.
    # "Ten" -> "10": two "10"s and two "ten"s normalise to four "10": (4*1 + 6*1)/10 = 1.0.
    return Built(dict(zip(prompts, ["Canon.", "Stop", "Ten"], strict=True)), (1.0 + 0.9 + 1.0) / 3, 3)


def textvqa_lmms(folder: Path) -> Built:
    qs = ["what brand is this camera?", "what does the sign say?", "what number is shown?"]
    write_parquet(
        folder / "data" / "validation-00000-of-00001.parquet",
        [
            {
                "image_id": f"img{i}",
                "question_id": 100 + i,
                "question": q,
                "answers": a,
                "image": cell(RED),
                "ocr_tokens": ["Canon"],
            }
            for i, (q, a) in enumerate(zip(qs, TEXTVQA_ANSWERS, strict=True))
        ],
    )
    prompts = [q.capitalize() + SHORT for q in qs]
    # same answers and arithmetic as the LLaVA layout, but "eleven" for the third: "eleven" is
    # not a number word of the processor, so it matches nothing: (1.0 + 0.9 + 0) / 3
    return Built(dict(zip(prompts, ["Canon.", "Stop", "eleven"], strict=True)), (1.0 + 0.9 + 0.0) / 3, 3)


def vqav2(folder: Path) -> Built:
    def answers(words):
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]

    rows = [
        {"question_id": 1, "question": "How many dogs?", "answers": answers(["2"] * 10), "image": cell(RED)},
        {
            "question_id": 2,
            "question": "What sport?",
            "answers": answers(["tennis"] * 9 + ["ping-pong"]),
            "image": cell(GREEN),
        },
        {"question_id": 3, "question": "What color?", "answers": answers(["red"] * 10), "image": cell(BLUE)},
    ]
    write_parquet(folder / "data" / "validation-00000-of-00001.parquet", rows)
    # "two" -> "2", all ten answers agree: 1.0. "Tennis" -> "tennis": nine matches; leaving out a
    # "tennis" leaves 8 (1), leaving out "ping-pong" leaves 9 (1): 1.0. "blue": 0.
    return Built(
        {
            rows[0]["question"] + SHORT: "two",
            rows[1]["question"] + SHORT: "Tennis",
            rows[2]["question"] + SHORT: "blue",
        },
        2 / 3,
        3,
    )


def docvqa(folder: Path, config: str = "DocVQA") -> Built:
    rows = [
        {"questionId": 11, "question": "What is the date?", "answers": ["1/2/2020", "Jan 2 2020"], "image": cell(RED)},
        {"questionId": 12, "question": "Who signed?", "answers": ["John Smith"], "image": cell(GREEN)},
        {"questionId": 13, "question": "What is the total?", "answers": ["$100"], "image": cell(BLUE)},
    ]
    write_parquet(folder / config / "validation-00000-of-00001.parquet", rows)
    # exact: 1. "john smyth": distance 1 over max(len("John Smith"), len("john smyth")) = 10 -> 0.9.
    # "42": distance 4 over 4 -> similarity 0, below 0.5 -> 0. lmms-eval 0.2.x reports the share
    # of questions with some answer at similarity >= 0.5: 2/3 (the continuous ANLS is 1.9/3).
    return Built(
        {
            rows[0]["question"] + SHORT: "1/2/2020",
            rows[1]["question"] + SHORT: "john smyth",
            rows[2]["question"] + SHORT: "42",
        },
        2 / 3,
        3,
    )


def infovqa(folder: Path) -> Built:
    return docvqa(folder, "InfographicVQA")


def chartqa(folder: Path) -> Built:
    suffix = "\nAnswer the question with a single word."
    rows = [
        {"type": "human_test", "question": "What is the peak value?", "answer": "40", "image": cell(RED)},
        {"type": "human_test", "question": "Which year is highest?", "answer": "2019", "image": cell(GREEN)},
        {"type": "augmented_test", "question": "What share is blue?", "answer": "0.25", "image": cell(BLUE)},
    ]
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
    # 41 vs 40: 2.5% off -> right. 1900 vs 2019: |1900 - 2019| / 2019 = 5.9% off -> wrong.
    # "26%" = 0.26 vs 0.25: 4% off -> right. Overall 2/3 (human 1/2, augmented 1/1).
    return Built(
        {rows[0]["question"] + suffix: "41", rows[1]["question"] + suffix: "1900", rows[2]["question"] + suffix: "26%"},
        2 / 3,
        3,
    )


def ocrbench(folder: Path) -> Built:
    rows = [
        {
            "dataset": "IIIT5K",
            "question": "what is written in the image?",
            "question_type": "Regular Text Recognition",
            "answer": ["Coffee"],
            "image": cell(RED),
        },
        {
            "dataset": "HME100k",
            "question": "Write out the formula in LaTeX.",
            "question_type": "Handwritten Mathematical Expression Recognition",
            "answer": ["x ^ { 2 }"],
            "image": cell(GREEN),
        },
        {
            "dataset": "docVQA",
            "question": " What is the invoice number? ",
            "question_type": "Doc-oriented VQA",
            "answer": ["A-17"],
            "image": cell(BLUE),
        },
    ]
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
    # "the word is coffee" contains "coffee": 1. "x^{2}" contains "x^{2}" once spaces go: 1.
    # "a17" lacks "a-17": 0. The question is stripped before prompting.
    return Built(
        {rows[0]["question"]: "The word is COFFEE", rows[1]["question"]: "x^{2}", rows[2]["question"].strip(): "a17"},
        2 / 3,
        3,
    )


POPE_QUESTIONS = [
    ("adversarial", "Is there a dog in the image?", "yes"),
    ("adversarial", "Is there a cat?", "no"),
    ("popular", "Is there a car?", "yes"),
    ("random", "Is there a bus?", "no"),
]


def pope_llava(folder: Path) -> Built:
    write_jsonl(
        folder / "llava_pope_test.jsonl",
        [
            {"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": q + SHORT, "category": c}
            for i, (c, q, _) in enumerate(POPE_QUESTIONS)
        ],
    )
    for category in ("adversarial", "popular", "random"):
        write_jsonl(
            folder / "coco" / f"coco_pope_{category}.json",
            [
                {"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": q, "label": label}
                for i, (c, q, label) in enumerate(POPE_QUESTIONS)
                if c == category
            ],
        )
    for i in range(len(POPE_QUESTIONS)):
        save_image(folder / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    # adversarial: "Yes, there is a dog." -> yes (TP); "There is no cat." -> no (TN): F1 = 1.
    # popular: "No." -> no for a yes (FN): precision 0/0 -> 0, recall 0, F1 0.
    # random: "Not sure" -> "Not" is no no-word -> yes for a no (FP): F1 0. Mean F1 = 1/3.
    answers = ["Yes, there is a dog.", "There is no cat.", "No.", "Not sure"]
    return Built({q + SHORT: a for (_, q, _), a in zip(POPE_QUESTIONS, answers, strict=True)}, 1 / 3, 4)


def pope_lmms(folder: Path) -> Built:
    per_category: dict[str, int] = {}
    rows = []
    for i, (c, q, label) in enumerate(POPE_QUESTIONS):
        per_category[c] = per_category.get(c, 0) + 1  # question_id restarts in each category
        rows.append(
            {
                "id": str(i),
                "question_id": str(per_category[c]),
                "question": q,
                "answer": label,
                "image_source": "coco",
                "image": cell(RED),
                "category": c,
            }
        )
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
    # pooled over the 4: "Yes" (TP), "no" (TN), "Yes, there is" (neither: not exactly yes/no), "yes" (FP).
    # precision = 1 / (1 + 1) = 0.5, recall = TP / (TP + FN) = 1 / 1 = 1 (the third is not an FN),
    # F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    answers = ["Yes", "no", "Yes, there is", "yes"]
    return Built({q + SHORT: a for (_, q, _), a in zip(POPE_QUESTIONS, answers, strict=True)}, 2 / 3, 4)


SQA = [
    ("Which animal is a mammal?", ["frog", "whale", "shark"], 1, "Animals live in many places."),
    ("Which is a solid?", ["milk", "rock"], 1, ""),
    ("What is the capital of France?", ["Paris", "Rome"], 0, ""),
]


def scienceqa_llava(folder: Path) -> Built:
    records, problems, prompts = [], {}, []
    for i, (question, choices, answer, hint) in enumerate(SQA):
        pid = str(100 + i)
        options = " ".join(f"({chr(65 + k)}) {c}" for k, c in enumerate(choices))
        value = f"Context: {hint or 'N/A'}\n{question}\nOptions: {options}"
        record = {
            "id": pid,
            "conversations": [
                {"from": "human", "value": f"<image>\n{value}"},
                {"from": "gpt", "value": chr(65 + answer)},
            ],
        }
        if i < 2:  # the third question has no image: IMG-Accuracy leaves it out
            record["image"] = f"{pid}/image.png"
            save_image(folder / "test" / pid / "image.png")
        records.append(record)
        problems[pid] = {"question": question, "choices": choices, "answer": answer, "hint": hint}
        prompts.append(value + LETTER)
    records.append({"id": "999", "image": "999/image.png", "conversations": records[0]["conversations"]})  # not in test
    problems["999"] = problems["100"]
    (folder / "llava_test_CQM-A.json").write_text(json.dumps(records))
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"test": ["100", "101", "102"], "train": ["999"]}))
    # "B. whale" -> B (right); "The answer is A." for a B question -> wrong: 1/2 on the 2 image questions.
    return Built({prompts[0]: "B. whale", prompts[1]: "The answer is A."}, 0.5, 2)


def scienceqa_lmms(folder: Path) -> Built:
    rows, prompts = [], []
    for i, (question, choices, answer, hint) in enumerate(SQA):
        rows.append(
            {
                "image": cell(RED) if i < 2 else None,
                "question": question,
                "choices": choices,
                "answer": answer,
                "hint": hint,
                "task": "closed choice",
            }
        )
        context = f"Context: {hint}\n" if hint else ""
        listed = "\n".join(f"{chr(65 + k)}. {c}" for k, c in enumerate(choices))
        prompts.append(f"{context}{question}\n{listed}{LETTER}")
    write_parquet(folder / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    # "B" is right; "B. rock" is not accepted by lmms-eval's rule (only the bare letter): 1/2.
    return Built({prompts[0]: "B", prompts[1]: "B. rock"}, 0.5, 2)


def seedbench(folder: Path) -> Built:
    rows, answers = [], {}
    for i, (question, answer, reply) in enumerate(
        [("What is shown?", "A", "A"), ("How many people?", "C", "c) three"), ("Where is it?", "B", "D")]
    ):
        rows.append(
            {
                "answer": answer,
                "choice_a": "a dog",
                "choice_b": "a park",
                "choice_c": "three",
                "choice_d": "none",
                "data_id": f"{i}.jpg",
                "data_type": "image",
                "question": question,
                "question_id": f"q{i}",
                "question_type_id": 1,
                "image": [cell(RED)],
            }
        )
        prompt = f"{question}\nA. a dog\nB. a park\nC. three\nD. none{LETTER}"
        answers[prompt] = reply
    rows.insert(1, {**rows[0], "data_type": "video", "question_id": "v1", "image": [cell(GREEN), cell(BLUE)]})
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
    # "A" right; "c) three" -> first character "c" matches "C" ignoring case; "D" wrong: 2/3.
    # The video row is not an image question and is skipped.
    return Built(answers, 2 / 3, 3)


def mmmu(folder: Path) -> Built:
    def images(n):
        return {f"image_{k}": (cell(RED) if k <= n else None) for k in range(1, 8)}

    rows = [
        {
            "id": "validation_Art_1",
            "question": "<image 1> Which style is this?",
            "options": "['Baroque', 'Cubism']",
            "answer": "B",
            "question_type": "multiple-choice",
            **images(1),
        },
        {
            "id": "validation_Math_1",
            "question": "What is x in <image 1> and <image 2>?",
            "options": "[]",
            "answer": "3.5",
            "question_type": "open",
            **images(2),
        },
        {
            "id": "validation_Math_2",
            "question": "<image 1> Pick one.",
            "options": "['1', '2', '3']",
            "answer": "C",
            "question_type": "multiple-choice",
            **images(1),
        },
    ]
    write_parquet(folder / "data" / "validation-00000-of-00001.parquet", rows)
    letter = "\n\nAnswer with the option's letter from the given choices directly."
    prompts = [
        f"{rows[0]['question']}\nA. Baroque\nB. Cubism{letter}",
        f"{rows[1]['question']}\n\nAnswer the question using a single word or phrase.",
        f"{rows[2]['question']}\nA. 1\nB. 2\nC. 3{letter}",
    ]
    # "(B)" -> B: right. "so x = 3.50" -> the number 3.5 equals the answer 3.5: right.
    # "(A) or (C)" -> both bracketed; the last occurring is C: right. Art 1/1, Math 2/2: 1.0.
    return Built(dict(zip(prompts, ["(B)", "so x = 3.50", "(A) or (C)"], strict=True)), 1.0, 3)


def ai2d(folder: Path) -> Built:
    rows = [
        {"question": "Which is a producer?", "options": ["grass", "fox", "owl"], "answer": "0", "image": cell(RED)},
        {"question": "What eats grass?", "options": ["rabbit", "sun"], "answer": "0", "image": cell(GREEN)},
        {"question": "Which is at the top?", "options": ["hawk", "mouse"], "answer": "0", "image": cell(BLUE)},
    ]
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
    prompts = [
        f"{r['question']}\n" + "\n".join(f"{chr(65 + k)}. {o}" for k, o in enumerate(r["options"])) + LETTER
        for r in rows
    ]
    # "A. grass" -> "A": right. "a" -> no leading "X.", kept; ignore_case makes it "a" == "a": right.
    # "B" for A: wrong. 2/3.
    return Built(dict(zip(prompts, ["A. grass", "a", "B"], strict=True)), 2 / 3, 3)


def realworldqa(folder: Path) -> Built:
    tail = "\nPlease answer directly with only the letter of the correct option and nothing else."
    rows = [
        {"question": f"Which way is the arrow?\nA. left\nB. right{tail}", "answer": "B", "image": cell(RED)},
        {"question": "How many cars are there? Please answer with a number.", "answer": "3", "image": cell(GREEN)},
        {"question": f"What is ahead?\nA. a truck\nB. a bike{tail}", "answer": "A", "image": cell(BLUE)},
    ]
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
    # "right" is option B's text -> "B": right. "three" -> "3": right. "B." -> no option text
    # inside "B" (punctuation removed) -> "B" vs "A": wrong. 2/3.
    # The filters see the raw answer: "three\n" is not the number word "three", so it stays
    # "three" (after punctuation removal and strip) and misses "3": 1/3 with newlines.
    answers = dict(zip([r["question"] for r in rows], ["right", "three", "B."], strict=True))
    return Built(answers, 2 / 3, 3, padded_score=1 / 3)


BUILDERS = {
    "gqa": gqa,
    "textvqa": textvqa_llava,
    "vqav2": vqav2,
    "docvqa": docvqa,
    "infovqa": infovqa,
    "chartqa": chartqa,
    "ocrbench": ocrbench,
    "pope": pope_llava,
    "scienceqa_img": scienceqa_llava,
    "seedbench": seedbench,
    "mmmu": mmmu,
    "ai2d": ai2d,
    "realworldqa": realworldqa,
}
ALTERNATE_BUILDERS = {"textvqa": textvqa_lmms, "pope": pope_lmms, "scienceqa_img": scienceqa_lmms}
