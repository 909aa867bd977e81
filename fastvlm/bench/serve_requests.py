"""The requests of the serving load test and soak: synthetic images, valid bodies, invalid ones.

Images are drawn here, seeded (a gradient, a dozen shapes, coarse noise), so a run needs
no data set and two runs send the same bytes. Noise in 2-pixel cells keeps every image
distinct and its PNG about the size of a photo's JPEG (some 110 KB at 512 px; per-pixel
noise would triple that, smooth shapes alone give 20 KB). A chosen fraction of requests carries one *shared* image,
which a server with a feature cache encodes once; every other request has its own.

Bodies are JSON-encoded once, before a level's clock starts, so the load generator spends
its time sending and reading, not drawing and compressing.

The invalid requests are each wrong in one way the API must refuse with a 4xx JSON error
(malformed JSON, bytes that are not an image, an unknown role, ``max_tokens`` 0, more
images than a prompt may hold...). A test checks each against the server's own request
parser and media rules, so "invalid" is a fact, not a hope.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CHAT_PATH = "/v1/chat/completions"
QUESTIONS = (
    "Describe the image.",
    "What shapes do you see, and what colours are they?",
    "Is there anything unusual in this picture?",
    "Count the objects in the image.",
)
SHAPES_PER_IMAGE = 12
NOISE_CELL_PX = 2  # side of one noise cell (see the module notes)
NOISE_AMPLITUDE = 24  # +- this much on each channel
SMALL_IMAGE_PX = 16  # the images of the too-many-images request
TOO_MANY_IMAGES = 8  # more than any sane per-prompt limit (the server's default is 1)

INVALID_KINDS = (
    "malformed_json",
    "not_an_image",
    "bad_role",
    "zero_max_tokens",
    "too_many_images",
    "empty_messages",
    "placeholder_in_text",
    "unsupported_url_scheme",
    "temperature_out_of_range",
    "image_in_assistant_turn",
)


# ------------------------------------------------------------------------------ images


def synthetic_image(size: int, seed: int) -> Image.Image:
    """A ``size`` x ``size`` RGB picture of shapes on a gradient with coarse noise, the same for the same seed."""
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]  # (1, W, 1)
    start, end = (np.array([rng.randrange(256) for _ in range(3)]) for _ in range(2))
    background = np.broadcast_to(start + (end - start) * ramp, (size, size, 3))  # (H, W, 3)
    cells = -(-size // NOISE_CELL_PX)
    noise = noise_rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, (cells, cells, 3))
    noise = noise.repeat(NOISE_CELL_PX, 0).repeat(NOISE_CELL_PX, 1)[:size, :size]  # (H, W, 3)
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(SHAPES_PER_IMAGE):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        box = (x0, y0, x0 + rng.randrange(size // 8, size // 2), y0 + rng.randrange(size // 8, size // 2))
        color = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=color)
        else:
            draw.rectangle(box, fill=color)
    return image


def png_data_url(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def is_shared(index: int, fraction: float) -> bool:
    """Whether request ``index`` carries the shared image: exactly ``fraction`` of any run, evenly spread."""
    return int((index + 1) * fraction) > int(index * fraction)


# ------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class PlannedRequest:
    """One request, ready to send: ``kind`` is "valid" or one of :data:`INVALID_KINDS`."""

    index: int
    body: bytes  # what is POSTed to /v1/chat/completions
    stream: bool
    kind: str = "valid"
    shared_image: bool = False
    max_tokens: int = 0

    @property
    def valid(self) -> bool:
        return self.kind == "valid"


def chat_body(
    image_url: str,
    question: str,
    *,
    max_tokens: int,
    stream: bool,
    model: str | None = None,
    ignore_eos: bool = False,
) -> dict[str, Any]:
    """A chat-completions body: one user turn with the image then the question (usage streamed too).

    ``ignore_eos`` (vLLM's extension, which our server takes too) makes every answer exactly
    ``max_tokens`` long, so that two servers compared generate the same number of tokens.
    """
    body: dict[str, Any] = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if model is not None:
        body["model"] = model
    if ignore_eos:
        body["ignore_eos"] = True
    return body


class Workload:
    """Makes the load test's and the soak's requests, seeded: the same arguments give the same bytes."""

    def __init__(
        self,
        *,
        image_size: int,
        max_tokens: int,
        shared_fraction: float = 0.0,
        model: str | None = None,
        seed: int = 0,
        ignore_eos: bool = False,
    ) -> None:
        if not 0.0 <= shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction must be between 0 and 1, got {shared_fraction}")
        self.image_size, self.max_tokens, self.shared_fraction = image_size, max_tokens, shared_fraction
        self.model, self.seed, self.ignore_eos = model, seed, ignore_eos
        self._shared_url: str | None = None

    @property
    def shared_url(self) -> str:
        if self._shared_url is None:
            self._shared_url = png_data_url(synthetic_image(self.image_size, self.seed))
        return self._shared_url

    def image_url(self, index: int, *, shared: bool) -> str:
        """The shared image, or request ``index``'s own (indices from 0: seeds never collide with the shared)."""
        if shared:
            return self.shared_url
        return png_data_url(synthetic_image(self.image_size, self.seed + 1 + index))

    def valid(self, index: int, *, stream: bool = True, shared: bool | None = None) -> PlannedRequest:
        """Request ``index``, with the shared image if ``shared`` (default: as :func:`is_shared` spreads them)."""
        if index < 0:
            raise ValueError(f"request indices start at 0, got {index}")
        shared = is_shared(index, self.shared_fraction) if shared is None else shared
        question = QUESTIONS[index % len(QUESTIONS)]
        url = self.image_url(index, shared=shared)
        body = chat_body(
            url, question, max_tokens=self.max_tokens, stream=stream, model=self.model, ignore_eos=self.ignore_eos
        )
        return PlannedRequest(
            index=index, body=json.dumps(body).encode(), stream=stream, shared_image=shared, max_tokens=self.max_tokens
        )

    def invalid(self, index: int, kind: str, *, stream: bool = False) -> PlannedRequest:
        """A request wrong in the one way ``kind`` names (small images: the error is not in the size)."""
        small_url = png_data_url(synthetic_image(SMALL_IMAGE_PX, self.seed + 1 + index))
        body = invalid_body(kind, small_url, stream=stream, max_tokens=self.max_tokens)
        return PlannedRequest(index=index, body=body, stream=stream, kind=kind, max_tokens=self.max_tokens)


def invalid_body(kind: str, image_url: str, *, stream: bool, max_tokens: int) -> bytes:
    """The bytes of a request wrong in the way ``kind`` names (one of :data:`INVALID_KINDS`)."""
    if kind == "malformed_json":
        text = json.dumps(chat_body(image_url, QUESTIONS[0], max_tokens=max_tokens, stream=stream))
        return text[: len(text) // 2].encode()  # cut in the middle of the image URL
    body = chat_body(image_url, QUESTIONS[0], max_tokens=max_tokens, stream=stream)
    message = body["messages"][0]
    if kind == "not_an_image":
        message["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(b"not a PNG").decode()
    elif kind == "bad_role":
        message["role"] = "robot"
    elif kind == "zero_max_tokens":
        body["max_tokens"] = 0
    elif kind == "too_many_images":
        message["content"] = [message["content"][0]] * TOO_MANY_IMAGES + [message["content"][1]]
    elif kind == "empty_messages":
        body["messages"] = []
    elif kind == "placeholder_in_text":
        message["content"][1]["text"] = "<image>\n" + QUESTIONS[0]
    elif kind == "unsupported_url_scheme":
        message["content"][0]["image_url"]["url"] = "ftp://127.0.0.1/image.png"
    elif kind == "temperature_out_of_range":
        body["temperature"] = 5.0
    elif kind == "image_in_assistant_turn":
        answer = {"role": "assistant", "content": [message["content"][0]]}
        body["messages"] = [message, answer, {"role": "user", "content": QUESTIONS[1]}]
    else:
        raise ValueError(f"unknown invalid-request kind {kind!r}; expected one of {', '.join(INVALID_KINDS)}")
    return json.dumps(body).encode()
