"""The server's Prometheus metrics, in a registry of its own (no process-global state).

Names follow Prometheus conventions (``fastvlm_`` prefix, base units, ``_total`` for
counters) and mirror what vLLM exports, so existing dashboards need only a new prefix:

- histograms: time to first token, vision-encoder time, prefill time, inter-token latency,
  end-to-end latency and queue time, in seconds;
- counters: prompt tokens (visual tokens included), generated tokens, cached prompt tokens
  (visual tokens whose features came from the feature cache), requests by outcome
  (``status``: the HTTP status answered, or ``cancelled`` for a client that went away);
- gauges: requests running and waiting, read from the engine at scrape time.

Each server builds one :class:`ServeMetrics`; tests build as many as they like.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# From 1 ms (a GPU's decode step) to minutes (a long CPU answer under load).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """Every metric the server records, registered in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def histogram(name: str, what: str) -> Histogram:
            return Histogram(f"fastvlm_{name}_seconds", what, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.time_to_first_token = histogram("time_to_first_token", "Submission to first generated token.")
        self.vision_encoder = histogram("vision_encoder", "Image encoding of the admission batch a request joined.")
        self.prefill = histogram("prefill", "Prompt prefill of the admission batch a request joined.")
        self.inter_token_latency = histogram("inter_token_latency", "Time between consecutive generated tokens.")
        self.e2e_latency = histogram("e2e_request_latency", "Submission to the last token.")
        self.queue_time = histogram("request_queue_time", "Time a request waited before admission.")
        self.prompt_tokens = Counter(
            "fastvlm_prompt_tokens", "Prompt tokens processed, visual tokens included.", registry=self.registry
        )
        self.cached_prompt_tokens = Counter(
            "fastvlm_cached_prompt_tokens", "Visual tokens served from the image-feature cache.", registry=self.registry
        )
        self.generation_tokens = Counter("fastvlm_generation_tokens", "Tokens generated.", registry=self.registry)
        self.requests = Counter(
            "fastvlm_requests", "Chat requests by outcome.", labelnames=("status",), registry=self.registry
        )
        self.running = Gauge("fastvlm_num_requests_running", "Sequences in the decode batch.", registry=self.registry)
        self.waiting = Gauge("fastvlm_num_requests_waiting", "Requests in the waiting queue.", registry=self.registry)

    def watch_engine(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the gauges from the engine each time metrics are scraped."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def outcome(self, status: int | str) -> None:
        self.requests.labels(status=str(status)).inc()

    def exposition(self) -> bytes:
        """The text format a Prometheus scrape reads."""
        return generate_latest(self.registry)
