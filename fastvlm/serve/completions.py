"""One chat completion as the HTTP layer follows it: engine events in, text pieces and figures out.

The engine runs in its own thread; a :class:`LoopSink` hands its events to the asyncio
loop that serves the request, so waiting for a token never holds a worker thread (64
streaming clients are 64 cheap coroutines, not 64 blocked threads). :class:`Completion`
turns the events into text pieces (:class:`~fastvlm.serve.text.TextAssembler`: whole
UTF-8 characters, ``stop`` sequences), counts usage, times the request, and records its
metrics once. A client that goes away cancels the request, so its batch slot is free at
the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastvlm.errors import FastVLMError
from fastvlm.serve.protocol import Usage
from fastvlm.serve.text import TextAssembler

if TYPE_CHECKING:
    from fastvlm.serve.engine import RequestHandle
    from fastvlm.serve.metrics import ServeMetrics
    from fastvlm.serve.service import ChatService, PreparedChat

DISCONNECT_POLL_S = 0.25  # while no token arrives, how often to check whether the client is still there
Disconnected = Callable[[], Awaitable[bool]]


class ClientGone(Exception):
    """The client closed the connection; its request was cancelled."""


class GenerationTimeout(FastVLMError):
    """The request ran past the server's request timeout (HTTP 504)."""


class GenerationFailed(Exception):
    """The engine failed while running this request (HTTP 500; the cause is logged, not shown)."""


class LoopSink:
    """An engine event sink that wakes an asyncio loop (thread-safe ``put``, awaitable ``get``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, event: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop (server shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self) -> tuple[str, Any]:
        return await self.queue.get()


async def _never_disconnected() -> bool:
    return False


@dataclass
class Completion:
    """A submitted request: iterate :meth:`pieces` for its text, then read usage and timings."""

    handle: RequestHandle
    sink: LoopSink
    prepared: PreparedChat
    service: ChatService
    metrics: ServeMetrics
    assembler: TextAssembler
    finish_reason: str | None = None
    completion_tokens: int = 0
    _pending: list[tuple[str, Any]] = field(default_factory=list)
    _last_token_at: float | None = None
    _recorded: bool = False

    async def next_event(self, disconnected: Disconnected = _never_disconnected) -> tuple[str, Any]:
        """The next engine event; ClientGone (and the request cancelled) if the client left meanwhile."""
        if self._pending:
            return self._pending.pop()
        while True:
            try:
                return await asyncio.wait_for(self.sink.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await disconnected():
                    self.handle.cancel()
                    raise ClientGone from None

    async def wait_started(self, disconnected: Disconnected) -> None:
        """Wait for the first event, raising what it reports, so a stream can still answer 504 or 500."""
        event = await self.next_event(disconnected)
        self._raise_failure(event)
        self._pending.append(event)
        # The images were encoded before the first token: keep their features now, so that
        # requests arriving while this one still decodes find them too.
        self.service.remember(self.prepared, self.handle)

    async def pieces(self, disconnected: Disconnected = _never_disconnected) -> AsyncIterator[str]:
        """The answer's text pieces; sets ``finish_reason`` ("stop" or "length") at the end."""
        while self.finish_reason is None:
            event = await self.next_event(disconnected)
            self._raise_failure(event)
            kind, value = event
            if kind == "token":
                piece = self._on_token(value)
                if self.assembler.stopped:
                    self.handle.cancel()  # a stop sequence ended the answer; free the slot now
                    self.finish_reason = "stop"
                if piece:
                    yield piece
            elif value == "cancelled":
                raise ClientGone
            else:
                self.finish_reason = value
                rest = self.assembler.finish()
                if rest:
                    yield rest

    def _on_token(self, token: int) -> str:
        now = time.perf_counter()
        if self._last_token_at is not None:
            self.metrics.inter_token_latency.observe(now - self._last_token_at)
        self._last_token_at = now
        self.completion_tokens += 1
        return self.assembler.add(token)

    def _raise_failure(self, event: tuple[str, Any]) -> None:
        kind, value = event
        if kind == "error":
            raise GenerationFailed("the engine failed while generating this answer") from value
        if kind == "done" and value == "timeout":
            raise GenerationTimeout("the request took longer than the server's request timeout")

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.handle.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.prepared.cached_tokens,
        )

    def timings(self) -> dict[str, float]:
        """Per-request figures (milliseconds), as llama.cpp's server reports them beside the usage."""
        times = self.handle.times
        end = times.finished or time.perf_counter()
        admitted = times.admitted or end
        first = times.first_token or end
        decode_s = end - first
        steps = max(self.completion_tokens - 1, 0)
        return {
            "queue_ms": round((admitted - times.submitted) * 1e3, 3),
            "vision_ms": 0.0 if self.prepared.cached_tokens else round(times.vision_s * 1e3, 3),
            "prefill_ms": round(times.prefill_s * 1e3, 3),
            "ttft_ms": round((first - times.submitted) * 1e3, 3),
            "decode_ms": round(decode_s * 1e3, 3),
            "decode_tokens_per_s": round(steps / decode_s, 3) if decode_s > 0 and steps else 0.0,
            "total_ms": round((end - times.submitted) * 1e3, 3),
        }

    def record(self, status: int | str) -> None:
        """Record this request's outcome and figures in the metrics (once)."""
        if self._recorded:
            return
        self._recorded = True
        self.metrics.outcome(status)
        times, m = self.handle.times, self.metrics
        m.prompt_tokens.inc(self.handle.prompt_tokens)
        m.cached_prompt_tokens.inc(self.prepared.cached_tokens)
        m.generation_tokens.inc(self.completion_tokens)
        if times.admitted is not None:
            m.queue_time.observe(times.admitted - times.submitted)
            m.prefill.observe(times.prefill_s)
            if not self.prepared.cached_tokens and self.prepared.request.pixel_values is not None:
                m.vision_encoder.observe(times.vision_s)
        if times.first_token is not None:
            m.time_to_first_token.observe(times.first_token - times.submitted)
        m.e2e_latency.observe((times.finished or time.perf_counter()) - times.submitted)
