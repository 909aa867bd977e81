"""The serving engine: one model, one thread, continuous batching.

Requests wait in a bounded queue. Between decode steps the engine thread admits as many
as the batch has room for, encodes their images together (unless their features came
from the cache), prefills their prompts and merges them into the running
:class:`~fastvlm.serve.batch.DecodeBatch`; then every active sequence advances by one
token. A sequence leaves the batch as soon as it stops, reaches its token limit or is
cancelled (a client that disconnects), so its slot is free for the next step.

Tokens reach the caller through a :class:`RequestHandle`, a thread-safe queue of events,
so the HTTP layer can stream them without sharing any state with the engine thread.
Greedy rows give the tokens :func:`fastvlm.generation.generate` gives for the same
request alone, whatever else is in the batch (fp32; tested).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fastvlm.errors import ConfigError, FastVLMError, PromptError
from fastvlm.generation import Sampler, stop_token_ids
from fastvlm.processing import extra_visual_tokens, pad_sequences
from fastvlm.serve.batch import DecodeBatch

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastvlm.model import FastVLM

IDLE_WAIT_S = 0.05  # how long the idle engine thread sleeps on the queue before checking for shutdown


class QueueFullError(FastVLMError):
    """The engine's waiting queue is full: the server answers 429 with Retry-After."""


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


@dataclass
class RequestHandle:
    """The caller's side of a request: iterate for token ids; ``finish_reason`` once done."""

    request: GenerationRequest
    prompt_tokens: int
    events: queue.Queue = field(default_factory=queue.Queue)
    finish_reason: str | None = None
    image_features: torch.Tensor | None = None  # what the encoder produced, for the feature cache
    submitted_at: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (the row leaves the batch at the next step)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[int]:
        while True:
            kind, value = self.events.get()
            if kind == "token":
                yield value
            elif kind == "done":
                self.finish_reason = value
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

    def __init__(self, model: FastVLM, *, max_batch_size: int = 8, max_queue: int = 64) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ConfigError("max_batch_size and max_queue must be at least 1")
        self.model, self.max_batch_size = model, max_batch_size
        self.stop_ids = stop_token_ids(model)
        self.tokens_per_image = model.config.num_image_tokens()
        self._waiting: queue.Queue[RequestHandle] = queue.Queue(maxsize=max_queue)
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
        self._shutdown.set()
        self._thread.join()

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; a PromptError if it cannot fit the context, QueueFullError when full."""
        prompt_tokens = len(request.input_ids) + extra_visual_tokens(request.input_ids, self.tokens_per_image)
        context = self.model.config.context_length
        if prompt_tokens + request.max_new_tokens > context:
            raise PromptError(
                f"the prompt ({prompt_tokens} tokens with the image) plus max_tokens ({request.max_new_tokens}) "
                f"exceeds the model's context of {context} tokens"
            )
        handle = RequestHandle(request=request, prompt_tokens=prompt_tokens)
        try:
            self._waiting.put_nowait(handle)
        except queue.Full:
            raise QueueFullError("the server is at capacity; retry shortly") from None
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
            row.handle.events.put(("error", err))
        self._rows, self._batch = [], None

    def _take_waiting(self, *, block: bool) -> list[RequestHandle]:
        room = self.max_batch_size - len(self._rows)
        taken: list[RequestHandle] = []
        while len(taken) < room:
            try:
                wait = block and not taken
                handle = self._waiting.get(timeout=IDLE_WAIT_S) if wait else self._waiting.get_nowait()
            except queue.Empty:
                break
            if not handle.cancelled:
                taken.append(handle)
            else:
                handle.events.put(("done", "cancelled"))
        return taken

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Encode the new requests' images, prefill their prompts and merge them into the batch."""
        try:
            features = self._image_features(handles)
            ids, mask = pad_sequences([h.request.input_ids for h in handles], 0, "left")
            joined, logits = DecodeBatch.prefill(self.model, ids, mask, image_features=features)
        except Exception as err:  # report to each caller; the engine keeps serving the others
            for handle in handles:
                handle.events.put(("error", err))
            return
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
        parts: list[torch.Tensor] = []
        for handle in handles:
            request = handle.request
            if request.image_features is not None:
                parts.append(request.image_features.to(self.model.device))
            elif request.pixel_values is not None:
                handle.image_features = self.model.encode_images(request.pixel_values)
                parts.append(handle.image_features)
        return torch.cat(parts) if parts else None

    def _advance(self) -> None:
        assert self._batch is not None
        logits = self._batch.step(self.model)
        tokens = torch.stack([row.sample(logits[i : i + 1])[0] for i, row in enumerate(self._rows)])
        self._batch.last_tokens = tokens
        self._emit(tokens.tolist(), first_new_row=0)

    def _emit(self, tokens: list[int], *, first_new_row: int) -> None:
        """Hand each row its token (rows from ``first_new_row`` on); drop the rows that finished."""
        keep: list[int] = []
        for index, row in enumerate(self._rows):
            if index < first_new_row:
                keep.append(index)
                continue
            reason = self._finish_reason(row, tokens[index - first_new_row])
            if reason is None:
                keep.append(index)
            else:
                row.handle.events.put(("done", reason))
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._batch = self._batch.select(keep) if keep and self._batch is not None else None

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        if row.handle.cancelled:
            return "cancelled"
        if token in self.stop_ids:
            return "stop"
        row.handle.events.put(("token", token))
        row.generated += 1
        return "length" if row.generated >= row.handle.request.max_new_tokens else None
