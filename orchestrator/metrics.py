"""Prometheus metrics of one server, in a registry of its own (so tests and servers never collide).

The engine thread reports scheduler state with `set_scheduler_state`; the HTTP layer records
per-request token counts and latencies. prometheus_client's metric updates are thread-safe.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests_running = Gauge("meshserve_requests_running", "Requests in the running batch", registry=r)
        self.requests_waiting = Gauge("meshserve_requests_waiting", "Requests queued for admission", registry=r)
        self.kv_blocks_used = Gauge("meshserve_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge("meshserve_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.prefix_cache_hit_rate = Gauge("meshserve_prefix_cache_hit_rate",
                                           "Share of prompt tokens found in the prefix cache", registry=r)
        self.prompt_tokens = Counter("meshserve_prompt_tokens_total", "Prompt tokens of admitted requests",
                                     registry=r)
        self.generation_tokens = Counter("meshserve_generation_tokens_total", "Tokens generated", registry=r)
        self.requests = Counter("meshserve_requests_total", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.time_to_first_token = Histogram("meshserve_time_to_first_token_seconds",
                                             "Request arrival to first generated token", buckets=_TTFT_BUCKETS,
                                             registry=r)
        self.time_per_output_token = Histogram("meshserve_time_per_output_token_seconds",
                                               "Mean time between output tokens of a request",
                                               buckets=_TPOT_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("meshserve_e2e_request_latency_seconds",
                                             "Request arrival to its last token", buckets=_E2E_BUCKETS, registry=r)
        self.engine_restarts = Counter("meshserve_engine_restarts_total",
                                       "Times the ranks were started again after a failure", registry=r)
        self.requests_rejected = Counter("meshserve_requests_rejected_total",
                                         "Requests refused before they reached the engine, by reason",
                                         ["reason"], registry=r)
        self.api_queued_requests = Gauge("meshserve_api_queued_requests",
                                         "Admitted requests that have no first token yet", registry=r)
        self.api_queued_tokens = Gauge("meshserve_api_queued_prompt_tokens",
                                       "Prompt tokens of admitted requests that have no first token yet", registry=r)

    # ---- the engine thread ---------------------------------------------------------------------
    def set_scheduler_state(self, running: int, waiting: int, kv_used: int, kv_total: int,
                            prefix_hit_rate: float) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)
        self.kv_blocks_used.set(kv_used)
        self.kv_blocks_total.set(kv_total)
        self.prefix_cache_hit_rate.set(prefix_hit_rate)

    # ---- the HTTP layer ------------------------------------------------------------------------
    def request_started(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def token_generated(self, n: int = 1) -> None:
        self.generation_tokens.inc(n)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def request_finished(self, finish_reason: str, e2e_seconds: float, ttft_seconds: float | None,
                         completion_tokens: int) -> None:
        """finish_reason: stop | length | abort | error. TPOT is the mean gap after the first token."""
        self.requests.labels(finish_reason=finish_reason).inc()
        self.e2e_request_latency.observe(e2e_seconds)
        if ttft_seconds is not None and completion_tokens > 1:
            self.time_per_output_token.observe((e2e_seconds - ttft_seconds) / (completion_tokens - 1))

    def request_rejected(self, reason: str) -> None:
        """reason: queue_full (429), too_large (413), unauthorized (401)."""
        self.requests_rejected.labels(reason=reason).inc()

    def set_api_queue(self, requests: int, prompt_tokens: int) -> None:
        self.api_queued_requests.set(requests)
        self.api_queued_tokens.set(prompt_tokens)

    def engine_restarted(self) -> None:
        self.engine_restarts.inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
