"""The serving soak: many requests, a fifth of them invalid, none valid lost, memory flat.

``total`` requests go out from a few concurrent clients, in a fixed shuffled order; an
evenly spread fraction is invalid, cycling through the kinds of
:data:`~fastvlm.bench.serve_requests.INVALID_KINDS`. Valid requests alternate between
streamed and not, and so do invalid ones (a streamed request must be refused with a JSON
error before any event is sent). The soak passes when

- every valid request got 200 and a complete answer (streamed: a finish reason, usage and
  ``[DONE]``; a ``length`` finish has exactly ``max_tokens`` tokens);
- every invalid request got a 4xx with an OpenAI error object;
- the server's resident memory, sampled as each request completes, grew by less than
  ``max_growth_pct`` from the mean over the first hundred completions to the mean over
  the last hundred (a leak grows with requests; a warm-up allocation does not).

The memory's course, the mean of each hundred completions, is reported too: a server's
first requests grow its heap (allocator arenas of its threads, first-use buffers) before
it levels off, and that ramp can weigh on the first hundred's mean. ``bench-serve
--soak-warmup N`` sends N uncounted requests first, for a soak of the warmed-up server.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from fastvlm.bench.serve_load import RequestResult, check_local_url, run_clients, send_request
from fastvlm.bench.serve_requests import INVALID_KINDS, PlannedRequest, Workload, is_shared

RSS_WINDOW = 100  # completions averaged at each end of the soak
MAX_GROWTH_PCT = 10.0
MAX_EXAMPLES = 10


def plan_soak(workload: Workload, total: int, *, invalid_fraction: float, seed: int = 0) -> list[PlannedRequest]:
    """``total`` requests in a seeded shuffled order; ``invalid_fraction`` of them invalid, kinds in turn."""
    invalid_slots = [i for i in range(total) if is_shared(i, invalid_fraction)]
    invalid_kind = {slot: INVALID_KINDS[n % len(INVALID_KINDS)] for n, slot in enumerate(invalid_slots)}
    order = list(range(total))
    random.Random(seed).shuffle(order)
    plans = []
    for position, index in enumerate(order):
        stream = position % 2 == 0
        kind = invalid_kind.get(index)
        plans.append(workload.invalid(index, kind, stream=stream) if kind else workload.valid(index, stream=stream))
    return plans


def judge(planned: PlannedRequest, result: RequestResult) -> str | None:
    """Why ``result`` is wrong for ``planned`` (None when it is right)."""
    if planned.valid:
        return None if result.ok else f"{result.status}: {result.error}"
    if not 400 <= result.status < 500:
        return f"{planned.kind} answered {result.status}, expected a 4xx"
    if result.error is None or result.error.startswith("not an OpenAI error object"):
        return f"{planned.kind} answered {result.status} without an OpenAI error object: {result.error}"
    return None


@dataclass
class SoakResult:
    requests: int
    valid: int
    invalid: int
    valid_ok: int
    invalid_refused: int  # invalid requests that got a 4xx JSON error
    statuses: dict[str, dict[str, int]]  # kind -> status -> count
    wall_s: float
    rss_first_mib: float | None  # mean over the first RSS_WINDOW completions
    rss_last_mib: float | None
    rss_growth_pct: float | None
    rss_max_mib: float | None
    rss_window: int = RSS_WINDOW  # completions averaged at each end (fewer when the soak is short)
    rss_by_window_mib: list[float] = field(default_factory=list)  # mean of each run of rss_window completions
    max_growth_pct: float = MAX_GROWTH_PCT
    failures: list[str] = field(default_factory=list)  # the first few, with the request index
    rss_samples_mib: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        memory_ok = self.rss_growth_pct is None or self.rss_growth_pct < self.max_growth_pct
        return self.valid_ok == self.valid and self.invalid_refused == self.invalid and memory_ok

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def rss_window(samples: int, window: int = RSS_WINDOW) -> int:
    """How many samples each end's mean covers: ``window``, or half of them when there are fewer."""
    return min(window, samples // 2)


def rss_by_window(samples: list[float], window: int = RSS_WINDOW) -> list[float]:
    """Means of consecutive runs of ``window`` samples: the memory's course (a leak climbs, a warm-up levels off)."""
    window = rss_window(len(samples), window)
    if window < 1:
        return []
    return [statistics.fmean(samples[i : i + window]) for i in range(0, len(samples) - window + 1, window)]


def rss_growth(samples: list[float], window: int = RSS_WINDOW) -> tuple[float | None, float | None, float | None]:
    """Mean of the first and last ``window`` samples (at most half of them each) and the growth in %."""
    window = rss_window(len(samples), window)
    if window < 1:
        return None, None, None
    first, last = statistics.fmean(samples[:window]), statistics.fmean(samples[-window:])
    return first, last, (last - first) / first * 100


async def run_soak(
    base_url: str,
    plans: list[PlannedRequest],
    *,
    clients: int = 8,
    request_timeout_s: float = 600.0,
    api_key: str | None = None,
    rss_mib: Callable[[], float | None] | None = None,
    max_growth_pct: float = MAX_GROWTH_PCT,
    progress: bool = True,
) -> SoakResult:
    """Send ``plans`` from ``clients`` closed-loop clients and judge every answer."""
    base_url = check_local_url(base_url)
    pending = list(reversed(plans))
    done: list[tuple[PlannedRequest, RequestResult]] = []
    samples: list[float] = []
    bar = tqdm(total=len(plans), desc="soak", unit="req", disable=not progress)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while pending:
            planned = pending.pop()
            done.append((planned, await send_request(client, base_url, planned)))
            rss = rss_mib() if rss_mib else None
            if rss is not None:
                samples.append(rss)
            bar.update()

    wall = await run_clients(client_loop, clients, timeout_s=request_timeout_s, api_key=api_key)
    bar.close()
    return summarize_soak(done, samples, wall, max_growth_pct=max_growth_pct)


def summarize_soak(
    done: list[tuple[PlannedRequest, RequestResult]], samples: list[float], wall_s: float, *, max_growth_pct: float
) -> SoakResult:
    statuses: dict[str, Counter[str]] = {}
    failures = []
    for planned, result in done:
        statuses.setdefault(planned.kind, Counter())[str(result.status)] += 1
        reason = judge(planned, result)
        if reason:
            failures.append(f"request {planned.index} ({planned.kind}, stream={planned.stream}): {reason}")
    valid = [(p, r) for p, r in done if p.valid]
    invalid = [(p, r) for p, r in done if not p.valid]
    first, last, growth = rss_growth(samples)
    return SoakResult(
        requests=len(done),
        valid=len(valid),
        invalid=len(invalid),
        valid_ok=sum(judge(p, r) is None for p, r in valid),
        invalid_refused=sum(judge(p, r) is None for p, r in invalid),
        statuses={kind: dict(sorted(counts.items())) for kind, counts in sorted(statuses.items())},
        wall_s=wall_s,
        rss_first_mib=first,
        rss_last_mib=last,
        rss_growth_pct=growth,
        rss_max_mib=max(samples) if samples else None,
        rss_window=rss_window(len(samples)),
        rss_by_window_mib=rss_by_window(samples),
        max_growth_pct=max_growth_pct,
        failures=failures[:MAX_EXAMPLES],
        rss_samples_mib=samples,
    )


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def soak_markdown(result: SoakResult, meta: dict[str, Any]) -> str:
    """The soak's report: verdict, counts, memory, answers by kind and the first failures."""
    lines = [
        "# Serving soak",
        "",
        f"Model {meta.get('model', '?')}, {meta.get('image_size')} px images, max_tokens {meta.get('max_tokens')}, "
        f"{meta.get('soak_clients')} concurrent clients, {result.wall_s:,.0f} s; "
        f"{meta.get('soak_warmup') or 'no'} uncounted warm-up requests before"
        + (f" ({meta['soak_warmup_failed']} of them failed)" if meta.get("soak_warmup_failed") else "")
        + ".",
        "",
        f"**{'PASSED' if result.passed else 'FAILED'}**: {result.valid_ok} of {result.valid} valid requests answered "
        f"completely; {result.invalid_refused} of {result.invalid} invalid ones refused with a 4xx JSON error; "
        f"server RSS {_fmt(result.rss_first_mib)} MiB (mean of the first {result.rss_window} completions) -> "
        f"{_fmt(result.rss_last_mib)} MiB (last {result.rss_window}), growth {_fmt(result.rss_growth_pct, 2)} % "
        f"(limit {result.max_growth_pct:g} %), peak {_fmt(result.rss_max_mib)} MiB.",
        "",
        f"Server RSS by {result.rss_window} completions (MiB): "
        + (", ".join(f"{m:,.0f}" for m in result.rss_by_window_mib) or "not measured"),
        "",
        "| kind | answers by status |",
        "|---|---|",
    ]
    for kind, counts in result.statuses.items():
        lines.append(f"| {kind} | " + ", ".join(f"{n}x {status}" for status, n in counts.items()) + " |")
    if result.failures:
        lines += ["", "First failures:", *(f"- {f}" for f in result.failures)]
    return "\n".join(lines) + "\n"
