"""The worker's core, without HTTP: a loaded model, its method and engine, and `embed`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import weakref
from dataclasses import dataclass

import numpy as np

from common import protocol, tracing
from common.protocol import EmbedItem, EmbedRequest, EmbedResponse, ItemError, ItemResult, ModelInfo
from common.rules import ItemRejected
from model_server import admission
from model_server.admission import Call, Capacity, Decision, Policy, Schedule, Seqs
from model_server.engine import DeadlineExceeded, Engine, EngineLimits, EngineStopped
from model_server.loading import LoadedModel, load_model
from model_server.methods import build_method
from model_server.metrics import WorkerMetrics
from model_server.prompts import PreparedInput
from model_server.specs import ModelSpec
from model_server.threads import INGRESS_NICE, CpuTurns, ingress_executor

log = logging.getLogger(__name__)

#: the most steps a calibration call runs (an o1 budget of 128 thought tokens would make warm-up slow)
_CALIBRATION_STEPS = 5


class NotAdmitted(Exception):
    """Admission said no (`decision.outcome`: refused, 429; never_fits, 400)."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.detail)
        self.decision = decision


@dataclass(frozen=True)
class LoadReport:
    """The backlog the worker reports on every /embed answer and on `GET /load`."""

    drain_s: float  # expected seconds until the running sequences and the online queue are done
    running_seqs: int
    waiting_online: int
    waiting_batch: int

    @property
    def queued_seqs(self) -> int:
        """Every sequence the worker holds, running or waiting."""
        return self.running_seqs + self.waiting_online + self.waiting_batch

    def headers(self) -> dict[str, str]:
        return {protocol.DRAIN_HEADER: f"{self.drain_s:.3f}", protocol.QUEUED_HEADER: str(self.queued_seqs)}

    def to_json(self) -> dict:
        return {
            "drain_s": round(self.drain_s, 3),
            "queued_seqs": self.queued_seqs,
            "running_seqs": self.running_seqs,
            "waiting": {"online": self.waiting_online, "batch": self.waiting_batch},
        }


@dataclass
class _Ahead:
    """What a new online call waits behind, for one version of the engine's queue: recomputed when an iteration
    or another submitter changed the queue, extended by this worker's own submissions (a burst of calls between
    two iterations then costs each call its own sequences, not a pass over the whole queue)."""

    version: int
    schedule: Schedule
    running: int
    waiting_online: int
    waiting_batch: int
    drain_s: float | None = None  # computed when first asked for
    soonest_s: float | None = None  # likewise: admission.soonest_seconds


