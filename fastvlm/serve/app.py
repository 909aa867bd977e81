"""The HTTP server: OpenAI's chat-completions API, health, models, metrics and the page.

:func:`create_app` builds a FastAPI application around one model. The model loads in a
background thread after the server starts listening, so ``/health`` can answer 503
while it loads and 200 once requests are served. A chat request goes down one way:
body (size-capped) -> :func:`~fastvlm.serve.protocol.parse_chat_request` -> media and
tokens (:class:`~fastvlm.serve.service.ChatService`, in a worker thread) -> the engine
-> :class:`~fastvlm.serve.completions.Completion` -> JSON or server-sent events.

Errors are OpenAI's ``{"error": {message, type, param, code}}`` with the status that
fits. Every response carries an ``x-request-id`` header and every error message ends
with that id; what went wrong inside is logged with the id, never sent (a library's
exception text can leak memory addresses or paths).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastvlm.dtypes import load_dtype_from_name
from fastvlm.errors import FastVLMError, ImageError, PromptError
from fastvlm.serve.completions import ClientGone, Completion, GenerationTimeout, LoopSink
from fastvlm.serve.engine import Engine, QueueFullError
from fastvlm.serve.feature_cache import FeatureCache
from fastvlm.serve.media import MediaError, Resolver
from fastvlm.serve.metrics import CONTENT_TYPE, ServeMetrics
from fastvlm.serve.options import ServeOptions
from fastvlm.serve.protocol import (
    INVALID_REQUEST,
    RequestError,
    completion_chunk,
    completion_response,
    error_body,
    new_completion_id,
    parse_chat_request,
    usage_chunk,
)
from fastvlm.serve.service import ChatService
from fastvlm.serve.text import TextAssembler

if TYPE_CHECKING:
    from fastvlm.model import FastVLM

log = logging.getLogger("fastvlm.serve")

STATIC = Path(__file__).with_name("static")
RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait


# ------------------------------------------------------------------------------------- state


class ServerState:
    """The model, engine and service once loaded; what went wrong if loading failed."""

    def __init__(self, options: ServeOptions, metrics: ServeMetrics, resolve: Resolver | None) -> None:
        self.options, self.metrics, self.resolve = options, metrics, resolve
        self.service: ChatService | None = None
        self.load_failed = False
        self.created = int(time.time())

    def load(self, model: FastVLM | None = None) -> None:
        """Load the checkpoint (unless given) and start the engine; failures are logged and shown by /health."""
        try:
            if model is None:
                from fastvlm.model import FastVLM  # heavy: only in the loading thread

                options = self.options
                log.info("loading %s on %s (%s)", options.model, options.device, options.dtype)
                model = FastVLM.from_pretrained(
                    options.model,
                    device=options.device,
                    dtype=load_dtype_from_name(options.dtype),
                    image_mode=options.image_mode,
                )
            service = self._start(model)
            try:
                service.warm_up()
            except Exception:
                service.engine.stop()  # no engine thread outlives a failed start
                raise
            self.service = service
            log.info("model loaded; serving %s", self.options.model_name)
        except Exception:
            self.load_failed = True
            log.exception("the model could not be loaded; /health answers 503")

    def _start(self, model: FastVLM) -> ChatService:
        options = self.options
        engine = Engine(
            model,
            max_batch_size=options.max_batch_size,
            max_queue=options.max_queue,
            max_active_tokens=options.max_active_tokens,
            max_prefill_tokens=options.max_prefill_tokens,
        )
        self.metrics.watch_engine(lambda: engine.running, lambda: engine.waiting)
        cache = FeatureCache(max_entries=options.feature_cache_entries, max_bytes=options.feature_cache_bytes)
        service = ChatService(
            model,
            engine.start(),
            media=options.media,
            feature_cache=cache,
            request_timeout_s=options.request_timeout_s,
            resolve=self.resolve,
        )
        return service

    def ready(self) -> ChatService:
        if self.service is None:
            state = "failed to load (see the server log)" if self.load_failed else "is still loading; retry shortly"
            raise RequestError(
                f"the model {state}",
                status=503,
                error_type="service_unavailable",
                code="model_loading" if not self.load_failed else "model_unavailable",
            )
        return self.service

    def stop(self) -> None:
        if self.service is not None:
            self.service.engine.stop()


# ------------------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    error_type: str
    message: str
    param: str | None = None
    code: str | None = None
    retry: bool = False


def classify(exc: BaseException) -> ErrorAnswer:
    """What to answer for an exception; messages are ours, never the exception's cause."""
    if isinstance(exc, RequestError):
        retry = exc.status in (429, 503)
        return ErrorAnswer(exc.status, exc.error_type, exc.message, exc.param, exc.code, retry)
    if isinstance(exc, MediaError):
        return ErrorAnswer(exc.status, INVALID_REQUEST, str(exc), "messages", exc.code)
    if isinstance(exc, QueueFullError):
        return ErrorAnswer(429, "rate_limit_error", str(exc), None, "queue_full", retry=True)
    if isinstance(exc, PromptError):
        return ErrorAnswer(400, INVALID_REQUEST, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, GenerationTimeout):
        return ErrorAnswer(504, "timeout_error", str(exc), None, "request_timeout")
    if isinstance(exc, ImageError):
        return ErrorAnswer(422, INVALID_REQUEST, "the image could not be used", "messages", "invalid_image")
    if isinstance(exc, FastVLMError):
        return ErrorAnswer(400, INVALID_REQUEST, str(exc), None, None)
    return ErrorAnswer(500, "internal_error", "the server failed while answering this request", None, "internal_error")


