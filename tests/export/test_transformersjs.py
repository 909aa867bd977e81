"""A client no one here wrote loads our ONNX folder: Transformers.js in Node (issue 14).

`fastvlm export onnx` writes a folder; tests/export/js/answer.mjs loads it with the npm
package ``@huggingface/transformers`` (onnxruntime-node, CPU) exactly as its documentation
loads FastVLM / LLaVA-style models (AutoProcessor, AutoModelForImageTextToText,
load_image, the processor's chat template, ``model.generate``) and answers a question
greedily. The answer's token ids must equal ``FastVLM.generate``'s in fp32.

The image both sides see is the fixture's image.png already padded and resized by our own
processor and saved as an S x S PNG: Transformers.js cannot pad-then-resize like the
authors (see docs/transformersjs-notes.md), but neither side resizes an image that already
has the tower's size, so both read the same ``uint8 / 255`` pixels.

Run with ``make test-js`` (installs tests/export/js/node_modules with npm, then
``pytest -m js``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvlm.generation import stop_token_ids
from fastvlm.model import FastVLM
from fastvlm.processing import build_prompt, load_image
from tests.conftest import fixture_path

pytestmark = pytest.mark.js

JS_DIR = Path(__file__).resolve().parent / "js"
QUESTION = "What is written on the sign?"
MAX_NEW_TOKENS = 12


def _check_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("the js lane needs Node.js (node on PATH)")
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail(f"{JS_DIR}/node_modules is not installed: run `make test-js` (npm ci in tests/export/js)")
    return node


def _square_image(model: FastVLM, out: Path) -> Path:
    """The fixture image as our processor prepares it (pad mode), stored as an S x S 8-bit PNG."""
    pixels = model.image_processor.preprocess(load_image(fixture_path("apple_fastvlm_tiny", "image.png")))
    array = (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array, "RGB").save(out)
    return out


def _export(fixture: str, out: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "fastvlm.cli", "export", "onnx", str(fixture_path(fixture)), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"fastvlm export onnx failed:\n{result.stdout}\n{result.stderr}"
    return out


def _answer_in_node(node: str, folder: Path, image: Path) -> dict:
    result = subprocess.run(
        [
            node,
            "answer.mjs",
            "--model",
            str(folder),
            "--image",
            str(image),
            "--question",
            QUESTION,
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--dtype",
            "fp32",
        ],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"answer.mjs failed on {folder}:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _without_trailing_stop(ids: list[int], stops: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stops else ids


@pytest.mark.parametrize("fixture", ["apple_fastvlm_tiny", "hf_fastvlm_tiny"])
def test_transformersjs_answers_with_pytorch_greedy_tokens(fixture: str, tmp_path: Path) -> None:
    node = _check_node()
    model = FastVLM.from_pretrained(fixture_path(fixture), dtype=torch.float32)
    image = _square_image(model, tmp_path / "image.png")
    folder = _export(fixture, tmp_path / "onnx_folder")

    expected = model.generate(image=image, prompt=QUESTION, max_new_tokens=MAX_NEW_TOKENS)
    got = _answer_in_node(node, folder, image)

    # The chat template the folder ships renders our prompt, and the processor expands
    # <image> to the tower's token count.
    assert got["prompt"] == build_prompt(QUESTION)
    image_token = model.tokenizer.convert_tokens_to_ids("<image>")
    assert got["input_ids"].count(image_token) == model.config.num_image_tokens()
    assert got["pixel_values_shape"] == [1, 3, model.config.image_size, model.config.image_size]

    # Transformers.js keeps the end-of-turn token it stopped on; FastVLM.generate may not.
    stops = stop_token_ids(model)
    assert _without_trailing_stop(got["token_ids"], stops) == _without_trailing_stop(expected.token_ids, stops), (
        f"Transformers.js answered {got['text']!r} {got['token_ids']}, PyTorch {expected.text!r} {expected.token_ids}"
    )
