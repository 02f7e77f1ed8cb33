"""Micro-batching of concurrent requests into worker calls, with admission control. The batching policy lives here.

Every distinct input in flight is one *slot*, keyed by its cache key: identical inputs of
concurrent callers share a slot and are computed once. Slots queue FIFO; a dispatcher takes them
into worker calls bounded by items and estimated tokens, at most `max_concurrent_calls` per ready worker at a
time (the model's `WorkerGroup` routes each call and retries one whose worker failed).
When the worker is idle a call leaves at once (no added latency); while calls are in flight the
dispatcher waits up to `max_wait` for a fuller batch. A large request simply contributes many slots,
so it is split across calls and interleaved with others. Each caller gets its own results in order.

A caller that leaves (deadline or client disconnect) releases its slots: a queued slot nobody waits
for is skipped, and a call whose every slot is abandoned is cancelled, which closes its connection
so the worker drops the work.

Admission (one policy; the worker's own queue bound is only a safety net behind it):
- a request arriving while nothing is pending, or while the pending inputs fit in one round of calls
  (`batch_max_items` × calls in flight), is always accepted: an idle or lightly loaded model never refuses;
- past that, the pending inputs and their work units (prompt tokens + steps × `step_cost_tokens`) are bounded
  (`max_queued_items`, `max_queued_work`), and once the cost model (service/admission.py) has an estimate, a
  request is refused when the pending work would take longer than `admission_deadline_share` of the deadline.
Refusals are 429 with a Retry-After from the estimated drain time (capped at `retry_after_max_s`). A request
still queued when its deadline passes is answered 503 with a Retry-After (one in a worker call: 504).
A request may allow a range of steps: `grant_steps` gives it all of them while the work ahead is light and
fewer as the queue fills (never more than the same policy admits), so under load compute is shed before
requests are.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model_server import tracing
from model_server.logs import request_id_var
from model_server.protocol import EmbedItem, EmbedRequest, ItemError
from service.admission import NO_WORK, CostModel, Work, calls_for, step_cap
from service.errors import DeadlineExceeded, Overloaded, QueueTimeout, ServiceError
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings
from service.workers import WorkerGroup

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoalescerLimits:
    max_items: int
    max_tokens: int
    max_wait_s: float
    max_concurrent_calls: int  # per ready worker
    max_queued_items: int
    max_queued_work: float
    step_cost_tokens: float
    deadline_s: float
    deadline_share: float
    retry_after_max_s: int

    @classmethod
    def from_settings(cls, s: GatewaySettings) -> CoalescerLimits:
        return cls(
            max_items=s.batch_max_items,
            max_tokens=s.batch_max_tokens,
            max_wait_s=s.batch_max_wait_ms / 1000,
            max_concurrent_calls=s.max_concurrent_calls,
            max_queued_items=s.max_queued_items,
            max_queued_work=s.max_queued_work,
            step_cost_tokens=s.step_cost_tokens,
            deadline_s=s.request_timeout_s,
            deadline_share=s.admission_deadline_share,
            retry_after_max_s=s.retry_after_max_s,
        )


@dataclass(frozen=True)
class WorkItem:
    key: bytes  # identity: equal keys are computed once
    item: EmbedItem  # steps resolved


@dataclass(frozen=True)
class ItemOutcome:
    vector: np.ndarray | None  # None when the worker rejected the item
    prompt_tokens: int
    truncated: bool
    error: ItemError | None
    steps: int = 0  # steps that ran
    trajectory: np.ndarray | None = None  # [steps, D] when the item asked for it


@dataclass
class Coalesced:
    outcomes: list[ItemOutcome]  # in the caller's order
    queue_s: float  # longest wait of the caller's inputs before their worker call
    compute_s: float  # from the caller's first worker call leaving to its last one answering


@dataclass(eq=False)
class _Call:
    live: int  # its slots someone still waits for
    task: asyncio.Task | None = None


@dataclass(eq=False)
class _Slot:
    key: bytes
    item: EmbedItem
    request_id: str  # of the caller that brought it
    work: Work  # estimated prompt tokens and steps (K times the sequences the input runs)
    future: asyncio.Future
    created_at: float
    trace: Context | None  # of the caller that brought it: its worker call's parent (or a link)
    waiters: int = 0
    deadline: float = 0.0  # the latest of its waiters' deadlines (loop time): bounds a retry
    active: bool = True  # counted in the pending totals; False once answered or abandoned
    call: _Call | None = None
    dispatched_at: float | None = None
    finished_at: float | None = None


def _mark_seen(future: asyncio.Future) -> None:
    """Every waiter may have left before a slot's exception was set: keep asyncio from warning."""
    if not future.cancelled():
        future.exception()


