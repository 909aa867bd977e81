"""Synthetic image–question–answer data in LLaVA's format, for tests, demos and smoke training.

Each image is a large canvas with a few coloured shapes and sometimes a short rendered
word; each record asks one question whose answer is a single word (a colour, a shape, a
count or the word), so answers can be scored by exact match. Generation is deterministic
for a seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from fastvlm.errors import ConfigError

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("CAT", "SUN", "MAP", "BOX", "KEY", "JAR", "SKY", "FOX", "CUP", "HAT")  # none is also a colour
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
KINDS = ("color", "shape", "count", "word")  # the skills a question tests, see question_kind()


@dataclass
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(shape.box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _place(
    rng: random.Random, size: int, taken: list[tuple[int, int, int, int]], side: int
) -> tuple[int, int, int, int] | None:
    """A free square cell for a shape of ``side`` px, or None after a few tries."""
    for _ in range(50):
        x, y = rng.randrange(0, size - side), rng.randrange(0, size - side)
        box = (x, y, x + side, y + side)
        if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in taken):
            return box
    return None


def check_kind_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` as a dict over :data:`KINDS` (missing kinds get 0), or a ConfigError saying what is wrong."""
    unknown = sorted(set(weights) - set(KINDS))
    if unknown:
        raise ConfigError(f"unknown question kind(s) {', '.join(unknown)}; expected some of {', '.join(KINDS)}")
    if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ConfigError(f"question-kind weights must be >= 0 and not all 0; got {dict(weights)}")
    return {kind: float(weights.get(kind, 0.0)) for kind in KINDS}


def make_example(
    rng: random.Random, size: int, *, binding: bool = False, kind_weights: Mapping[str, float] | None = None
) -> tuple[Image.Image, str, str]:
    """(image, question, one-word answer) for one random scene: the first question of :func:`make_scene`."""
    img, questions = make_scene(rng, size, binding=binding, kind_weights=kind_weights)
    return img, *questions[0]