def logged_error(exc: BaseException, request_id: str) -> tuple[ErrorAnswer, dict]:
    """Classify ``exc``, log its detail under ``request_id``, and build the error body the client gets."""
    answer = classify(exc)
    if answer.status >= 500:
        log.error("request %s failed (%d)", request_id, answer.status, exc_info=exc)
    else:
        log.info("request %s refused (%d): %r", request_id, answer.status, exc)
    body = error_body(
        f"{answer.message} (request id {request_id})",
        error_type=answer.error_type,
        param=answer.param,
        code=answer.code,
    )
    return answer, body


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    answer, body = logged_error(exc, request_id)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if answer.retry else None
    return JSONResponse(body, status_code=answer.status, headers=headers)


class RequestIdMiddleware:
    """Give every HTTP request an id (``request.state.request_id``) and return it as ``x-request-id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose generator is always closed, so its ``finally`` frees the batch slot."""

    body_iterator: AsyncIterator[str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------- the app


def create_app(options: ServeOptions, model: FastVLM | None = None, *, resolve: Resolver | None = None) -> FastAPI:
    """The server for ``options``; pass a loaded ``model`` to skip loading (tests, embedding).

    ``resolve`` maps a host name to its addresses for remote media (default: the system's
    resolver); tests use it to point an allowed domain at a loopback address.
    """
    metrics = ServeMetrics()
    state = ServerState(options, metrics, resolve)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if model is not None:
            state.load(model)
        else:
            threading.Thread(target=state.load, name="fastvlm-load", daemon=True).start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="fastvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = RequestError(
            str(exc.detail), status=exc.status_code, code="not_found" if exc.status_code == 404 else None
        )
        return error_response(error, request.state.request_id)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.service is not None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error" if state.load_failed else "loading"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        try:
            check_api_key(request, options.api_key)
            service = state.ready()
        except RequestError as err:
            return error_response(err, request.state.request_id)
        card = {
            "id": options.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "fastvlm",
            "max_model_len": service.model.config.context_length,
            "precision": service.model.stage_precision(),
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request_id = request.state.request_id
        try:
            return await answer_chat(request, state)
        except Exception as exc:
            if not isinstance(exc, ClientGone):
                metrics.outcome(classify(exc).status)
            return error_response(exc, request_id)

    mount_page(app)
    return app


def mount_page(app: FastAPI) -> None:
    """``GET /``: the page (package files only, no CDN), and its assets under ``/static``."""

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return PlainTextResponse("fastvlm server: the page is not installed; use the API under /v1", 404)
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")


def check_api_key(request: Request, api_key: str | None) -> None:
    """Bearer-token check for /v1/* (constant-time compare); no key configured: open."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(
            "missing or wrong API key; send 'Authorization: Bearer <key>'",
            status=401,
            error_type="authentication_error",
            code="invalid_api_key",
        )


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing more than ``limit`` bytes before reading them all (413)."""
    too_large = RequestError(
        f"the request body is larger than the server's limit of {limit} bytes", status=413, code="body_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError("the request body is not valid UTF-8 JSON", code="invalid_json") from None


async def answer_chat(request: Request, state: ServerState) -> Response:
    options = state.options
    check_api_key(request, options.api_key)
    service = state.ready()
    chat = parse_chat_request(await read_json(request, options.max_body_bytes))
    if chat.model is not None and chat.model != options.model_name:
        raise RequestError(
            f"the model {chat.model[:100]!r} does not exist; this server serves {options.model_name!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    prepared = await asyncio.to_thread(service.prepare, chat)
    sink = LoopSink(asyncio.get_running_loop())
    handle = service.submit(prepared, sink)
    completion = Completion(
        handle=handle,
        sink=sink,
        prepared=prepared,
        service=service,
        metrics=state.metrics,
        assembler=TextAssembler(service.model.tokenizer, chat.sampling.stop),  # type: ignore[arg-type]
    )
    try:
        await completion.wait_started(request.is_disconnected)
        if chat.stream:
            return EventStreamResponse(
                stream_chat(
                    completion,
                    model=options.model_name,
                    include_usage=chat.include_usage,
                    request_id=request.state.request_id,
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        pieces = [piece async for piece in completion.pieces(request.is_disconnected)]
    except BaseException:
        handle.cancel()
        raise
    completion.record(200)
    body = completion_response(
        completion_id=new_completion_id(),
        model=options.model_name,
        text="".join(pieces),
        finish_reason=completion.finish_reason or "length",
        usage=completion.usage(),
    )
    body["timings"] = completion.timings()
    return JSONResponse(body)


async def stream_chat(
    completion: Completion, *, model: str, include_usage: bool, request_id: str
) -> AsyncIterator[str]:
    """The SSE body: a role chunk, content chunks, the finish chunk (with timings), usage, ``[DONE]``."""
    completion_id, created = new_completion_id(), int(time.time())

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict:
        return completion_chunk(
            completion_id=completion_id,
            model=model,
            created=created,
            delta=delta,
            finish_reason=finish_reason,
            include_usage=include_usage,
        )

    try:
        yield sse(chunk({"role": "assistant", "content": ""}))
        async for piece in completion.pieces():
            yield sse(chunk({"content": piece}))
        final = chunk({}, finish_reason=completion.finish_reason or "length")
        final["timings"] = completion.timings()
        yield sse(final)
        if include_usage:
            yield sse(usage_chunk(completion_id=completion_id, model=model, created=created, usage=completion.usage()))
        completion.record(200)
    except ClientGone:
        completion.record("cancelled")
        return
    except Exception as exc:  # after the 200 header: the error goes into the stream, as OpenAI does
        answer, body = logged_error(exc, request_id)
        completion.record(answer.status)
        yield sse(body)
    finally:
        completion.handle.cancel()  # no-op once finished; frees the slot if the client went away
        completion.record("cancelled")  # no-op when an outcome was recorded above
    yield sse("[DONE]")