class Coalescer:
    """One per model, in front of its workers."""

    def __init__(self, model: str, workers: WorkerGroup, limits: CoalescerLimits, metrics: GatewayMetrics) -> None:
        self.model = model
        self.workers = workers
        self.limits = limits
        self.metrics = metrics
        self._slots: dict[bytes, _Slot] = {}  # active slots, queued or in a call
        self._queue: deque[_Slot] = deque()  # may hold abandoned slots, skipped when taken
        self._queued = 0  # active slots in the queue
        self._pending = NO_WORK  # of active slots
        self._calls: set[asyncio.Task] = set()
        self._room = asyncio.Event()  # set when a call ends
        self._wakeup = asyncio.Event()
        self.cost_model = CostModel()
        self._seeded = False  # with the workers' calibration
        self._dispatcher: asyncio.Task | None = None

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch_loop())

    async def aclose(self) -> None:
        tasks = [t for t in (self._dispatcher, *self._calls) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- callers ----------------------------------------------------------------------------------

    async def embed(self, work: list[WorkItem], deadline: float, request_id: str) -> Coalesced:
        """Results for `work` in order; `deadline` is in loop time. Raises Overloaded, QueueTimeout,
        DeadlineExceeded or the ServiceError of a failed worker call."""
        if not self.workers.ready:
            raise self.workers.unavailable()
        loop = asyncio.get_running_loop()
        submitted = loop.time()
        fresh: dict[bytes, _Slot] = {}
        for w in work:
            if w.key not in self._slots and w.key not in fresh:
                fresh[w.key] = self._new_slot(w, request_id, submitted)
        self._admit(list(fresh.values()))
        for slot in fresh.values():
            self._slots[slot.key] = slot
            self._queue.append(slot)
            self._pending = self._pending + slot.work
        self._queued += len(fresh)
        self.metrics.queued_items.labels(self.model).set(len(self._slots))
        self._wakeup.set()
        slots = [self._slots[w.key] for w in work]
        for slot in slots:
            slot.waiters += 1
            slot.deadline = max(slot.deadline, deadline)
        try:
            _, pending = await asyncio.wait(
                {s.future for s in slots}, timeout=max(deadline - loop.time(), 0), return_when=asyncio.FIRST_EXCEPTION
            )
            still_queued = sum(1 for s in slots if s.call is None and not s.future.done())
        finally:
            for slot in slots:
                self._release(slot)
        failed = next((s.future.exception() for s in slots if s.future.done() and s.future.exception()), None)
        if failed is not None:
            raise failed
        if still_queued:
            retry_after = self._retry_after(self._seconds(self._pending_work()))
            raise QueueTimeout(
                f"model {self.model!r} is overloaded: {still_queued} of the request's inputs were still queued when "
                f"its {self.limits.deadline_s:g} s deadline passed; retry after {retry_after} s",
                retry_after=retry_after,
            )
        if pending:
            raise DeadlineExceeded(f"the request did not finish within its {self.limits.deadline_s:g} s deadline")
        dispatched = [max(s.dispatched_at or submitted, submitted) for s in slots]
        tracing.record_span(
            "queue", submitted, max(dispatched), {"genembed.items": len(slots), "genembed.new_items": len(fresh)}
        )
        return Coalesced(
            outcomes=[s.future.result() for s in slots],
            queue_s=max(dispatched) - submitted,
            compute_s=max(s.finished_at or submitted for s in slots) - min(dispatched),
        )

    def grant_steps(self, items: list[EmbedItem], lowest: int, highest: int) -> int:
        """Steps in lowest..highest for `items`: `highest` while the work ahead is under half of what the deadline
        allows, then proportionally fewer down to `lowest` as it reaches the limit (so ranged requests shed compute
        while the queue fills, not only once it is full and even one step no longer fits), and never more than are
        admitted now (`lowest` when none is: the request is then refused by `embed`)."""
        wait_s = self._seconds(self._pending_work()) if self._slots else None
        allowed = self.limits.deadline_s * self.limits.deadline_share
        for steps in range(step_cap(wait_s, allowed, lowest, highest), lowest, -1):
            fresh = sum((self._work(dataclasses.replace(item, steps=steps)) for item in items), NO_WORK)
            if self._refusal(fresh) is None:
                return steps
        return lowest

    def _work(self, item: EmbedItem) -> Work:
        """One input as the cost model charges it: estimated prompt tokens (UTF-8 bytes / 3) and steps."""
        tokens = len(item.token_ids) if item.token_ids is not None else len((item.text or "").encode()) // 3 + 1
        info = self.workers.info
        if info is not None and item.truncate:
            tokens = min(tokens, info.max_input_tokens)
        steps = (item.steps or 0) * (item.samples or 1)
        return Work(0, 1, tokens, steps)

    def _units(self, work: Work) -> float:
        """What `max_queued_work` bounds: prompt tokens + steps × `step_cost_tokens`."""
        return work.tokens + work.steps * self.limits.step_cost_tokens

    def _seconds(self, work: Work) -> float | None:
        """The cost model's estimate, its prior taken from the workers' calibration once their /info is known."""
        info = self.workers.info
        if not self._seeded and info is not None:
            self.cost_model.seed(info.calibration)
            self._seeded = True
        return self.cost_model.seconds(work)

    def _new_slot(self, work: WorkItem, request_id: str, now: float) -> _Slot:
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_mark_seen)
        return _Slot(
            work.key,
            work.item,
            request_id,
            self._work(work.item),
            future,
            created_at=now,
            trace=tracing.current_context(),
        )

    def _pending_work(self, extra: Work = NO_WORK) -> Work:
        total = self._pending + extra
        return Work(calls_for(total.items, self.limits.max_items), total.items, total.tokens, total.steps)

    def _refusal(self, fresh: Work) -> tuple[str, float | None] | None:
        """Why new inputs costing `fresh` must be refused now (and the estimated seconds of work ahead), or None."""
        limits, pending = self.limits, len(self._slots)
        if not fresh.items or not pending:
            return None  # an idle model never refuses
        total = self._pending_work(fresh)
        wait_s = self._seconds(total)
        if total.items > limits.max_queued_items:
            return f"{pending} inputs are already queued, the bound is {limits.max_queued_items}", wait_s
        units = self._units(total)
        if units > limits.max_queued_work:
            return f"{units:.0f} work units would be queued, the bound is {limits.max_queued_work:g}", wait_s
        if total.items <= limits.max_items * self._max_calls():
            return None  # one round of calls: lightly loaded
        allowed = limits.deadline_s * limits.deadline_share
        if wait_s is not None and wait_s > allowed:
            return (
                f"about {wait_s:.1f} s of work would be ahead, more than the {allowed:.1f} s that its "
                f"{limits.deadline_s:g} s deadline allows",
                wait_s - allowed,
            )
        return None

    def _admit(self, fresh: list[_Slot]) -> None:
        """Raise Overloaded unless the admission policy (the module's docstring) takes the new inputs."""
        refusal = self._refusal(sum((s.work for s in fresh), NO_WORK))
        if refusal is not None:
            why, wait_s = refusal
            retry_after = self._retry_after(wait_s)
            raise Overloaded(
                f"model {self.model!r} is overloaded ({why}); retry after {retry_after} s", retry_after=retry_after
            )

    def _retry_after(self, wait_s: float | None) -> int:
        """Whole seconds until the work ahead has drained (1 without an estimate), capped."""
        return min(max(1, math.ceil(wait_s or 1)), self.limits.retry_after_max_s)

    def _release(self, slot: _Slot) -> None:
        slot.waiters -= 1
        if slot.waiters > 0 or not slot.active:
            return
        self._retire(slot)  # abandoned: nobody waits for it any more
        if slot.call is None:
            self._queued -= 1
        else:
            slot.call.live -= 1
            if slot.call.live == 0 and slot.call.task is not None:
                slot.call.task.cancel()

    def _retire(self, slot: _Slot) -> None:
        slot.active = False
        self._pending = self._pending - slot.work
        if self._slots.get(slot.key) is slot:
            del self._slots[slot.key]
        self.metrics.queued_items.labels(self.model).set(len(self._slots))

    # -- dispatcher -------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        limits = self.limits
        while True:
            if self._queued == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._calls) >= self._max_calls():
                self._room.clear()
                await self._room.wait()
                continue
            if self._calls and self._queued < limits.max_items and limits.max_wait_s > 0:
                await asyncio.sleep(limits.max_wait_s)  # the worker is busy anyway: let the batch fill
            batch = self._take()
            if not batch:
                continue
            self._dispatch(batch)

    def _max_calls(self) -> int:
        """Calls in flight the model's workers take: the per-worker bound times the ready ones (at least one
        round, so queued inputs still meet a worker that has just gone down and fail at once)."""
        return self.limits.max_concurrent_calls * max(1, self.workers.ready_count)

    def _take(self) -> list[_Slot]:
        """The next call's inputs. It holds at most `max_items` engine sequences (an o1 input with n samples is n),
        so a worker never has more than `max_items` × `max_concurrent_calls` of this gateway's sequences: its
        own queue bound (GENEMBED_WORKER_MAX_WAITING_SEQS) stays above that, and does not refuse what this admitted."""
        batch: list[_Slot] = []
        tokens = sequences = 0
        while self._queue:
            slot = self._queue[0]
            if not slot.active:
                self._queue.popleft()
                continue
            n = slot.item.samples or 1
            if batch and (tokens + slot.work.tokens > self.limits.max_tokens or sequences + n > self.limits.max_items):
                break
            self._queue.popleft()
            batch.append(slot)
            tokens += slot.work.tokens
            sequences += n
        self._queued -= len(batch)
        return batch

    def _dispatch(self, batch: list[_Slot]) -> None:
        now = asyncio.get_running_loop().time()
        call = _Call(live=len(batch))
        for slot in batch:
            slot.call, slot.dispatched_at = call, now
            self.metrics.queue_seconds.labels(self.model).observe(now - slot.created_at)
        self.metrics.batch_items.labels(self.model).observe(len(batch))
        self.cost_model.call_started(now)
        request_ids = ",".join(dict.fromkeys(s.request_id for s in batch))
        context = contextvars.copy_context()  # the call's log lines carry the ids of the requests it serves
        context.run(request_id_var.set, request_ids)
        request = EmbedRequest([s.item for s in batch], request_ids)
        call.task = asyncio.create_task(self._run_call(batch, request), context=context)
        self._calls.add(call.task)
        call.task.add_done_callback(lambda task: self._call_done(batch, now, task), context=context)

    async def _run_call(self, batch: list[_Slot], request: EmbedRequest) -> str:
        """Resolve every slot of the call; returns the outcome label.

        Its span is a child of the first caller's request span, linked to the other callers' (a batch serves many).
        """
        traces = {id(s.trace): s.trace for s in batch if s.trace is not None}
        parent, *others = traces.values() or [None]
        ids = request.request_id or ""
        attributes = {"genembed.model": self.model, "genembed.items": len(batch), "genembed.request_ids": ids}
        try:
            with tracing.span("worker.call", kind="client", parent=parent, links=others, attributes=attributes):
                response = await self.workers.embed(request, max(s.deadline for s in batch))
            if len(response.results) != len(batch):
                raise ServiceError(
                    f"the worker for model {self.model!r} answered {len(response.results)} of {len(batch)}"
                )
        except ServiceError as exc:
            for slot in batch:
                slot.future.set_exception(exc)
            return exc.code or "error"
        for slot, result, output in zip(batch, response.results, response.outputs(), strict=True):
            vector, trajectory = output if output is not None else (None, None)
            trajectory = trajectory if slot.item.trajectory else None
            slot.future.set_result(
                ItemOutcome(vector, result.prompt_tokens, result.truncated, result.error, result.steps, trajectory)
            )
        return "ok"

    def _call_done(self, batch: list[_Slot], started: float, task: asyncio.Task) -> None:
        """Runs however the call ended, even cancelled before it started: frees its slots and its place."""
        now = asyncio.get_running_loop().time()
        self._calls.discard(task)
        self._room.set()
        if task.cancelled():
            outcome = "cancelled"
        elif task.exception() is not None:
            outcome = "error"
            log.error("worker call for %s failed", self.model, exc_info=task.exception())
        else:
            outcome = task.result()
        for slot in batch:
            slot.finished_at = now
            if not slot.future.done():
                slot.future.set_exception(ServiceError(f"the worker call for model {self.model!r} failed"))
            if slot.active:
                self._retire(slot)
        done = sum((s.work for s in batch), Work(1, 0, 0, 0))  # one call
        self.cost_model.call_finished(now, done if outcome == "ok" else None)
        if (coefficients := self.cost_model.coefficients) is not None:
            for per, value in zip(("call", "token", "step"), coefficients, strict=True):
                self.metrics.cost_seconds.labels(self.model, per).set(value)
        self.metrics.worker_call_seconds.labels(self.model, outcome).observe(now - started)
