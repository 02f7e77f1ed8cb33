"""The gateway's Prometheus metrics, on a registry of its own (tests run several gateways per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_STEPS = (0, 1, 2, 3, 5, 8, 10, 15, 20, 30, 50)


class GatewayMetrics:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "genembed_gateway_request_seconds",
            "HTTP request duration",
            ["endpoint", "model", "status"],
            buckets=_SECONDS,
            registry=reg,
        )
        self.in_flight = Gauge("genembed_gateway_in_flight_requests", "HTTP requests being served", registry=reg)
        self.loop_lag = Gauge(
            "genembed_gateway_event_loop_lag_seconds",
            "How late the event loop ran at its latest sample: each request's wait before and between its steps",
            registry=reg,
        )
        self.rejections = Counter(
            "genembed_gateway_rejections", "Requests answered with an error, by error code", ["reason"], registry=reg
        )
        self.queue_seconds = Histogram(
            "genembed_gateway_queue_seconds",
            "Time a request's worker call waited in the gateway before it left (batch priority: for room)",
            ["model"],
            buckets=_SECONDS,
            registry=reg,
        )
        self.worker_call_seconds = Histogram(
            "genembed_gateway_worker_call_seconds",
            "Duration of one worker /embed call",
            ["model", "outcome"],
            buckets=_SECONDS,
            registry=reg,
        )
        self.batch_items = Histogram(
            "genembed_gateway_batch_items",
            "Inputs in one worker call (a request's uncached inputs not already in flight)",
            ["model"],
            buckets=_SIZES,
            registry=reg,
        )
        self.queued_items = Gauge(
            "genembed_gateway_queued_items", "Distinct inputs in worker calls in flight", ["model"], registry=reg
        )
        self.input_tokens = Counter(
            "genembed_gateway_input_tokens", "Prompt tokens of answered inputs", ["model"], registry=reg
        )
        self.refinement_steps = Histogram(
            "genembed_gateway_refinement_steps",
            "Refinement steps each input ran (or its cached entry did)",
            ["model"],
            buckets=_STEPS,
            registry=reg,
        )
        self.steps_shed = Counter(
            "genembed_gateway_steps_shed",
            "Refinement steps the workers did not grant to inputs that allowed a range (max minus granted)",
            ["model"],
            registry=reg,
        )
        self.cache_items = Counter(
            "genembed_gateway_cache_items", "Cache lookups per input, by result (hit/miss)", ["result"], registry=reg
        )
        self.cache_errors = Counter(
            "genembed_gateway_cache_errors", "Cache operations that failed or timed out", ["op"], registry=reg
        )
        self.cache_available = Gauge(
            "genembed_gateway_cache_available", "1 while the cache backend answers, 0 during an outage", registry=reg
        )
        # Per API key: `key` is the key's name from the keys file (never the secret).
        self.key_requests = Counter(
            "genembed_gateway_key_requests", "Requests admitted, per API key", ["key"], registry=reg
        )
        self.key_tokens = Counter(
            "genembed_gateway_key_tokens", "Prompt tokens charged, per API key", ["key"], registry=reg
        )
        self.key_rejections = Counter(
            "genembed_gateway_key_rejections",
            "Requests refused by a key's rate limit, by limit (requests, tokens)",
            ["key", "limit"],
            registry=reg,
        )
        # The fleet: per worker address (`worker` is its URL), and per model.
        self.worker_outstanding = Gauge(
            "genembed_gateway_worker_outstanding_items",
            "Inputs in calls in flight to one worker",
            ["model", "worker"],
            registry=reg,
        )
        self.worker_calls = Counter(
            "genembed_gateway_worker_calls",
            "Worker /embed calls, by outcome (refused_remembered: not sent, the worker's last refusal covered it)",
            ["model", "worker", "outcome"],
            registry=reg,
        )
        self.worker_retries = Counter(
            "genembed_gateway_worker_retries",
            "Calls tried on another worker after one refused (429) or failed",
            ["model", "reason"],
            registry=reg,
        )
        self.worker_drain_seconds = Gauge(
            "genembed_gateway_worker_drain_seconds",
            "A worker's expected seconds to drain the work it holds, as it last reported (what routing compares)",
            ["model", "worker"],
            registry=reg,
        )
        self.workers_ready = Gauge(
            "genembed_gateway_workers_ready", "Workers taking new calls", ["model"], registry=reg
        )
        # The Batch API (docs/batch.md): per model and outcome, never per batch (each batch's counts are in its
        # object); `batches` is read from the shared store, so every gateway reports the same value (take max).
        self.batch_lines = Counter(
            "genembed_gateway_batch_lines",
            "Batch lines this gateway answered, by model and outcome (completed, failed)",
            ["model", "outcome"],
            registry=reg,
        )
        self.batch_line_retries = Counter(
            "genembed_gateway_batch_line_retries",
            "Batch lines retried after load, a worker restart or a server error",
            ["model"],
            registry=reg,
        )
        self.batch_lines_in_flight = Gauge(
            "genembed_gateway_batch_lines_in_flight",
            "Batch lines in worker calls from this gateway",
            ["model"],
            registry=reg,
        )
        self.batches = Gauge(
            "genembed_gateway_batches",
            "Batches with work left, by status (from the shared store)",
            ["status"],
            registry=reg,
        )
        self.batches_finished = Counter(
            "genembed_gateway_batches_finished",
            "Batches this gateway finished, by final status",
            ["status"],
            registry=reg,
        )
