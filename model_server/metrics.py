"""The worker's Prometheus metrics, on a registry of its own (tests run several workers per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class WorkerMetrics:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        self.forward_seconds = Histogram(
            "genembed_worker_forward_seconds",
            "Duration of one forward pass",
            ["phase"],
            buckets=_SECONDS,
            registry=reg,
        )
        self.batch_seqs = Histogram(
            "genembed_worker_batch_sequences",
            "Sequences in one forward pass",
            ["phase"],
            buckets=_SIZES,
            registry=reg,
        )
        self.batch_tokens = Histogram(
            "genembed_worker_batch_tokens", "Tokens in one forward pass", ["phase"], buckets=_SIZES, registry=reg
        )
        self.steps = Counter(
            "genembed_worker_refinement_steps",
            "Refinement (decode) steps executed, summed over sequences",
            registry=reg,
        )
        self.steps_saved = Counter(
            "genembed_worker_refinement_steps_saved",
            "Steps left unrun by inputs that stopped early (refinement_steps 'auto'): budget minus steps run",
            registry=reg,
        )
        self.items = Counter("genembed_worker_items", "Inputs answered", ["outcome"], registry=reg)
        self.errors = Counter("genembed_worker_forward_errors", "Forward passes that raised", registry=reg)
        self.rejected = Counter(
            "genembed_worker_rejected_requests", "Requests refused because the queue was full", registry=reg
        )
        self.waiting = Gauge("genembed_worker_waiting_sequences", "Sequences in the queue", registry=reg)
        self.running = Gauge("genembed_worker_running_sequences", "Sequences in the running batch", registry=reg)
        self.in_flight = Gauge(
            "genembed_worker_in_flight_requests", "Requests accepted and not yet answered (probes aside)", registry=reg
        )
        self.info = Gauge(
            "genembed_worker_model_info", "The served model", ["model", "method", "revision", "dtype"], registry=reg
        )
