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
        self.queued = Gauge(
            "genembed_worker_queued_sequences",
            "Sequences waiting, by priority (online, batch)",
            ["priority"],
            registry=reg,
        )
        self.drain_seconds = Gauge(
            "genembed_worker_expected_drain_seconds",
            "Expected seconds until the running sequences and the online queue are done (what a new call waits behind)",
            registry=reg,
        )
        self.cost_coefficient = Gauge(
            "genembed_worker_cost_coefficient_seconds",
            "The fitted cost of one unit of each iteration term (iteration, decode_row, prefill_token, kv_position, "
            "logits_row)",
            ["term"],
            registry=reg,
        )
        self.cost_correction = Gauge(
            "genembed_worker_cost_correction",
            "What the estimates are multiplied by: the median of the recent iterations' measured over modelled seconds",
            registry=reg,
        )
        self.admission = Counter(
            "genembed_worker_admission_decisions",
            "Online calls by admission outcome (accepted, refused, refused_unseen: refused before tokenization, "
            "never_fits, queue_full, deadline_passed); batch calls as accepted_batch",
            ["outcome"],
            registry=reg,
        )
        self.cpu_turn_wait = Counter(
            "genembed_worker_cpu_turn_wait_seconds",
            "Seconds the engine waited for its turn at CPUs shared with other workers (GENEMBED_WORKER_CPU_TURNS)",
            registry=reg,
        )
        self.deadline_dropped = Counter(
            "genembed_worker_deadline_dropped_sequences",
            "Sequences dropped because their deadline passed before they were done",
            registry=reg,
        )
        self.finish_error = Histogram(
            "genembed_worker_finish_error_seconds",
            "Accepted online calls: expected minus actual seconds to the answer (negative: later than expected)",
            buckets=(-10, -5, -2, -1, -0.5, -0.25, -0.1, 0, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=reg,
        )
        self.running = Gauge("genembed_worker_running_sequences", "Sequences in the running batch", registry=reg)
        self.in_flight = Gauge(
            "genembed_worker_in_flight_requests", "Requests accepted and not yet answered (probes aside)", registry=reg
        )
        self.startup_seconds = Gauge(
            "genembed_worker_startup_seconds",
            "Seconds each start-up phase took: load (weights, adapter merge, runner) and warmup (calibration calls)",
            ["phase"],
            registry=reg,
        )
        self.info = Gauge(
            "genembed_worker_model_info", "The served model", ["model", "method", "revision", "dtype"], registry=reg
        )
