"""The server's Prometheus metrics (GET /metrics), in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vltrain_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("vltrain_prompt_tokens", "Prompt tokens of answered chat requests (image "
                                     "tokens included)", ["model"], registry=r)
        self.image_tokens = Counter("vltrain_image_tokens", "Image context tokens of answered chat requests",
                                    ["model"], registry=r)
        self.generation_tokens = Counter("vltrain_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.cancelled = Counter("vltrain_cancelled_requests", "Chat requests whose client went away before the "
                                 "reply was complete", registry=r)
        self.queue_depth = Gauge("vltrain_queue_depth", "Chat requests waiting for a batch", registry=r)
        self.running = Gauge("vltrain_running_requests", "Chat requests in the generate call now running",
                             registry=r)
        self.latency = Histogram("vltrain_request_latency_seconds", "Time from a chat request's arrival to its "
                                 "last byte", buckets=_LATENCY, registry=r)
        self.ttft = Histogram("vltrain_time_to_first_token_seconds", "Time from a chat request entering the queue "
                              "to its first generated token", buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("vltrain_batch_size", "Requests per generate call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
