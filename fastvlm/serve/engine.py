"""The serving engine: one model, one thread, continuous batching.

Requests wait in a bounded queue. Between decode steps the engine thread admits as many
as the batch has room for, encodes their images together (unless their features came
from the cache), prefills their prompts and merges them into the running
:class:`~fastvlm.serve.batch.DecodeBatch`; then every active sequence advances by one
token. A sequence leaves the batch as soon as it stops, reaches its token limit, passes
its deadline or is cancelled (a client that disconnects), so its slot is free for the
next step.

Three bounds keep an overloaded server answering instead of growing: the waiting queue
(``max_queue``; a full queue refuses at once, the HTTP layer's 429), the batch size, and
``max_active_tokens``, the prompt plus token budget of everything admitted (what the KV
cache can grow to); a request waits until its budget fits. A request whose own budget
exceeds the cap, or the context, is refused when it is submitted. Admission between two
steps is also capped at ``max_prefill_tokens`` prompt tokens, so a burst of arrivals
stalls the running sequences in short slices rather than one long prefill.

Tokens reach the caller through an event sink (a thread-safe queue by default; the HTTP
layer passes one that wakes its event loop), so the engine shares no state with its
callers beyond the :class:`RequestHandle`. Greedy rows give the tokens
:func:`fastvlm.generation.generate` gives for the same request alone, whatever else is in
the batch (fp32; tested).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fastvlm.errors import ConfigError, FastVLMError, PromptError
from fastvlm.generation import Sampler, stop_token_ids
from fastvlm.processing import extra_visual_tokens, pad_sequences
from fastvlm.serve.batch import DecodeBatch
from fastvlm.serve.options import DEFAULT_MAX_PREFILL_TOKENS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastvlm.model import FastVLM

IDLE_WAIT_S = 0.05  # how long the idle engine thread sleeps on the queue before checking for shutdown


class QueueFullError(FastVLMError):
    """The engine's waiting queue is full: the server answers 429 with Retry-After."""


class EventSink(Protocol):
    """Where a request's events go: ``("token", id)``, ``("done", reason)`` or ``("error", exc)``."""

    def put(self, item: tuple[str, Any]) -> None: ...


@dataclass
class GenerationRequest:
    """One prompt to answer: token ids with one ``-200`` per image, and its images."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [N, 3, S, S], one per -200
    image_features: torch.Tensor | None = None  # [N, T, H]: given instead of pixels (cache hit)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-turn tokens (load tests: a fixed answer length)
    timeout_s: float | None = None  # from submission; the request then finishes with reason "timeout"


@dataclass
class RequestTimes:
    """When a request passed each point (``time.perf_counter`` seconds) and what its batch spent."""

    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    vision_s: float = 0.0  # encoding the images of the admission group this request joined with
    prefill_s: float = 0.0  # prefilling that group's prompts


@dataclass
class RequestHandle:
    """The caller's side of a request: iterate for token ids; ``finish_reason`` once done."""

    request: GenerationRequest
    prompt_tokens: int
    events: EventSink = field(default_factory=lambda: queue.Queue[tuple[str, Any]]())
    finish_reason: str | None = None
    image_features: torch.Tensor | None = None  # what the encoder produced, for the feature cache
    times: RequestTimes = field(default_factory=RequestTimes)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (the row leaves the batch at the next step)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def budget(self) -> int:
        """The most KV-cache positions this request can take: prompt plus answer."""
        return self.prompt_tokens + self.request.max_new_tokens

    def expired(self, now: float) -> bool:
        timeout = self.request.timeout_s
        return timeout is not None and now - self.times.submitted >= timeout

    def __iter__(self) -> Iterator[int]:
        """Token ids as they come (for the default queue sink)."""
        if not isinstance(self.events, queue.Queue):
            raise TypeError("only a handle with the default queue sink can be iterated")
        while True:
            kind, value = self.events.get()
            if kind == "token":
                yield value
            elif kind == "done":
                return
            else:
                raise value

    def tokens(self) -> list[int]:
        """Wait for the whole answer."""
        return list(self)


