"""A bounded load test of a running FastVLM server (issue 12): levels of concurrent streaming clients.

Each level runs ``clients`` coroutines that send their share of requests one after the
other (a closed loop: a client waits for its answer before asking again), so the server
sees exactly ``clients`` requests at a time. A level ends when every client has sent its
requests, or once the level's time limit has passed and the requests then in flight
have finished. Every request streams (``stream: true`` with ``include_usage``), so:

- time to first token (TTFT) is measured by the client: from sending the request to the
  first chunk with answer text (or the finishing chunk of an empty answer);
- end-to-end latency runs to the ``[DONE]`` line;
- output tokens are the server's ``usage.completion_tokens``, not counted from chunks.

Per level: requests/s and output tokens/s over the level's wall time, p50/p99 TTFT and
latency, errors by status, and the ratio of tokens/s to the 1-client level, the figure
continuous batching is judged by (decode is memory-bound, so a batch of 16 should cost
little more per step than a batch of 1). Answers that stop before ``max_tokens`` are
counted, because early stops shorten the batch and so lower that ratio.

Only servers on this machine (127.0.0.1 or ::1) are accepted: a load test must never be
pointed at someone else's service by a typo.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from tqdm.auto import tqdm

from fastvlm.bench.serve_requests import CHAT_PATH, PlannedRequest, Workload
from fastvlm.errors import ConfigError, UsageError
from fastvlm.measure import machine_line, markdown_table

LOCAL_HOSTS = ("127.0.0.1", "::1")
CONNECT_TIMEOUT_S = 10.0
TRANSPORT_ERROR = 0  # the status recorded when no HTTP answer came (refused, reset, timed out)
WARMUP_INDEX = 1_000_000  # warm-up requests are numbered from here, so their images are like no measured one's


def check_local_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an http URL of 127.0.0.1 or [::1]; a UsageError if not."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise UsageError(f"the server URL must start with http:// (got {url!r}); the load test speaks plain HTTP")
    if parts.hostname not in LOCAL_HOSTS:
        raise UsageError(
            f"refusing to load-test {parts.hostname!r}: only servers on this machine, http://127.0.0.1:PORT or "
            "http://[::1]:PORT, are accepted"
        )
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise UsageError(f"give the server's base URL (http://127.0.0.1:PORT), not a path: {url!r}")
    return url.rstrip("/")


def local_client(clients: int, *, timeout_s: float, api_key: str | None = None) -> httpx.AsyncClient:
    """An HTTP client with one connection per simulated client; proxy settings of the environment are ignored."""
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
        trust_env=False,
    )


async def run_clients(
    client_loop: Callable[[httpx.AsyncClient], Awaitable[None]],
    clients: int,
    *,
    timeout_s: float,
    api_key: str | None = None,
) -> float:
    """Run ``clients`` copies of ``client_loop`` over one shared connection pool; the wall time in seconds."""
    start = time.perf_counter()
    async with local_client(clients, timeout_s=timeout_s, api_key=api_key) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return time.perf_counter() - start


def served_model_id(base_url: str, *, api_key: str | None = None) -> str | None:
    """The first model id /v1/models lists (sent as each request's ``model``), or None if it lists none."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=CONNECT_TIMEOUT_S, trust_env=False, headers=headers) as client:
        response = client.get(check_local_url(base_url) + "/v1/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    return str(models[0]["id"]) if models else None


# ------------------------------------------------------------------------------ one request


@dataclass
class RequestResult:
    """What one request got back; ``ok`` means status 200 and a complete answer."""

    index: int
    kind: str
    status: int
    ok: bool = False
    ttft_s: float | None = None
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None  # why the request is not ok (the server's message, or what was missing)
    timings: dict[str, float] = field(default_factory=dict)  # the server's own "timings", when sent
    finished_at: float = 0.0  # perf_counter when the answer was complete


async def send_request(client: httpx.AsyncClient, base_url: str, planned: PlannedRequest) -> RequestResult:
    """POST ``planned`` and read its answer (streamed or not); never raises for what the server does."""
    result = RequestResult(index=planned.index, kind=planned.kind, status=TRANSPORT_ERROR)
    start = time.perf_counter()
    try:
        async with client.stream("POST", base_url + CHAT_PATH, content=planned.body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = _error_message(await response.aread())
            elif planned.stream:
                await _read_stream(response, result, start)
            else:
                _read_completion(json.loads(await response.aread()), result)
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
    result.finished_at = time.perf_counter()
    result.e2e_s = result.finished_at - start
    if result.ok and result.finish_reason == "length" and result.completion_tokens != planned.max_tokens:
        result.ok = False
        result.error = f"finish_reason 'length' after {result.completion_tokens} of {planned.max_tokens} tokens"
    return result


def _error_message(raw: bytes) -> str:
    """The OpenAI error message of a refused request, or why the body is not one."""
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error object: {raw[:200]!r}"
    return str(message)


async def _read_stream(response: httpx.Response, result: RequestResult, start: float) -> None:
    """Read SSE chunks up to ``[DONE]``: TTFT at the first text (or the finish), usage from the usage chunk."""
    done = got_usage = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:  # an error after the stream began
            result.error = _error_message(data.encode())
            return
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            finish = choice.get("finish_reason")
            if result.ttft_s is None and (text or finish):
                result.ttft_s = time.perf_counter() - start
            if finish:
                result.finish_reason = finish
                result.timings = chunk.get("timings") or {}
        if chunk.get("usage"):
            got_usage = True
            _read_usage(chunk["usage"], result)
    checks = (("[DONE]", done), ("usage", got_usage), ("finish_reason", result.finish_reason is not None))
    missing = [what for what, seen in checks if not seen]
    result.ok = not missing
    if missing:
        result.error = "the stream ended without " + ", ".join(missing)


def _read_completion(body: dict, result: RequestResult) -> None:
    """A non-streamed answer is complete with a string message, a finish reason and usage."""
    try:
        choice = body["choices"][0]
        complete = isinstance(choice["message"]["content"], str) and bool(choice["finish_reason"])
        result.finish_reason = choice["finish_reason"]
        _read_usage(body["usage"], result)
    except (KeyError, IndexError, TypeError):
        complete = False
    result.timings = body.get("timings") or {}
    result.ok = complete
    if not complete:
        result.error = f"incomplete chat.completion: {json.dumps(body)[:200]}"


def _read_usage(usage: dict, result: RequestResult) -> None:
    result.prompt_tokens = int(usage.get("prompt_tokens", 0))
    result.completion_tokens = int(usage.get("completion_tokens", 0))
    result.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


@dataclass
class LevelResult:
    """One level's figures; latencies in ms, over the requests that succeeded."""

    clients: int
    requests: int  # sent
    ok: int
    errors: dict[str, int]  # status (0: no HTTP answer) -> count
    wall_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    mean_completion_tokens: float
    early_stops: int  # answers that ended before max_tokens (finish_reason "stop")
    cache_hits: int  # requests whose image features came from the server's cache
    server_queue_p50_ms: float | None  # from the server's timings: time before the engine took the request
    stopped_by_time_limit: bool = False
    tokens_per_s_vs_1_client: float | None = None
    server_rss_mib: float | None = None  # after the level, when the server's PID is known
    error_examples: list[str] = field(default_factory=list)


def summarize_level(clients: int, results: list[RequestResult], wall_s: float, *, stopped: bool) -> LevelResult:
    """The level's figures from its requests' results (rates over the level's wall time)."""
    good = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in good)
    errors = Counter(str(r.status) for r in results if not r.ok)
    queue = [r.timings["queue_ms"] for r in good if "queue_ms" in r.timings]
    return LevelResult(
        clients=clients,
        requests=len(results),
        ok=len(good),
        errors=dict(sorted(errors.items())),
        wall_s=wall_s,
        requests_per_s=len(good) / wall_s if wall_s > 0 else 0.0,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_ms=_ms(percentile([r.ttft_s for r in good if r.ttft_s is not None], 50)),
        ttft_p99_ms=_ms(percentile([r.ttft_s for r in good if r.ttft_s is not None], 99)),
        e2e_p50_ms=_ms(percentile([r.e2e_s for r in good], 50)),
        e2e_p99_ms=_ms(percentile([r.e2e_s for r in good], 99)),
        mean_completion_tokens=tokens / len(good) if good else 0.0,
        early_stops=sum(r.finish_reason == "stop" for r in good),
        cache_hits=sum(r.cached_tokens > 0 for r in good),
        server_queue_p50_ms=percentile(queue, 50),
        stopped_by_time_limit=stopped,
        error_examples=list(dict.fromkeys(f"{r.status}: {r.error}" for r in results if not r.ok))[:5],
    )


def add_ratios(levels: list[LevelResult]) -> None:
    """Set each level's output tokens/s relative to the 1-client level's (left None without one)."""
    base = next((lv.output_tokens_per_s for lv in levels if lv.clients == 1), None)
    for level in levels:
        level.tokens_per_s_vs_1_client = level.output_tokens_per_s / base if base else None


# ------------------------------------------------------------------------------ running levels


@dataclass(frozen=True)
class LoadSettings:
    """What the load test sends and how long it may take.

    ``requests_per_client`` holds one count for every level or one per level (fewer at 64
    clients keeps a slow server's run bounded). After ``time_limit_s`` a level starts no
    new request, but those in flight finish: a level can overrun by one request per client.
    """

    levels: tuple[int, ...] = (1, 4, 16, 64)
    requests_per_client: tuple[int, ...] = (4,)
    time_limit_s: float = 300.0
    request_timeout_s: float = 600.0
    warmup_requests: int = 1

    def __post_init__(self) -> None:
        if len(self.requests_per_client) not in (1, len(self.levels)):
            raise ConfigError(
                f"requests_per_client needs one count or one per level ({len(self.levels)}), "
                f"got {len(self.requests_per_client)}"
            )

    def requests_at(self, level: int) -> int:
        """How many requests each client sends at the ``level``-th level (from 0)."""
        counts = self.requests_per_client
        return counts[0] if len(counts) == 1 else counts[level]


async def run_level(
    base_url: str,
    requests: list[PlannedRequest],
    *,
    clients: int,
    time_limit_s: float,
    request_timeout_s: float,
    api_key: str | None = None,
    progress: bool = True,
) -> tuple[list[RequestResult], float, bool]:
    """Send ``requests`` from ``clients`` closed-loop clients: the results, the wall time, and whether time ran out."""
    pending = list(reversed(requests))  # clients pop from the end: requests go out in index order
    results: list[RequestResult] = []
    deadline = time.perf_counter() + time_limit_s
    stopped = False
    bar = tqdm(total=len(requests), desc=f"{clients} clients", unit="req", disable=not progress, leave=False)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal stopped
        while pending:
            if time.perf_counter() > deadline:
                stopped = True
                return
            results.append(await send_request(client, base_url, pending.pop()))
            bar.update()

    wall = await run_clients(client_loop, clients, timeout_s=request_timeout_s, api_key=api_key)
    bar.close()
    return sorted(results, key=lambda r: r.index), wall, stopped


async def run_load_test(
    base_url: str,
    workload: Workload,
    settings: LoadSettings,
    *,
    api_key: str | None = None,
    rss_mib: Callable[[], float | None] | None = None,
    progress: bool = True,
) -> list[LevelResult]:
    """Every level of ``settings`` in turn, after warm-up requests that are not counted."""
    base_url = check_local_url(base_url)
    timing = {"time_limit_s": settings.time_limit_s, "request_timeout_s": settings.request_timeout_s}
    if settings.warmup_requests:
        warmup = [workload.valid(WARMUP_INDEX + i, shared=False) for i in range(settings.warmup_requests)]
        await run_level(base_url, warmup, clients=1, api_key=api_key, progress=False, **timing)
    levels, next_index = [], 0
    for position, clients in enumerate(tqdm(settings.levels, desc="load levels", unit="level", disable=not progress)):
        count = clients * settings.requests_at(position)
        requests = [workload.valid(i) for i in range(next_index, next_index + count)]  # built before the clock
        next_index += count
        results, wall, stopped = await run_level(
            base_url, requests, clients=clients, api_key=api_key, progress=progress, **timing
        )
        level = summarize_level(clients, results, wall, stopped=stopped)
        level.server_rss_mib = rss_mib() if rss_mib else None
        levels.append(level)
    add_ratios(levels)
    return levels


# ------------------------------------------------------------------------------ reporting


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def format_level_table(levels: list[LevelResult]) -> str:
    """The levels as a markdown table, one line per number of clients."""
    columns = [">clients", ">requests", ">ok", "errors", ">req/s", ">out tok/s", ">x 1 client", ">TTFT p50 ms"]
    columns += [">TTFT p99 ms", ">e2e p50 ms", ">e2e p99 ms", ">tok/answer", ">early stops", ">cache hits"]
    rows = [
        [
            str(lv.clients),
            str(lv.requests) + (" (time limit)" if lv.stopped_by_time_limit else ""),
            str(lv.ok),
            ", ".join(f"{count}x {status or 'no answer'}" for status, count in lv.errors.items()) or "0",
            _fmt(lv.requests_per_s, 2),
            _fmt(lv.output_tokens_per_s, 1),
            _fmt(lv.tokens_per_s_vs_1_client, 2),
            _fmt(lv.ttft_p50_ms),
            _fmt(lv.ttft_p99_ms),
            _fmt(lv.e2e_p50_ms),
            _fmt(lv.e2e_p99_ms),
            _fmt(lv.mean_completion_tokens, 1),
            str(lv.early_stops),
            str(lv.cache_hits),
        ]
        for lv in levels
    ]
    return markdown_table(columns, rows)


def load_markdown(levels: list[LevelResult], meta: dict[str, Any]) -> str:
    """The load test's report: what ran where, the table, and the errors seen."""
    lines = [
        "# Serving load test",
        "",
        f"Model {meta.get('model', '?')}, {meta.get('image_size')} px images "
        f"({meta.get('shared_image_fraction', 0):.0%} shared), max_tokens {meta.get('max_tokens')}, greedy, "
        f"streamed. Client machine: {machine_line(meta)}.",
        "",
        format_level_table(levels),
    ]
    examples = [f"- {lv.clients} clients: {e}" for lv in levels for e in lv.error_examples]
    if examples:
        lines += ["", "Errors:", *examples]
    return "\n".join(lines) + "\n"


def write_report(name: str, out: Path, payload: dict[str, Any], markdown: str) -> list[Path]:
    """``out/name.json`` (``payload``) and ``out/name.md``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths[1].write_text(markdown)
    return paths


def levels_payload(levels: list[LevelResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "levels": [asdict(lv) for lv in levels]}
