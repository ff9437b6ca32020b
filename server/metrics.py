"""Prometheus metrics for GET /metrics: requests, tokens, queue and slots, latency histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .engine import Engine, Generation

# Time to first token spans a cached one-token prompt on a GPU to a long prompt on two CPU cores.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Between tokens: a small model on a GPU to an 8B model on a laptop.
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2, 2.5)
# llama_decode calls per prompt: one on an idle server, a block a step beside running streams under the stall bound.
PROMPT_CALL_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine) -> None:
        # A registry of our own, not the process-wide default, so each app (and each test) counts alone.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "workers_ai_requests", "HTTP requests answered, by status", ["status"], registry=self.registry
        )
        self.prompt_tokens = Counter("workers_ai_prompt_tokens", "Prompt tokens of requests", registry=self.registry)
        self.cached_tokens = Counter(
            "workers_ai_cached_prompt_tokens", "Prompt tokens served from a slot's cache", registry=self.registry
        )
        self.completion_tokens = Counter("workers_ai_completion_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram(
            "workers_ai_time_to_first_token_seconds",
            "From a request's submission to its first piece of text",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "workers_ai_inter_token_seconds",
            "Between consecutive pieces of text of one request",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.token_gaps = Histogram(
            "workers_ai_token_gap_seconds",
            "Between consecutive tokens of one request as the engine made them (each step's, text or not)",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.prompt_calls = Histogram(
            "workers_ai_prompt_decode_calls",
            "llama_decode calls that computed a request's prompt (requests with a prompt computed)",
            buckets=PROMPT_CALL_BUCKETS,
            registry=self.registry,
        )
        queue = Gauge("workers_ai_queue_depth", "Requests waiting for a slot", registry=self.registry)
        queue.set_function(lambda: engine.queue_depth)
        busy = Gauge("workers_ai_slots_busy", "Slots generating right now", registry=self.registry)
        busy.set_function(lambda: engine.busy_slots)
        slots = Gauge("workers_ai_slots", "Slots configured", registry=self.registry)
        slots.set_function(lambda: engine.slots)
        # Cumulative seconds as gauges read from the engine (a Counter cannot be read from a function).
        busy_time = Gauge(
            "workers_ai_engine_busy_seconds",
            "Seconds the engine thread has worked (admitting and stepping), cumulative",
            registry=self.registry,
        )
        busy_time.set_function(lambda: engine.busy_seconds)
        decode_time = Gauge(
            "workers_ai_engine_decode_seconds",
            "Seconds of that work spent inside llama_decode, cumulative",
            registry=self.registry,
        )
        decode_time.set_function(lambda: engine.decode_seconds)

    def observe(self, status: int, generation: Generation | None) -> None:
        self.requests.labels(status=str(status)).inc()
        if generation is None:
            return
        self.prompt_tokens.inc(generation.prompt_tokens)
        self.cached_tokens.inc(generation.cached_tokens)
        self.completion_tokens.inc(generation.completion_tokens)
        if generation.prompt_calls:
            self.prompt_calls.observe(generation.prompt_calls)
        ttft = generation.time_to_first_piece
        if ttft is not None:
            self.ttft.observe(ttft)
        for gap in generation.piece_gaps:
            self.itl.observe(gap)
        for gap in generation.token_gaps:
            self.token_gaps.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
