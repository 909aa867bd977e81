"""LLaVA-format data: parsing, bad-record reporting, label masking, truncation; synthetic sets."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from transformers import AutoTokenizer

from fastvlm.processing import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Conversation, tokenize_prompt
from fastvlm.train.data import ReadReport, RecordError, iter_records, parse_record, tokenize_record
from fastvlm.train.synth import write_synthetic_dataset
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(fixture_path("apple_fastvlm_tiny"))


def _record(**changes):
    raw = {
        "id": "r1",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A red sign."},
            {"from": "human", "value": "And the text?"},
            {"from": "gpt", "value": "STOP"},
        ],
    }
    raw.update(changes)
    return raw


def test_only_assistant_answers_and_their_end_are_learned(tokenizer, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    record = parse_record(_record(image="a.png"), image_root=tmp_path, where="t:1")
    example = tokenize_record(tokenizer, record, num_image_tokens=16, max_length=512)
    learned = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "A red sign.<|im_end|>STOP<|im_end|>"
    conv = Conversation()
    for role, text in record.turns:
        conv.add(role, text)
    # the same ids the inference path produces for the same conversation
    assert example.input_ids == tokenize_prompt(tokenizer, conv.prompt(add_generation_prompt=False))
    assert example.input_ids.count(IMAGE_TOKEN_INDEX) == 1 and len(example.labels) == len(example.input_ids)


def test_image_placeholder_is_added_when_missing_and_text_only_records_work(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    raw = _record(image="a.png")
    raw["conversations"][0]["value"] = "What is it?"
    record = parse_record(raw, image_root=tmp_path, where="t:1")
    assert record.turns[0] == ("user", "<image>\nWhat is it?")
    raw = _record()
    raw["conversations"][0]["value"] = "Hello"
    assert parse_record(raw, image_root=None, where="t:2").image is None


def test_truncation_keeps_the_image_and_rejects_what_cannot_fit(tokenizer, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    record = parse_record(_record(image="a.png"), image_root=tmp_path, where="t:1")
    full = tokenize_record(tokenizer, record, num_image_tokens=16, max_length=4096)
    cut = tokenize_record(tokenizer, record, num_image_tokens=16, max_length=len(full.input_ids) + 15 - 4)
    assert cut.input_ids == full.input_ids[: len(full.input_ids) - 4] and IMAGE_TOKEN_INDEX in cut.input_ids
    assert cut.labels == full.labels[: len(cut.labels)]
    with pytest.raises(RecordError, match="visual tokens do not fit"):
        tokenize_record(tokenizer, record, num_image_tokens=16, max_length=20)
    # the exact boundary: the image's 16 positions must fit whole
    image_at = full.input_ids.index(IMAGE_TOKEN_INDEX)
    with pytest.raises(RecordError, match="visual tokens do not fit"):
        tokenize_record(tokenizer, record, num_image_tokens=16, max_length=image_at + 15)
    with pytest.raises(RecordError, match="nothing left to learn"):  # the image fits, no answer does
        tokenize_record(tokenizer, record, num_image_tokens=16, max_length=image_at + 16)
    first_answer = next(i for i, t in enumerate(full.labels) if t != IGNORE_INDEX)
    with pytest.raises(RecordError, match="nothing left to learn"):
        tokenize_record(tokenizer, record, num_image_tokens=16, max_length=first_answer + 15)
    one = tokenize_record(tokenizer, record, num_image_tokens=16, max_length=first_answer + 16)
    assert sum(t != IGNORE_INDEX for t in one.labels) == 1


def test_bad_records_are_reported_with_line_and_id_or_rejected(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")
    two_images = [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]
    lines = [
        json.dumps(_record(id="good", image="ok.png")).encode(),
        json.dumps(_record(id="noimg", image="missing.png")).encode(),
        b"{not json",
        json.dumps({"id": "noanswer", "conversations": [{"from": "human", "value": "hi"}]}).encode(),
        json.dumps(_record(id="twoimages", image="ok.png", conversations=two_images)).encode(),
        json.dumps(_record(id="imagelist", image=["ok.png"])).encode(),
        b"\xff\xfe not utf-8",
        json.dumps({"id": "gptfirst", "conversations": [{"from": "gpt", "value": "x"}]}).encode(),
    ]
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    report = ReadReport()
    records = list(iter_records(data, report=report))  # image paths relative to the file's folder
    assert [r.id for r in records] == ["good"] and report.read == 1
    assert report.skipped == [
        f"data.jsonl:2 (id noimg): image file not found: {tmp_path / 'missing.png'}",
        "data.jsonl:3: malformed JSON (Expecting property name enclosed in double quotes)",
        "data.jsonl:4 (id noanswer): no assistant ('gpt') turn to learn from",
        "data.jsonl:5 (id twoimages): 2 <image> placeholders for one image",
        "data.jsonl:6 (id imagelist): 'image' must be one relative path (a string), got list",
        "data.jsonl:7: malformed JSON (not UTF-8)",
        "data.jsonl:8 (id gptfirst): the conversation must start with a human turn",
    ]
    with pytest.raises(RecordError, match="data.jsonl:2 \\(id noimg\\): image file not found"):
        list(iter_records(data, image_root=tmp_path, strict=True))


def test_json_list_files_are_read_too(tmp_path):
    text_only = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    (tmp_path / "d.json").write_text(json.dumps([text_only, {"id": "b"}, _record(id="c")]))
    report = ReadReport()
    assert [r.id for r in iter_records(tmp_path / "d.json", report=report)] == ["a"]
    assert report.skipped == [
        "d.json[1] (id b): 'conversations' must be a non-empty list",
        "d.json[2] (id c): 1 <image> placeholder(s) but no 'image'",
    ]


def test_synthetic_set_is_valid_deterministic_and_answerable(tmp_path):
    files = write_synthetic_dataset(tmp_path / "a", 30, size=256, seed=7, test_fraction=0.2, progress=False)
    again = write_synthetic_dataset(tmp_path / "b", 30, size=256, seed=7, test_fraction=0.2, progress=False)
    assert files["train"].read_text() == again["train"].read_text()
    assert (tmp_path / "a" / "images" / "000003.png").read_bytes() == (
        tmp_path / "b" / "images" / "000003.png"
    ).read_bytes()
    report = ReadReport()
    train = list(iter_records(files["train"], image_root=tmp_path / "a", report=report, strict=True))
    test = list(iter_records(files["test"], image_root=tmp_path / "a", strict=True))
    assert (len(train), len(test)) == (24, 6) and not report.skipped
    from fastvlm.train.synth import COLORS, NUMBER_WORDS, SHAPES, WORDS

    vocab = {
        "What color": set(COLORS),
        "Which shape": set(SHAPES),
        "How many": set(NUMBER_WORDS[1:5]),
        "What word": set(WORDS),
    }
    seen = set()
    for record in train + test:
        question, answer = record.turns[0][1].split("\n")[1], record.turns[1][1]
        kind = next(k for k in vocab if question.startswith(k))
        assert answer in vocab[kind], (question, answer)
        seen.add(kind)
        with Image.open(record.image) as img:
            assert img.size == (256, 256)
    assert seen == set(vocab)  # every kind of question occurs


def test_data_commands(tmp_path, capsys):
    from fastvlm.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--num", "5", "--size", "128"]) == 0
    assert main(["data", "check", str(tmp_path / "s" / "train.jsonl")]) == 0  # image root: the file's folder
    assert "4 usable records, 0 skipped" in capsys.readouterr().out
    bad = tmp_path / "s" / "bad.jsonl"
    bad.write_text('{"id": "x", "image": "nope.png", "conversations": []}\n')
    assert main(["data", "check", str(bad), "--strict"]) == 2
    assert "bad.jsonl:1 (id x): 'conversations' must be a non-empty list" in capsys.readouterr().err


def test_synthetic_questions_need_binding_only_when_asked():
    import random

    from fastvlm.train.synth import make_example, question_kind

    simple = [make_example(random.Random(i), 128)[1] for i in range(40)]
    hard = [make_example(random.Random(i), 128, binding=True)[1] for i in range(40)]
    simple_questions = {
        "What color is the shape? Answer with one word.",
        "Which shape is in the image? Answer with one word.",
        "How many shapes are there? Answer with one word.",
        "What word is written in the image? Answer with the word.",
    }
    assert set(simple) == simple_questions
    assert any(q.startswith("What color is the ") and q not in simple_questions for q in hard)
    assert any(q.startswith("How many") and q not in simple_questions for q in hard)
    assert {question_kind(q) for q in simple} == {"color", "shape", "count", "word"}


def test_question_kind_weights_set_the_mix_and_bad_weights_are_named(tmp_path):
    import random
    from collections import Counter

    from fastvlm.errors import ConfigError
    from fastvlm.train.synth import make_example, question_kind

    def mix(**weights):
        rng = random.Random(0)
        return Counter(question_kind(make_example(rng, 64, kind_weights=weights or None)[1]) for _ in range(1000))

    equal, shapes = mix(), mix(color=1, shape=2, count=1, word=1)
    # shares of 2/5 and 1/4, within 4.5 standard deviations of 1000 draws
    assert 0.33 < shapes["shape"] / 1000 < 0.47 and 0.19 < equal["shape"] / 1000 < 0.31
    assert set(mix(shape=1)) == {"shape"}  # kinds left out get weight 0
    for bad, message in (({"colour": 1}, "unknown question kind"), ({"shape": 0}, "not all 0"), ({"word": -1}, ">= 0")):
        with pytest.raises(ConfigError, match=message):
            write_synthetic_dataset(tmp_path / "bad", 4, size=64, kind_weights=bad, progress=False)
        assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_all_questions_asks_each_training_image_what_its_scene_answers_and_keeps_the_test_split(tmp_path):
    from fastvlm.train.synth import COLORS, SHAPES, question_kind

    one = write_synthetic_dataset(tmp_path / "one", 40, size=128, seed=3, test_fraction=0.25, progress=False)
    every = write_synthetic_dataset(
        tmp_path / "all", 40, size=128, seed=3, test_fraction=0.25, progress=False, all_questions=True
    )
    assert every["test"].read_text() == one["test"].read_text()  # held-out: one question each, unchanged
    assert (tmp_path / "one" / "images" / "000020.png").read_bytes() == (
        tmp_path / "all" / "images" / "000020.png"
    ).read_bytes()
    singles = [json.loads(line) for line in one["train"].read_text().splitlines()]
    records = list(iter_records(every["train"], image_root=tmp_path / "all", strict=True))
    assert [r.id for r in records] == [s["id"] for s in singles]
    both = 0
    for single, record in zip(singles, records, strict=True):
        questions, answers = record.turns[0::2], record.turns[1::2]
        assert [role for role, _ in questions] == ["user"] * len(questions)
        assert questions[0][1] == single["conversations"][0]["value"]  # the first question is the one-question set's
        assert answers[0][1] == single["conversations"][1]["value"]
        kinds = [question_kind(text.split("\n")[-1]) for _, text in questions]
        if kinds[0] in ("color", "shape"):  # one shape: both its colour and its kind, each once
            both += 1
            assert sorted(kinds) == ["color", "shape"]
            by_kind = dict(zip(kinds, (a for _, a in answers), strict=True))
            assert by_kind["color"] in COLORS and by_kind["shape"] in SHAPES
        else:
            assert len(kinds) == 1
        assert sum(text.count("<image>") for _, text in questions) == 1
    assert both > 5
