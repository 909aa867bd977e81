"""Every task end to end: real layouts, exact prompts, official scores, resumable runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from fastvlm.cli import main
from fastvlm.eval import TASKS, evaluate, read_predictions, rescore
from fastvlm.eval.data import DataError
from tests.conftest import fixture_path
from tests.eval.layouts import ALTERNATE_BUILDERS, BUILDERS, SHORT, gqa, pope_llava, save_image


@dataclass
class _Answer:
    text: str


class ScriptedModel:
    """Answers from a prompt -> answer table; an unexpected prompt fails the test, so the
    prompts a task builds are checked character for character."""

    def __init__(self, answers: dict[str, str], pad: str = "") -> None:
        self.answers, self.pad = answers, pad
        self.asked: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.colors: dict[str, tuple | None] = {}  # prompt -> the colour of the image it came with
        self.max_new_tokens: set[int] = set()
        self.config = type("Config", (), {"image_mode": "pad"})()
        self.source_path = Path("scripted")

    def generate(self, images, prompts, *, max_new_tokens: int):
        assert len(images) == len(prompts)
        for image, prompt in zip(images, prompts, strict=True):
            assert image is None or (isinstance(image, Image.Image) and image.mode == "RGB")
            self.sizes += [image.size] if image is not None else []
            self.colors[prompt] = image.getpixel((0, 0)) if image is not None else None
        for prompt in prompts:
            assert prompt in self.answers, f"unexpected prompt {prompt!r}"
        self.asked += prompts
        self.max_new_tokens.add(max_new_tokens)
        return [_Answer(self.answers[p] + self.pad) for p in prompts]


# The protocols' decoding limits: LLaVA's model_vqa_loader 128 and model_vqa_science 1024;
# lmms-eval's yaml generation_kwargs, or its LLaVA model's default 1024 where the yaml sets none.
MAX_NEW_TOKENS = {
    ("gqa", "llava"): 128,
    ("textvqa", "llava"): 128,
    ("textvqa", "lmms-eval"): 1024,
    ("vqav2", "lmms-eval"): 16,
    ("docvqa", "lmms-eval"): 32,
    ("infovqa", "lmms-eval"): 32,
    ("chartqa", "lmms-eval"): 16,
    ("ocrbench", "lmms-eval"): 128,
    ("pope", "llava"): 128,
    ("pope", "lmms-eval"): 128,
    ("scienceqa_img", "llava"): 1024,
    ("scienceqa_img", "lmms-eval"): 16,
    ("seedbench", "lmms-eval"): 1024,
    ("mmmu", "lmms-eval"): 16,
    ("ai2d", "lmms-eval"): 16,
    ("realworldqa", "lmms-eval"): 16,
}


CASES = [(name, build) for name, build in BUILDERS.items()] + [(n, b) for n, b in ALTERNATE_BUILDERS.items()]


@pytest.mark.parametrize("task,build", CASES, ids=[f"{n}-{b.__name__}" for n, b in CASES])
@pytest.mark.parametrize("pad", ["", "\n"], ids=["exact", "newline"])
def test_each_task_prompts_and_scores_as_its_official_script(tmp_path, task, build, pad):
    built = build(tmp_path / "data")
    layout = TASKS[task].layout_for(tmp_path / "data")
    model = ScriptedModel(built.answers, pad=pad)
    result = evaluate(model, task, tmp_path / "data", tmp_path / "out", batch_size=2, progress=False)
    assert result["n"] == built.n and result["errors"] == 0
    expected = built.padded_score if pad and built.padded_score is not None else built.score
    assert result["score"] == pytest.approx(expected, abs=1e-12)
    assert sorted(model.asked) == sorted(built.answers)  # every sample asked once
    assert model.max_new_tokens == {MAX_NEW_TOKENS[task, layout.name]}
    saved = json.loads((tmp_path / "out" / task / "results.json").read_text())
    assert saved["score"] == result["score"] and saved["metric"] == layout.headline
    stored = read_predictions(tmp_path / "out" / task / "predictions.jsonl")
    assert all(row["prediction"].endswith(pad) for row in stored.values())  # kept as decoded


def test_detailed_metrics_of_pope_and_chartqa(tmp_path):
    built = pope_llava(tmp_path / "pope")
    r = evaluate(ScriptedModel(built.answers), "pope", tmp_path / "pope", tmp_path / "out", progress=False)
    per = r["metrics"]["by_category"]
    adversarial, popular, rand = per["adversarial"], per["popular"], per["random"]
    assert (adversarial["tp"], adversarial["tn"], popular["fn"], rand["fp"]) == (1, 1, 1, 1)
    assert adversarial["yes_ratio"] == 0.5 and rand["yes_ratio"] == 1.0
    chart = BUILDERS["chartqa"](tmp_path / "chart")
    m = evaluate(ScriptedModel(chart.answers), "chartqa", tmp_path / "chart", tmp_path / "out", progress=False)
    assert m["metrics"]["relaxed_human_split"] == 0.5 and m["metrics"]["relaxed_augmented_split"] == 1.0


def test_docvqa_reports_lmms_evals_thresholded_anls_and_the_continuous_one(tmp_path):
    built = BUILDERS["docvqa"](tmp_path / "doc")
    r = evaluate(ScriptedModel(built.answers), "docvqa", tmp_path / "doc", tmp_path / "out", progress=False)
    assert r["metrics"]["anls"] == pytest.approx(2 / 3) and r["metrics"]["anls_continuous"] == pytest.approx(1.9 / 3)


def test_llava_gqa_folder_with_its_data_subfolder_and_images_keep_their_stored_orientation(tmp_path):
    built = gqa(tmp_path / "gqa")
    (tmp_path / "gqa" / "data").mkdir()
    (tmp_path / "gqa" / "testdev_balanced_questions.json").rename(
        tmp_path / "gqa" / "data" / "testdev_balanced_questions.json"
    )
    (tmp_path / "gqa" / "images").rename(tmp_path / "gqa" / "data" / "images")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° to display": LLaVA's loader and datasets ignore it
    Image.new("RGB", (40, 20), (9, 9, 9)).save(tmp_path / "gqa" / "data" / "images" / "n1.jpg", exif=exif)
    model = ScriptedModel(built.answers)
    result = evaluate(model, "gqa", tmp_path / "gqa", tmp_path / "out", batch_size=1, progress=False)
    assert result["score"] == pytest.approx(built.score) and model.sizes[0] == (40, 20)


def test_parquet_shards_are_found_per_config_and_never_mixed(tmp_path):
    BUILDERS["docvqa"](tmp_path / "repo")
    built = BUILDERS["infovqa"](tmp_path / "repo")  # both configs of lmms-lab/DocVQA side by side
    for task in ("docvqa", "infovqa"):
        r = evaluate(ScriptedModel(built.answers), task, tmp_path / "repo", tmp_path / "out", progress=False)
        assert r["n"] == 3
    direct = ScriptedModel(built.answers)  # --data pointing at the config folder itself
    assert evaluate(direct, "infovqa", tmp_path / "repo" / "InfographicVQA", tmp_path / "o2", progress=False)["n"] == 3
    with pytest.raises(DataError, match="no 'validation' parquet files"):  # DocVQA's shards are not InfoVQA's
        evaluate(direct, "infovqa", tmp_path / "repo" / "DocVQA", tmp_path / "o3", progress=False)
    BUILDERS["chartqa"](tmp_path / "two" / "chartqa")
    BUILDERS["ai2d"](tmp_path / "two" / "ai2d")
    with pytest.raises(DataError, match="parquet files in several folders"):
        evaluate(direct, "ai2d", tmp_path / "two", tmp_path / "o4", progress=False)


def test_interrupted_run_resumes_without_repeating_samples(tmp_path):
    built = gqa(tmp_path / "gqa")
    first = ScriptedModel(built.answers)
    evaluate(first, "gqa", tmp_path / "gqa", tmp_path / "out", limit=2, batch_size=1, progress=False)
    assert len(first.asked) == 2
    pred_file = tmp_path / "out" / "gqa" / "predictions.jsonl"
    with pred_file.open("a") as f:  # a run killed while writing its third line
        f.write('{"id": "203", "predic')
    second = ScriptedModel(built.answers)
    result = evaluate(second, "gqa", tmp_path / "gqa", tmp_path / "out", progress=False)
    assert len(second.asked) == 1 and result["throughput"]["new_samples"] == 1
    assert result["n"] == 3 and result["score"] == pytest.approx(built.score)
    assert len(read_predictions(pred_file)) == 3 and pred_file.read_text().count("\n") == 3


def test_predictions_from_other_settings_are_not_mixed(tmp_path):
    built = gqa(tmp_path / "gqa")
    evaluate(ScriptedModel(built.answers), "gqa", tmp_path / "gqa", tmp_path / "out", limit=1, progress=False)
    with pytest.raises(DataError, match="max_new_tokens: 128 -> 5"):
        evaluate(
            ScriptedModel(built.answers), "gqa", tmp_path / "gqa", tmp_path / "out", max_new_tokens=5, progress=False
        )
    again = ScriptedModel(built.answers)
    result = evaluate(
        again, "gqa", tmp_path / "gqa", tmp_path / "out", max_new_tokens=5, overwrite=True, progress=False
    )
    assert len(again.asked) == 3 and result["n"] == 3


def test_a_broken_image_is_reported_and_the_run_goes_on(tmp_path):
    built = gqa(tmp_path / "gqa")
    (tmp_path / "gqa" / "images" / "n2.jpg").write_bytes(b"not an image")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "gqa" / "images" / "n3.png", format="PNG")
    (tmp_path / "gqa" / "images" / "n3.png").rename(tmp_path / "gqa" / "images" / "n3.jpg")
    model = ScriptedModel(built.answers)
    result = evaluate(model, "gqa", tmp_path / "gqa", tmp_path / "out", batch_size=3, progress=False)
    assert result["errors"] == 1 and len(model.asked) == 2
    # the batch lost its middle sample: the third prompt still travels with the third image
    assert model.colors["Which color is the car?" + SHORT] == (0, 0, 255)
    rows = read_predictions(tmp_path / "out" / "gqa" / "predictions.jsonl")
    assert "cannot read image" in rows["202"]["error"] and rows["202"]["prediction"] == ""
    assert result["score"] == pytest.approx(1 / 3)  # the empty answer to "cup" is wrong
    save_image(tmp_path / "gqa" / "images" / "n2.jpg")  # repaired: the next run tries that sample again
    again = ScriptedModel(built.answers)
    result = evaluate(again, "gqa", tmp_path / "gqa", tmp_path / "out", progress=False)
    assert again.asked == ["What is on the table?" + SHORT] and result["errors"] == 0
    assert result["score"] == pytest.approx(built.score)


def test_missing_and_malformed_data_are_named(tmp_path):
    gqa(tmp_path / "gqa")
    (tmp_path / "gqa" / "testdev_balanced_questions.json").unlink()
    with pytest.raises(DataError, match="testdev_balanced_questions.json"):
        evaluate(ScriptedModel({}), "gqa", tmp_path / "gqa", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="none of the expected layouts.*llava_pope_test.jsonl.*test-\\*.parquet"):
        evaluate(ScriptedModel({}), "pope", tmp_path / "empty", tmp_path / "out", progress=False)
    BUILDERS["docvqa"](tmp_path / "doc")  # DocVQA shards only: InfoVQA must not read them
    with pytest.raises(DataError, match="no 'validation' parquet files"):
        evaluate(ScriptedModel({}), "infovqa", tmp_path / "doc", tmp_path / "out", progress=False)
    pope_llava(tmp_path / "pope")
    with (tmp_path / "pope" / "llava_pope_test.jsonl").open("a") as f:
        f.write("{broken\n")
    with pytest.raises(DataError, match="llava_pope_test.jsonl:5 is not valid JSON"):
        evaluate(ScriptedModel({}), "pope", tmp_path / "pope", tmp_path / "out", progress=False)


def test_cli_runs_every_task_with_a_real_model(tmp_path, capsys):
    for name, build in BUILDERS.items():
        build(tmp_path / "bench" / name)
    code = main(
        [
            "eval",
            "--model",
            str(fixture_path("apple_fastvlm_tiny")),
            "--tasks",
            "all",
            "--data",
            str(tmp_path / "bench"),
            "--out",
            str(tmp_path / "out"),
            "--limit",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    table = (tmp_path / "out" / "results.md").read_text()
    for name in BUILDERS:
        r = json.loads((tmp_path / "out" / name / "results.json").read_text())
        assert r["task"] == name and r["n"] == 2 and r["errors"] == 0 and r["limit"] == 2
        assert 0.0 <= r["score"] <= 1.0 and r["metric"] in r["metrics"]
        assert r["throughput"]["new_samples"] == 2 and r["throughput"]["samples_per_s"] > 0
        assert r["max_new_tokens"] == 3 and r["protocol"]
        assert TASKS[name].title in table and f"{TASKS[name].title}: " in out
        preds = (tmp_path / "out" / name / "predictions.jsonl").read_text().splitlines()
        assert len(preds) == 2 and all("prediction" in json.loads(p) for p in preds)


def test_cli_rejects_unknown_tasks_and_missing_folders(tmp_path, capsys):
    model = str(fixture_path("apple_fastvlm_tiny"))
    assert main(["eval", "--model", model, "--task", "nope", "--data", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--tasks", "gqa,pope", "--data", str(tmp_path)]) == 2
    assert "no sub-folder named after a task" in capsys.readouterr().err


def test_rescoring_needs_only_the_run_folder(tmp_path, capsys):
    built = BUILDERS["mmmu"](tmp_path / "mmmu")
    first = evaluate(ScriptedModel(built.answers), "mmmu", tmp_path / "mmmu", tmp_path / "out", progress=False)
    (tmp_path / "mmmu").rename(tmp_path / "gone")  # the data is not needed any more
    again = rescore(tmp_path / "out", "mmmu")
    assert again["score"] == first["score"] and again["metrics"] == first["metrics"] and again["rescored"]
    pred_file = tmp_path / "out" / "mmmu" / "predictions.jsonl"
    rows = [json.loads(line) for line in pred_file.read_text().splitlines()]
    rows[0]["prediction"] = "(A)"  # a wrong letter for the Art question: Art 0/1, Math 2/2 -> 2/3
    pred_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval-rescore", "--out", str(tmp_path / "out")]) == 0
    assert "MMMU (val): accuracy 66.67 on 3 samples" in capsys.readouterr().out
    assert main(["eval-rescore", "--out", str(tmp_path / "nothing")]) == 2