def make_scene(
    rng: random.Random, size: int, *, binding: bool = False, kind_weights: Mapping[str, float] | None = None
) -> tuple[Image.Image, list[tuple[str, str]]]:
    """(image, [(question, one-word answer), ...]) for one random scene.

    The first question is of the kind drawn; the others are the further questions the same
    scene answers without new randomness (the one shape of a colour or shape question gets
    both: its colour and its kind), so a training record can ask them all for one image.

    The kind of the first question (:data:`KINDS`) is drawn uniformly, or in proportion to
    ``kind_weights`` (e.g. ``{"shape": 2, "color": 1, "count": 1, "word": 1}``: shape
    is the skill a small model trained from scratch learns last, see examples/).

    By default a question never needs one object's property looked up through another's
    (the colour or kind of the one shape shown; how many shapes, all alike): a model of a
    few million parameters learns these on a CPU in minutes. ``binding=True`` asks about
    one shape among several ("What color is the circle?", "How many squares?" among
    others), which needs a larger model or a much longer run.
    """
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    taken: list[tuple[int, int, int, int]] = []
    if kind_weights is None:
        kind = rng.choice(KINDS)
    else:
        weights = check_kind_weights(kind_weights)
        kind = rng.choices(KINDS, weights=[weights[k] for k in KINDS])[0]
    side = size // 4  # a shape spans about one visual token's 64-px cell at 256 px
    colors = list(COLORS)
    if kind == "word":
        word = rng.choice(WORDS)
        font = ImageFont.load_default(size=size // 6)
        draw.text((size // 5, size // 3), word, fill=(20, 20, 20), font=font)
        return img, [("What word is written in the image? Answer with the word.", word)]
    if kind == "count":
        target, color = rng.choice(SHAPES), rng.choice(colors)
        n = rng.randint(1, 4)
        shapes = [Shape(target, color, (0, 0, 0, 0)) for _ in range(n)]
        if binding:
            others = [s for s in SHAPES if s != target]
            shapes += [Shape(rng.choice(others), rng.choice(colors), (0, 0, 0, 0)) for _ in range(rng.randint(0, 2))]
            question = f"How many {target}s are there? Answer with one word."
        else:
            question = "How many shapes are there? Answer with one word."
        questions = [(question, NUMBER_WORDS[n])]
    elif not binding:
        pick = Shape(rng.choice(SHAPES), rng.choice(colors), (0, 0, 0, 0))
        shapes = [pick]
        ask_color = ("What color is the shape? Answer with one word.", pick.color)
        ask_kind = ("Which shape is in the image? Answer with one word.", pick.kind)
        questions = [ask_color, ask_kind] if kind == "color" else [ask_kind, ask_color]
    else:
        kinds = rng.sample(SHAPES, k=rng.randint(1, 3))
        chosen = rng.sample(colors, k=len(kinds))
        shapes = [Shape(k, c, (0, 0, 0, 0)) for k, c in zip(kinds, chosen, strict=True)]
        pick = rng.choice(shapes)
        ask_color = (f"What color is the {pick.kind}? Answer with one word.", pick.color)
        ask_kind = (f"Which shape is {pick.color}? Answer with one word.", pick.kind)
        questions = [ask_color, ask_kind] if kind == "color" else [ask_kind, ask_color]
    for shape in shapes:
        box = _place(rng, size, taken, side)
        if box is None:  # no room: a simpler scene
            return make_scene(rng, size, binding=binding, kind_weights=kind_weights)
        shape.box = box
        taken.append(box)
        _draw_shape(draw, shape)
    return img, questions


def write_synthetic_dataset(
    out: str | Path,
    num: int,
    *,
    size: int = 512,
    seed: int = 0,
    test_fraction: float = 0.1,
    progress: bool = True,
    binding: bool = False,
    kind_weights: Mapping[str, float] | None = None,
    all_questions: bool = False,
) -> dict[str, Path]:
    """Write ``images/``, ``train.jsonl`` and ``test.jsonl`` (LLaVA format) under ``out``.

    ``kind_weights`` (see :func:`make_scene`) applies to both splits, so the held-out
    set has the training mix of questions. ``all_questions`` gives each training record every
    question its scene answers, as turns of one conversation (the image is encoded once for
    all of them); held-out records keep one question each, so scores stay comparable. The
    images and first questions are the same either way.
    """
    from tqdm.auto import tqdm

    if num < 1 or not 0 <= test_fraction < 1:
        raise ConfigError("num must be at least 1 and test_fraction in [0, 1)")
    if kind_weights is not None:
        kind_weights = check_kind_weights(kind_weights)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_test = int(round(num * test_fraction))
    if test_fraction > 0 and num > 1:  # both splits get at least one example
        n_test = min(max(n_test, 1), num - 1)
    files = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    with files["train"].open("w") as train, files["test"].open("w") as test:
        for i in tqdm(range(num), desc="synthetic data", disable=not progress, unit="image"):
            img, questions = make_scene(rng, size, binding=binding, kind_weights=kind_weights)
            name = f"images/{i:06d}.png"
            img.save(out / name)
            held_out = i < n_test
            conversation: list[dict[str, str]] = []
            for question, answer in questions if all_questions and not held_out else questions[:1]:
                prefix = "" if conversation else "<image>\n"
                conversation += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
            record = {"id": f"synth-{i:06d}", "image": name, "conversations": conversation}
            (test if held_out else train).write(json.dumps(record) + "\n")
    return files


def question_kind(question: str) -> str:
    """'color', 'shape', 'count' or 'word': which skill a synthetic question tests."""
    for prefix, kind in (
        ("What color", "color"),
        ("Which shape", "shape"),
        ("How many", "count"),
        ("What word", "word"),
    ):
        if question.startswith(prefix):
            return kind
    return "other"


def exact_match(model: FastVLM, data_file: str | Path, *, batch_size: int = 32, progress: bool = True) -> dict:
    """Greedy answers to the records of ``data_file`` scored by exact match (after stripping).

    Returns {"accuracy", "n", "by_kind": {kind: accuracy}, "errors": [(id, expected, got)...]}.
    """
    from tqdm.auto import tqdm

    from fastvlm.processing import DEFAULT_IMAGE_TOKEN
    from fastvlm.train.data import iter_records

    records = list(iter_records(data_file, strict=True))
    hits: dict[str, list[bool]] = {}
    errors = []
    for start in tqdm(range(0, len(records), batch_size), desc="scoring", disable=not progress, unit="batch"):
        chunk = records[start : start + batch_size]
        questions = [r.turns[0][1].replace(DEFAULT_IMAGE_TOKEN, "").strip() for r in chunk]
        results = model.generate([r.image for r in chunk], questions, max_new_tokens=16)
        assert isinstance(results, list)  # a list of prompts gives a list of results
        for record, question, result in zip(chunk, questions, results, strict=True):
            expected, got = record.turns[1][1].strip(), result.text.strip()
            hits.setdefault(question_kind(question), []).append(got == expected)
            if got != expected:
                errors.append((record.id, expected, got))
    n = sum(len(v) for v in hits.values())
    return {
        "accuracy": sum(sum(v) for v in hits.values()) / max(n, 1),
        "n": n,
        "by_kind": {kind: sum(v) / len(v) for kind, v in sorted(hits.items())},
        "errors": errors,
    }
