"""``fastvlm predict`` reads its image file once: the early check's decoded image is what the model sees."""

from __future__ import annotations

import json

from PIL import Image

import fastvlm.processing
from fastvlm.cli import main
from tests.conftest import fixture_path


def test_predict_decodes_the_image_file_once_and_keeps_the_golden_answer(monkeypatch, capsys):
    opened: list[object] = []
    real_open = Image.open

    def counting_open(source, *args, **kwargs):
        opened.append(source)
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(fastvlm.processing.Image, "open", counting_open)
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    args = ["predict", "--model", str(fixture_path("apple_fastvlm_tiny")), "--image"]
    args += [str(fixture_path("apple_fastvlm_tiny", "image.png")), "--prompt", golden["question"]]
    assert main([*args, "--max-new-tokens", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == golden["greedy_token_ids"]
    image_reads = [s for s in opened if str(s).endswith("image.png")]
    assert len(image_reads) == 1, image_reads