class EmbeddingWorker:
    def __init__(
        self,
        loaded: LoadedModel,
        limits: EngineLimits,
        metrics: WorkerMetrics | None = None,
        policy: Policy | None = None,
        cpu_turns: CpuTurns | None = None,
        ingress_nice: int = INGRESS_NICE,
    ) -> None:
        """`cpu_turns`: the turns this worker takes at CPUs it shares with other workers (only where the model runs
        on the CPU); `ingress_nice`: what the thread that tokenizes calls adds to the worker's niceness."""
        self.loaded = loaded
        self.metrics = metrics or WorkerMetrics()
        self.method = build_method(loaded, limits.max_running_seqs)
        turns = cpu_turns if loaded.device.type == "cpu" else None
        self.engine = Engine(self.method, limits, self.metrics, turns)
        self.policy = policy or Policy()
        self.capacity = Capacity(
            limits.max_running_seqs, limits.max_batch_tokens, limits.max_kv_tokens, self.method.stateful
        )
        self._ahead: _Ahead | None = None
        self._ingress = ingress_executor(ingress_nice)
        self._ingress_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self.calibration: list[list[float]] = []  # timed warm-up calls: see warmup()
        spec = loaded.spec
        self.metrics.info.labels(spec.id, spec.method, loaded.revision, str(loaded.dtype)).set(1)

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        limits: EngineLimits,
        metrics: WorkerMetrics | None = None,
        policy: Policy | None = None,
        cpu_turns: CpuTurns | None = None,
        ingress_nice: int = INGRESS_NICE,
    ) -> EmbeddingWorker:
        worker = cls(load_model(spec), limits, metrics, policy, cpu_turns, ingress_nice)
        worker.engine.start()
        return worker

    def info(self) -> ModelInfo:
        loaded, spec = self.loaded, self.loaded.spec
        return ModelInfo(
            id=spec.id,
            method=spec.method,
            dimension=loaded.dimension,
            min_refinement_steps=spec.min_refinement_steps,
            max_refinement_steps=spec.max_refinement_steps,
            default_refinement_steps=spec.default_refinement_steps,
            max_input_tokens=spec.max_input_tokens,
            vocab_size=loaded.vocab_size,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
            revision=loaded.revision,
            runner=self.method.runner_kind,
            calibration=self.calibration,
            max_thought_samples=spec.max_thought_samples if spec.facts.samples_thoughts else None,
        )

    def _ingress_turn(self) -> asyncio.Lock:
        """The turn at the ingress thread, one per event loop: an asyncio lock serves the loop it first waits in,
        and in-process users (eval scripts, tests) drive a worker from one `asyncio.run` after another."""
        loop = asyncio.get_running_loop()
        turn = self._ingress_turns.get(loop)
        if turn is None:
            turn = self._ingress_turns[loop] = asyncio.Lock()
        return turn

    def _prepare(self, items: list[EmbedItem]) -> tuple[list[ItemResult], list[PreparedInput | None]]:
        results, prepared = [], []
        for item in items:
            try:
                p = self.method.prompts.prepare(item)
            except ItemRejected as rejected:
                results.append(ItemResult(error=rejected.error))
                prepared.append(None)
                continue
            results.append(ItemResult(prompt_tokens=len(p.token_ids), steps=p.steps, truncated=p.truncated))
            prepared.append(p)
        return results, prepared

    async def embed(self, request: EmbedRequest, received: float | None = None) -> EmbedResponse:
        """Embed a call; per-item failures are results. `received`: when the call arrived (time.monotonic()), which
        its `deadline_s` counts from. Raises NotAdmitted, QueueFull, DeadlineExceeded, EngineStopped."""
        received = time.monotonic() if received is None else received
        unseen = request.priority == "online" and request.deadline_s is not None
        if unseen:
            self._refuse_unseen(request.deadline_s, received)
        # Calls are tokenized one at a time, in arrival order (`_ingress`), and asked again when their turn comes:
        # the queue may have grown meanwhile, and a burst's calls beyond it are then refused without tokenization.
        async with self._ingress_turn():
            if unseen:
                self._refuse_unseen(request.deadline_s, received)
            with tracing.span("prepare", attributes={"genembed.items": len(request.items)}):
                loop = asyncio.get_running_loop()
                results, prepared = await loop.run_in_executor(self._ingress, self._prepare, request.items)
        # An input with n samples (o1 thoughts) runs as n sequences, combined below.
        runs = [dataclasses.replace(p, sample=i) for p in prepared if p is not None for i in range(p.samples)]
        # Admission and submission with no await between them: no other call is admitted in between.
        call = self._call(runs, sum(p is not None for p in prepared), request, received)
        decision = self.admit(call) if runs else None
        if decision is not None:
            runs = [self.method.prompts.with_steps(r, int(k)) for r, k in zip(runs, decision.steps, strict=True)]
        deadline = None if request.deadline_s is None else received + request.deadline_s
        # One span for the request's sequences in the engine, not one per iteration: they share each forward
        # pass with other calls' sequences, so per-iteration spans would repeat one pass under many traces.
        attributes = tracing.enabled() and {
            "genembed.sequences": len(runs),
            "genembed.prompt_tokens": sum(len(r.token_ids) for r in runs),
            "genembed.max_steps": max((r.steps for r in runs), default=0),
        }
        with tracing.span("engine", attributes=attributes or None):
            due = call.due(self.policy)
            finish_by = None if math.isinf(due) else due
            futures = self.engine.submit(runs, deadline, request.priority, finish_by) if runs else []
            if decision is not None:
                self._submitted(call.seqs_at(decision.steps, due), request.priority)
            try:
                outcomes = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
            except asyncio.CancelledError:
                for future in futures:  # the client went away: free the slots at the next iteration
                    future.cancel()
                raise
        if expired := next((o for o in outcomes if isinstance(o, DeadlineExceeded)), None):
            raise expired
        if decision is not None and decision.expected_s is not None and request.deadline_s is not None:
            self.metrics.finish_error.observe(decision.expected_s - (time.monotonic() - received))
        vectors = []
        slots = iter(outcomes)
        for result, p in zip(results, prepared, strict=True):
            if p is None:
                continue
            samples = [next(slots) for _ in range(p.samples)]
            outcome = next((o for o in samples if isinstance(o, BaseException)), None)
            if isinstance(outcome, EngineStopped):
                raise outcome
            if outcome is not None:
                log.error("item failed: %r", outcome)
                result.error = ItemError(protocol.INTERNAL_ERROR, f"embedding failed: {outcome}")
            else:
                embedded = self.method.combine(samples)
                result.steps = embedded.steps
                vectors.append(embedded.vector)
                if embedded.trajectory is not None:
                    result.trajectory = len(embedded.trajectory)
                    vectors.extend(embedded.trajectory)
                if p.item.tolerance is not None:
                    self.metrics.steps_saved.inc(p.steps - embedded.steps)
        for result in results:
            self.metrics.items.labels("error" if result.error else "ok").inc()
        dim = self.loaded.dimension
        array = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
        return EmbedResponse(dimension=dim, results=results, vectors=array)

    def _call(self, runs: list[PreparedInput], inputs: int, request: EmbedRequest, received: float) -> Call:
        """A call's sequences as admission sees them, each at its range's highest K."""
        stateful = self.method.stateful
        decodes = np.array([stateful and r.steps > 0 for r in runs], bool)
        lowest = [
            r.item.min_steps if d and r.item.min_steps is not None else r.steps
            for r, d in zip(runs, decodes, strict=True)
        ]
        return Call(
            prompts=np.array([len(r.token_ids) for r in runs], np.int64),
            lowest=np.array(lowest, np.int64),
            highest=np.array([r.steps for r in runs], np.int64),
            extra=np.array([r.reserve for r in runs], np.int64),
            decodes=decodes,
            inputs=inputs,
            deadline_s=request.deadline_s,
            priority=request.priority,
            received=received,
        )

    def admit(self, call: Call) -> Decision:
        """Admission's decision on a call, counted; raises NotAdmitted. The caller submits an accepted call before
        it next awaits (so no other call is admitted against the same queue in between) and reports it with
        `_submitted`."""
        idle = Schedule(admission.EMPTY, self.capacity.slots_for(call.seqs(0)), self.capacity.batch_tokens)
        ahead = self._current().schedule
        decision = admission.decide(self.engine.cost, ahead, idle, call, self.policy, time.monotonic())
        self.metrics.admission.labels(decision.outcome if call.priority == "online" else "accepted_batch").inc()
        if decision.outcome != "accepted":
            log.info("embed: %s: %s", decision.outcome, decision.detail)
            raise NotAdmitted(decision)
        return decision

    def _refuse_unseen(self, deadline_s: float, received: float) -> None:
        """Raise NotAdmitted, before the call is tokenized, when the queue alone outlasts its deadline's share."""
        ahead = self._current()
        if ahead.soonest_s is None:
            ahead.soonest_s = admission.soonest_seconds(self.engine.cost, ahead.schedule)
        decision = admission.refuse_unseen(ahead.soonest_s, deadline_s, received, self.policy, time.monotonic())
        if decision is not None:
            self.metrics.admission.labels("refused_unseen").inc()
            log.info("embed: refused unseen: %s", decision.detail)
            raise NotAdmitted(decision)

    def _current(self) -> _Ahead:
        ahead = self._ahead
        if ahead is None or ahead.version != self.engine.version:
            backlog, version = self.engine.backlog()
            schedule = backlog.schedule(self.capacity)
            ahead = self._ahead = _Ahead(
                version, schedule, len(backlog.running), len(backlog.online), len(backlog.batch)
            )
        return ahead

    def _submitted(self, seqs: Seqs, priority: str) -> None:
        """Our own submission moved the queue one version on: extend the schedule instead of rebuilding it (unless
        an iteration ran in between)."""
        ahead = self._ahead
        if ahead is None or self.engine.version != ahead.version + 1:
            return
        if priority == "online":
            ahead.schedule.extend(seqs)
            ahead.waiting_online += len(seqs)
        else:
            ahead.waiting_batch += len(seqs)
        ahead.version, ahead.drain_s, ahead.soonest_s = ahead.version + 1, None, None

    def backlog(self) -> LoadReport:
        """The backlog now (also refreshes the gauges that describe it)."""
        ahead = self._current()
        if ahead.drain_s is None:
            ahead.drain_s = admission.drain_seconds(self.engine.cost, ahead.schedule)
        self.metrics.drain_seconds.set(ahead.drain_s)
        self.metrics.cost_correction.set(self.engine.cost.correction)
        coefficients = self.engine.cost.coefficients
        if coefficients is not None:
            for term, value in zip(admission.TERMS, coefficients, strict=True):
                self.metrics.cost_coefficient.labels(term).set(value)
        return LoadReport(ahead.drain_s, ahead.running, ahead.waiting_online, ahead.waiting_batch)

    def retry_after(self, drain_s: float) -> int:
        """Seconds a refusal by a bound (not by an estimate) asks the caller to wait: until the queue drains."""
        return min(max(math.ceil(drain_s), 1), self.policy.max_retry_after_s)

    async def warmup(self) -> None:
        """One pass of each kind, so the first real request does not pay for lazy initialisation; then a few
        batched calls whose engine iterations seed the worker's cost model (admission.py), so the first request
        is admitted by an estimate. Their timings stay in `ModelInfo.calibration` for gateways that read them."""
        spec = self.loaded.spec
        steps = min(max(spec.default_refinement_steps, spec.min_refinement_steps), _CALIBRATION_STEPS)
        await self._timed_call(1, steps)
        self.engine.cost.discard()  # the first pass paid for lazy initialisation
        most = self.engine.limits.max_waiting_seqs  # a call of more would be refused
        full = min(self.engine.limits.max_running_seqs, most)  # the widest prefill: the fit spans what bursts do
        lowest = spec.min_refinement_steps
        shapes = [(1, steps), (min(8, most), steps), (min(32, most), steps), (min(32, most), lowest), (full, lowest)]
        self.calibration = [await self._timed_call(items, k) for items, k in shapes]
        self.engine.cost.pin()  # the calibration's iterations seed the cost model before the first request

    async def _timed_call(self, items: int, steps: int) -> list[float]:
        """[calls, inputs, prompt tokens, steps, seconds] of one call of `items` distinct inputs at `steps`."""
        pair = "warm up" if self.loaded.spec.facts.scores_pairs else None  # a cross-encoder scores pairs
        batch = [
            EmbedItem(text=f"warm up {i}: a sentence to time", text_pair=pair, input_type="query", steps=steps)
            for i in range(items)
        ]
        started = time.perf_counter()
        response = await self.embed(EmbedRequest(items=batch))
        seconds = time.perf_counter() - started
        if (error := next((r.error for r in response.results if r.error), None)) is not None:
            raise RuntimeError(f"warm-up failed: {error.message}")
        tokens = sum(r.prompt_tokens for r in response.results)
        return [1.0, float(items), float(tokens), float(sum(r.steps for r in response.results)), seconds]

    def stop(self) -> None:
        self.engine.stop()
        self._ingress.shutdown(wait=False, cancel_futures=True)
