"""OpenAI chat-completions requests and responses, as plain data (no HTTP framework).

A request body (already parsed JSON) becomes a :class:`ChatRequest`: the conversation in
our template's terms (:class:`~fastvlm.processing.Conversation` with ``<image>`` where each
image part stood), the image URLs in order, and the sampling settings. Every problem is a
:class:`RequestError` that names the offending field (``param``, e.g.
``messages[0].content[1].image_url``) and carries the HTTP status and OpenAI error type,
so the server answers 400 with a useful message instead of a stack trace. Responses and
stream chunks are built here too, so that every engine behind the API (ours, vLLM's)
returns the same shapes.

The facts matched are those of OpenAI's API reference and of what vLLM's and llama.cpp's
tests check (``shared/spec/SERVING.md``): ``image_url`` must be an object, ``n`` must be 1,
``max_tokens`` and ``max_completion_tokens`` are synonyms, ``stop`` is a string or a list.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastvlm.errors import FastVLMError
from fastvlm.processing import DEFAULT_IMAGE_TOKEN, ROLES, SYSTEM_PROMPT, Conversation

MAX_STOP_SEQUENCES = 4  # OpenAI's limit on `stop`
DEFAULT_MAX_TOKENS = 256  # when a request names no limit (the CLI's predict default)
INVALID_REQUEST = "invalid_request_error"


class RequestError(FastVLMError, ValueError):
    """A request the API refuses: ``status`` and ``error_type`` are what the client receives."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        error_type: str = INVALID_REQUEST,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.error_type, self.code = message, param, status, error_type, code


def error_body(message: str, *, error_type: str, param: str | None = None, code: str | int | None = None) -> dict:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: answer exactly max_tokens tokens (load tests)


@dataclass
class ChatRequest:
    """A validated chat-completions request in our terms."""

    model: str | None
    conversation: Conversation
    image_urls: list[str]
    sampling: SamplingSettings
    stream: bool = False
    include_usage: bool = False

    @property
    def prompt(self) -> str:
        return self.conversation.prompt()


# --------------------------------------------------------------------------- parsing


def parse_chat_request(body: object) -> ChatRequest:
    """Validate a chat-completions body (parsed JSON) and translate it to a :class:`ChatRequest`."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", param="model")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(f"only n=1 is supported, got {n!r}", param="n")
    conversation, image_urls = parse_messages(body.get("messages"))
    stream = _boolean(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return ChatRequest(
        model=model,
        conversation=conversation,
        image_urls=image_urls,
        sampling=parse_sampling(body),
        stream=stream,
        include_usage=stream and bool(options.get("include_usage", False)),
    )


def parse_messages(messages: object) -> tuple[Conversation, list[str]]:
    """The conversation (system prompt, then user/assistant turns) and the image URLs in order."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", param="messages")
    system = SYSTEM_PROMPT
    turns: list[tuple[str, str]] = []
    image_urls: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        text, urls = parse_content(message.get("content"), where, allow_images=role == "user")
        if role == "system":
            if turns:
                raise RequestError("a system message may only come first", param=f"{where}.role")
            system = text
        elif role in ROLES:
            turns.append((str(role), text))
            image_urls += urls
        else:
            expected = ", ".join(("system", *ROLES))
            raise RequestError(f"{where}.role {role!r} is not one of {expected}", param=f"{where}.role")
    if not turns or turns[-1][0] != "user":
        raise RequestError("the last message must be from the user", param="messages")
    conversation = Conversation(system=system)
    for role, text in turns:
        conversation.add(role, text)
    return conversation, image_urls


def parse_content(content: object, where: str, *, allow_images: bool) -> tuple[str, list[str]]:
    """A message's text, with ``<image>`` where each image part stood, and its image URLs.

    Parts are joined with newlines, so ``[image, text]`` reads ``<image>\\n{text}``: the
    layout the model was trained on.
    """
    if isinstance(content, str):
        _refuse_placeholder(content, f"{where}.content")
        return content, []
    if not isinstance(content, list) or not content:
        raise RequestError(f"{where}.content must be a string or a non-empty list of parts", param=f"{where}.content")
    pieces: list[str] = []
    urls: list[str] = []
    for index, part in enumerate(content):
        here = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part, dict) and isinstance(part.get("text"), str):
            _refuse_placeholder(part["text"], f"{here}.text")
            pieces.append(part["text"])
        elif kind == "image_url" and isinstance(part, dict):
            if not allow_images:
                raise RequestError("images are accepted in user messages only", param=here)
            urls.append(_image_url(part.get("image_url"), f"{here}.image_url"))
            pieces.append(DEFAULT_IMAGE_TOKEN)
        else:
            raise RequestError(
                f"{here} must be a text part {{'type': 'text', 'text': ...}} "
                "or an image part {'type': 'image_url', 'image_url': {'url': ...}}",
                param=here,
            )
    return "\n".join(pieces), urls


def _image_url(value: object, where: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("url"), str) or not value["url"]:
        raise RequestError(f"{where} must be an object with a non-empty 'url' string", param=where)
    return value["url"]


def _refuse_placeholder(text: str, where: str) -> None:
    if DEFAULT_IMAGE_TOKEN in text:
        raise RequestError(f"{where} contains {DEFAULT_IMAGE_TOKEN}; send images as image_url parts", param=where)


def parse_sampling(body: dict) -> SamplingSettings:
    """The sampling fields; ``max_completion_tokens`` wins over the older ``max_tokens``."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"'{key}' must be a positive integer, got {max_tokens!r}", param=key)
    temperature = _number(body, "temperature", default=0.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", default=None, low=0.0, high=1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be above 0", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", param="seed")
    return SamplingSettings(
        max_tokens=max_tokens,
        temperature=temperature or 0.0,
        top_p=top_p,
        seed=seed,
        stop=_stop(body.get("stop")),
        ignore_eos=_boolean(body, "ignore_eos"),
    )


def _number(body: dict, key: str, *, default: float | None, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{key}' must be a number", param=key)
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be between {low:g} and {high:g}, got {value:g}", param=key)
    return float(value)


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return tuple(stops)


def _boolean(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false", param=key)
    return value


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # visual tokens included
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose image features came from the cache

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_response(
    *, completion_id: str, model: str, text: str, finish_reason: str, usage: Usage, created: int | None = None
) -> dict:
    """A non-streamed ``chat.completion``."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage.as_dict(),
    }


def completion_chunk(
    *,
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, str],
    finish_reason: str | None = None,
    include_usage: bool = False,
) -> dict:
    """One ``chat.completion.chunk`` of a stream (``usage: null`` on each when usage is asked for)."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(*, completion_id: str, model: str, created: int, usage: Usage) -> dict:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the whole usage."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.as_dict(),
    }