@dataclass
class _Row:
    handle: RequestHandle
    sample: Sampler
    generated: int = 0


class Engine:
    """Continuous batching over one :class:`~fastvlm.model.FastVLM` in a background thread."""

    def __init__(
        self,
        model: FastVLM,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_active_tokens: int | None = None,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_prefill_tokens < 1:
            raise ConfigError("max_batch_size, max_queue and max_prefill_tokens must be at least 1")
        self.max_prefill_tokens = max_prefill_tokens
        context = model.config.context_length
        self.max_active_tokens = max_active_tokens or max_batch_size * context
        if self.max_active_tokens < 1:
            raise ConfigError(f"max_active_tokens must be positive, got {max_active_tokens}")
        self.model, self.max_batch_size, self.max_queue = model, max_batch_size, max_queue
        self.stop_ids = stop_token_ids(model)
        self.tokens_per_image = model.config.num_image_tokens()
        self._waiting: deque[RequestHandle] = deque()
        self._wakeup = threading.Condition()
        self._rows: list[_Row] = []
        self._batch: DecodeBatch | None = None
        self.peak_running = 0  # the most sequences decoded together so far
        self._shutdown = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastvlm-engine", daemon=True)

    # ------------------------------------------------------------------ caller side
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; requests still running or waiting end with an error event."""
        self._shutdown.set()
        with self._wakeup:
            self._wakeup.notify_all()
        self._thread.join()
        stopped = FastVLMError("the server is shutting down")
        with self._wakeup:
            leftover = [row.handle for row in self._rows] + list(self._waiting)
            self._rows, self._batch = [], None
            self._waiting.clear()
        for handle in leftover:
            handle.events.put(("error", stopped))

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active_tokens(self) -> int:
        return sum(row.handle.budget for row in self._rows)

    def submit(self, request: GenerationRequest, events: EventSink | None = None) -> RequestHandle:
        """Queue ``request``; a PromptError if it can never fit, QueueFullError when the queue is full."""
        prompt_tokens = len(request.input_ids) + extra_visual_tokens(request.input_ids, self.tokens_per_image)
        handle = RequestHandle(request=request, prompt_tokens=prompt_tokens)
        if events is not None:
            handle.events = events
        context = self.model.config.context_length
        if handle.budget > context:
            raise PromptError(
                f"the prompt ({prompt_tokens} tokens with the image) plus max_tokens ({request.max_new_tokens}) "
                f"exceeds the model's context of {context} tokens"
            )
        if handle.budget > self.max_active_tokens:
            raise PromptError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({request.max_new_tokens}) exceeds the "
                f"server's cap of {self.max_active_tokens} active tokens"
            )
        with self._wakeup:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError("the server is at capacity; retry shortly")
            self._waiting.append(handle)
            self._wakeup.notify()
        return handle

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._shutdown.is_set():
                admitted = self._take_waiting(block=not self._rows)
                if admitted:
                    self._admit(admitted)
                if self._batch is not None:
                    try:
                        self._advance()
                    except Exception as err:  # a failed step ends the batch's requests, not the engine
                        self._fail_running(err)

    def _fail_running(self, err: Exception) -> None:
        for row in self._rows:
            self._finish(row.handle, ("error", err))
        self._rows, self._batch = [], None

    def _take_waiting(self, *, block: bool) -> list[RequestHandle]:
        """The waiting requests that fit, in arrival order; expired or cancelled ones end here."""
        taken: list[RequestHandle] = []
        budget = self.max_active_tokens - self.active_tokens
        prefill = 0
        with self._wakeup:
            if block and not self._waiting:
                self._wakeup.wait(timeout=IDLE_WAIT_S)
            now = time.perf_counter()
            while self._waiting and len(self._rows) + len(taken) < self.max_batch_size:
                handle = self._waiting[0]
                if handle.cancelled or handle.expired(now):
                    self._waiting.popleft()
                    self._finish(handle, ("done", "cancelled" if handle.cancelled else "timeout"))
                    continue
                if handle.budget > budget:
                    break  # first come, first served: later requests wait behind it
                if taken and prefill + handle.prompt_tokens > self.max_prefill_tokens:
                    break  # the rest joins after the next decode step
                self._waiting.popleft()
                budget -= handle.budget
                prefill += handle.prompt_tokens
                taken.append(handle)
        return taken

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Encode the new requests' images, prefill their prompts and merge them into the batch."""
        start = time.perf_counter()
        for handle in handles:
            handle.times.admitted = start
        try:
            features = self._image_features(handles)
            encoded = time.perf_counter()
            ids, mask = pad_sequences([h.request.input_ids for h in handles], 0, "left")
            joined, logits = DecodeBatch.prefill(self.model, ids, mask, image_features=features)
        except Exception as err:  # report to each caller; the engine keeps serving the others
            for handle in handles:
                self._finish(handle, ("error", err))
            return
        done = time.perf_counter()
        for handle in handles:
            handle.times.vision_s, handle.times.prefill_s = encoded - start, done - encoded
        device = self.model.device
        rows = [
            _Row(handle=h, sample=Sampler.seeded(h.request.temperature, h.request.top_p, h.request.seed, device))
            for h in handles
        ]
        joined.last_tokens = torch.stack([row.sample(logits[i : i + 1])[0] for i, row in enumerate(rows)])
        self._batch = joined if self._batch is None else self._batch.merge(joined)
        self._rows += rows
        self.peak_running = max(self.peak_running, len(self._rows))
        self._emit(joined.last_tokens.tolist(), first_new_row=len(self._rows) - len(rows))

    def _image_features(self, handles: list[RequestHandle]) -> torch.Tensor | None:
        """The admitted requests' image features in order: from the cache, or encoded in one batch."""
        to_encode = [h for h in handles if h.request.image_features is None and h.request.pixel_values is not None]
        if to_encode:
            pixels = [h.request.pixel_values for h in to_encode if h.request.pixel_values is not None]
            encoded = self.model.encode_images(torch.cat(pixels)).split([len(p) for p in pixels])
            for handle, features in zip(to_encode, encoded, strict=True):
                handle.image_features = features
        parts = [
            h.request.image_features.to(self.model.device) if h.request.image_features is not None else h.image_features
            for h in handles
        ]
        present = [p for p in parts if p is not None]
        return torch.cat(present) if present else None

    def _advance(self) -> None:
        assert self._batch is not None
        if all(row.sample.greedy for row in self._rows):  # no logits needed: the screened head may answer
            tokens = self._batch.greedy_step()
        else:
            logits = self._batch.step()
            tokens = torch.stack([row.sample(logits[i : i + 1])[0] for i, row in enumerate(self._rows)])
        self._batch.last_tokens = tokens
        self._emit(tokens.tolist(), first_new_row=0)

    def _emit(self, tokens: list[int], *, first_new_row: int) -> None:
        """Hand each row its token (rows from ``first_new_row`` on); drop the rows that finished."""
        keep: list[int] = []
        now = time.perf_counter()
        for index, row in enumerate(self._rows):
            if index < first_new_row:
                keep.append(index)
                continue
            reason = self._finish_reason(row, tokens[index - first_new_row], now)
            if reason is None:
                keep.append(index)
            else:
                self._finish(row.handle, ("done", reason))
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._batch = self._batch.select(keep) if keep and self._batch is not None else None

    def _finish_reason(self, row: _Row, token: int, now: float) -> str | None:
        handle = row.handle
        if handle.cancelled:
            return "cancelled"
        if handle.expired(now):
            return "timeout"
        if token in self.stop_ids and not handle.request.ignore_eos:
            return "stop"
        if handle.times.first_token is None:
            handle.times.first_token = now
        handle.events.put(("token", token))
        row.generated += 1
        return "length" if row.generated >= handle.request.max_new_tokens else None

    @staticmethod
    def _finish(handle: RequestHandle, event: tuple[str, Any]) -> None:
        handle.times.finished = time.perf_counter()
        if event[0] == "done":
            handle.finish_reason = event[1]
        handle.events.put(event)
