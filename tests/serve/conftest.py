"""Fixtures of the server tests: the tiny fixture model, loaded once, and requests built from it.

Also the ``browser`` marker: the page's real-browser tests (``test_page.py``) run in their own
lane, ``make test-browser``, because they need a system Chromium; ``make test`` deselects them.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import httpx
import pytest
from PIL import Image

from fastvlm.model import FastVLM
from tests.conftest import fixture_path

TINY = "apple_fastvlm_tiny"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "browser: drives the page in headless Chromium (make test-browser; needs `apt-get install chromium`)",
    )


@pytest.fixture(scope="session")
def tiny_model() -> FastVLM:
    return FastVLM.from_pretrained(fixture_path(TINY))


@pytest.fixture(scope="session")
def golden() -> dict[str, Any]:
    return json.loads(fixture_path(TINY, "golden.json").read_text())


def png_bytes(size: tuple[int, int] = (8, 6), mode: str = "RGB", color: object = (200, 30, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")  # type: ignore[arg-type]
    return buffer.getvalue()


def data_url(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


def fixture_image_url() -> str:
    return data_url(fixture_path(TINY, "image.png").read_bytes())


def user_turn(text: str, *image_urls: str) -> dict[str, Any]:
    """A user message: the images first, then the question (the layout the model was trained on)."""
    if not image_urls:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def metric(base_url: str, name: str) -> float:
    """The value of an unlabelled metric in the server's /metrics text."""
    match = re.search(rf"^{name} (\S+)$", httpx.get(f"{base_url}/metrics", timeout=10).text, re.M)
    assert match is not None, f"{name} is not in /metrics"
    return float(match.group(1))
