"""vLLM with our plugin generates exactly what FastVLM.generate does (greedy, fp32), for both formats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

from fastvlm.errors import PromptError
from fastvlm.generation import stop_token_ids
from fastvlm.model import FastVLM
from fastvlm.processing import build_prompt

QUESTIONS = ["Describe the image.", "What colour is the largest object?", "Count the shapes, then name them."]


def images() -> list[Image.Image]:
    """Images that differ in content, size, aspect and mode (the processor converts each)."""
    rng = np.random.RandomState(0)
    gradient = np.tile(np.linspace(0, 255, 300).astype("uint8")[None, :, None], (200, 1, 3))
    return [
        Image.new("RGB", (300, 200), (255, 0, 0)),
        Image.fromarray((rng.rand(240, 320, 3) * 255).astype("uint8")),
        Image.fromarray(gradient),
        Image.new("RGBA", (120, 400), (0, 0, 255, 128)),
        Image.fromarray((rng.rand(64, 64) * 255).astype("uint8"), mode="L"),
    ]


@pytest.fixture(scope="module", params=["apple", "hf"])
def engines(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> Iterator[tuple[LLM, FastVLM]]:
    """(vLLM engine, our model) on the same checkpoint folder."""
    folder = str(checkpoints[request.param])
    llm = LLM(model=folder, dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=16, seed=0)
    yield llm, FastVLM.from_pretrained(folder)
    llm.llm_engine.engine_core.shutdown()


def request(image: Image.Image | None, question: str) -> dict:
    prompt = build_prompt(question, with_image=image is not None)
    return {"prompt": prompt} if image is None else {"prompt": prompt, "multi_modal_data": {"image": image}}


def greedy(model: FastVLM, max_tokens: int) -> SamplingParams:
    """Greedy, ending at the same tokens as FastVLM.generate."""
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=sorted(stop_token_ids(model)))


def test_one_request_at_a_time_matches_fastvlm(engines: tuple[LLM, FastVLM]) -> None:
    llm, model = engines
    answers = []
    for image in images()[:3]:
        for question in QUESTIONS[:2]:
            (out,) = llm.generate([request(image, question)], greedy(model, 16), use_tqdm=False)
            expected = model.generate(image, question, max_new_tokens=16)
            assert list(out.outputs[0].token_ids) == expected.token_ids, (question, image.size)
            assert len(out.prompt_token_ids) == expected.timings.prompt_tokens
            answers.append(tuple(expected.token_ids))
    # the comparison means something only if the answers depend on the image and the question
    assert len(set(answers)) == len(answers)


def test_batch_of_16_mixed_requests_matches_fastvlm(engines: tuple[LLM, FastVLM]) -> None:
    llm, model = engines
    pictures = images()
    batch = [(pictures[i % 5] if i % 4 else None, QUESTIONS[i % 3], 4 + 3 * (i % 6)) for i in range(16)]
    outs = llm.generate(
        [request(img, q) for img, q, _ in batch], [greedy(model, n) for _, _, n in batch], use_tqdm=False
    )
    for (image, question, max_tokens), out in zip(batch, outs, strict=True):
        expected = model.generate(image, question, max_new_tokens=max_tokens)
        assert list(out.outputs[0].token_ids) == expected.token_ids, (question, max_tokens)


def test_two_images_are_refused(engines: tuple[LLM, FastVLM]) -> None:
    llm, model = engines
    image = images()[0]
    prompt = build_prompt("<image>\n<image>\nCompare.", with_image=False)
    with pytest.raises(VLLMValidationError, match="At most 1 image"):
        llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": [image, image]}}], greedy(model, 4), use_tqdm=False
        )


def test_image_without_placeholder_is_refused(engines: tuple[LLM, FastVLM]) -> None:
    llm, model = engines
    prompt = build_prompt("Describe.", with_image=False)
    with pytest.raises(PromptError, match="0 <image> placeholder"):
        llm.generate([{"prompt": prompt, "multi_modal_data": {"image": images()[0]}}], greedy(model, 4), use_tqdm=False)
    # the engine is still usable afterwards
    (out,) = llm.generate([request(images()[0], "Describe.")], greedy(model, 2), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2
