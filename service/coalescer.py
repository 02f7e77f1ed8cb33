"""A request's cache misses as one worker call, identical inputs in flight computed once.

Every distinct input in flight is one *slot*, keyed by its identity (the cache key, and the step range when the
request allows one): a request whose input is already in flight for another request waits for that slot instead
of asking for it again. A request's other inputs leave at once as one worker call carrying its deadline and
priority, so the worker admits the request whole or refuses it (429 with Retry-After, or 400 when it could never
fit its deadline): admission is where the work runs and its speed is known (docs/gateway.md). No gateway queue,
no cost model, no coalescing of different requests into shared calls: the worker's engine already batches every
call's sequences step by step, and a shared call would tie requests of different deadlines to one admission.

What protects the gateway itself: per model, at most `max_queued_items` distinct inputs and `max_worker_calls`
calls in flight, and an event loop at most `max_loop_lag_s` late (service/loop_lag.py); an online request past
any is refused at once (429, Retry-After from the workers' reported backlog). Batch-priority requests are never
refused for load: their calls carry no deadline, do not count against the bounds (their caller bounds their
concurrency), and wait out every 429, 503 and 504 with the Retry-After they were given, until they are answered.
Slots are deduplicated per priority, so an online request never waits behind a batch call.

An answered input stays in the table until `store` (the cache's write) has it, so a request that missed the cache
a moment before still finds it here: an input is in flight or cached, never computed twice for want of either.
A caller that leaves (client disconnect) releases its slots; a call whose every slot is abandoned is cancelled,
which closes its connection so the worker drops the work. An online caller waits for its slots until its deadline
plus a grace for the worker's own 504 (it drops sequences past their deadline at its next iteration).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from common import tracing
from common.logs import request_id_var
from common.protocol import EmbedItem, EmbedRequest, ItemError, Priority
from service.errors import DeadlineExceeded, Overloaded, ServiceError, Unavailable
from service.loop_lag import LoopLag
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings
from service.workers import WorkerGroup

log = logging.getLogger(__name__)

#: how long past its deadline an online caller waits for the worker's answer (its 504 comes at an iteration's end)
ANSWER_GRACE_S = 1.0
#: errors a batch call waits out: load and availability, never the request's own faults
_TRANSIENT = (Overloaded, Unavailable, DeadlineExceeded)


@dataclass(frozen=True)
class WorkItem:
    key: bytes  # identity: equal keys in flight are computed once
    item: EmbedItem  # steps resolved


@dataclass(frozen=True)
class ItemOutcome:
    vector: np.ndarray | None  # None when the worker rejected the item
    prompt_tokens: int
    truncated: bool
    error: ItemError | None
    steps: int = 0  # steps that ran (granted, for a step range)
    trajectory: np.ndarray | None = None  # [steps, D] when the item asked for it


#: keeps a call's answered inputs (the cache's write); they leave the in-flight table once it returns
Store = Callable[[list[EmbedItem], list["ItemOutcome"]], Awaitable[None]]


@dataclass
class Coalesced:
    outcomes: list[ItemOutcome]  # in the caller's order
    queue_s: float  # the longest time the caller's inputs waited in the gateway before the call that served them left
    compute_s: float  # from that call leaving to the caller's last input answered


@dataclass(eq=False)
class _Call:
    live: int  # its slots someone still waits for
    created_at: float
    priority: Priority
    sent_at: float | None = None  # when its last try left
    finished_at: float | None = None
    task: asyncio.Task | None = None
    stored: asyncio.Task | None = None  # the store of its answers


@dataclass(eq=False)
class _Slot:
    key: bytes
    call: _Call
    future: asyncio.Future
    table: dict[bytes, _Slot] = field(repr=False)  # the in-flight table of its priority
    waiters: int = 0
    active: bool = True  # in its table; False once answered or abandoned


def _mark_seen(future: asyncio.Future) -> None:
    """Every waiter may have left before a slot's exception was set: keep asyncio from warning."""
    if not future.cancelled():
        future.exception()


class Coalescer:
    """One per model, in front of its workers."""

    def __init__(
        self,
        model: str,
        workers: WorkerGroup,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        loop_lag: LoopLag,
        store: Store | None = None,
    ) -> None:
        self.model = model
        self.workers = workers
        self.metrics = metrics
        self._loop_lag = loop_lag
        self._max_lag_s = settings.max_loop_lag_s
        self._store = store
        self._stores: set[asyncio.Task] = set()
        self._max_items = settings.max_queued_items
        self._max_calls = settings.max_worker_calls
        self._slots: dict[Priority, dict[bytes, _Slot]] = {"online": {}, "batch": {}}
        self._calls: dict[Priority, set[asyncio.Task]] = {"online": set(), "batch": set()}

    @property
    def in_flight(self) -> int:
        """Distinct inputs in worker calls now."""
        return sum(len(table) for table in self._slots.values())

    async def aclose(self) -> None:
        """Cancel the calls in flight; let the stores of answered ones finish."""
        tasks = [task for calls in self._calls.values() for task in calls]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._stores, return_exceptions=True)

    async def embed(
        self, work: list[WorkItem], deadline: float | None, request_id: str, priority: Priority = "online"
    ) -> Coalesced:
        """Results for `work` in order; `deadline` is in loop time (None: batch priority, no deadline). Raises
        Overloaded, Unavailable, DeadlineExceeded, InvalidRequest (exceeds_deadline) or another ServiceError of the
        call (an online caller also those of a call it shares)."""
        loop = asyncio.get_running_loop()
        submitted = loop.time()
        table = self._slots[priority]
        fresh = [w for w in dict((w.key, w) for w in work).values() if w.key not in table]
        if fresh and priority == "online":
            if not self.workers.ready:
                raise self.workers.unavailable()
            self._admit(len(fresh))
        if fresh:
            self._start_call(fresh, deadline, request_id, priority, submitted)
        slots = [table[w.key] for w in work]
        for slot in slots:
            slot.waiters += 1
        try:
            timeout = None if deadline is None else max(deadline - loop.time(), 0) + ANSWER_GRACE_S
            _, pending = await asyncio.wait(
                {s.future for s in slots}, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
            )
        finally:
            for slot in slots:
                self._release(slot)
        failed = next((s.future.exception() for s in slots if s.future.done() and s.future.exception()), None)
        if failed is not None:
            raise failed
        if pending:
            raise DeadlineExceeded(f"model {self.model!r}: the request did not finish within its deadline")
        # A slot answered before this request came (kept until stored) counts as sent and done on arrival.
        sent = [max(s.call.sent_at or submitted, submitted) for s in slots]
        finished = [max(s.call.finished_at or submitted, submitted) for s in slots]
        tracing.record_span(
            "queue", submitted, max(sent), {"genembed.items": len(slots), "genembed.new_items": len(fresh)}
        )
        return Coalesced(
            outcomes=[s.future.result() for s in slots],
            queue_s=max(sent) - submitted,
            compute_s=max(finished) - min(sent),
        )

    def _admit(self, fresh: int) -> None:
        """Raise Overloaded when `fresh` more inputs in one more call would pass the gateway's own bounds (an idle
        model takes any request: the bound is on what is already in flight). Online work only: batch work is bounded
        by its caller, and must never crowd online requests out."""
        items, calls = len(self._slots["online"]), len(self._calls["online"])
        lag = self._loop_lag.seconds()
        if self._max_lag_s and lag > self._max_lag_s:
            why = f"the gateway runs {lag:.1f} s behind its requests, the bound is {self._max_lag_s:g} s"
        elif items and items + fresh > self._max_items:
            why = f"{items} inputs are in flight, the bound is {self._max_items}"
        elif calls >= self._max_calls:
            why = f"{calls} worker calls are in flight, the bound is {self._max_calls}"
        else:
            return
        retry_after = self.workers.retry_after()
        raise Overloaded(
            f"model {self.model!r} is overloaded ({why}); retry after {retry_after} s", retry_after=retry_after
        )

    def _start_call(
        self, work: list[WorkItem], deadline: float | None, request_id: str, priority: Priority, now: float
    ) -> None:
        loop = asyncio.get_running_loop()
        table = self._slots[priority]
        call = _Call(live=len(work), created_at=now, priority=priority)
        slots = []
        for w in work:
            future = loop.create_future()
            future.add_done_callback(_mark_seen)
            slot = _Slot(w.key, call, future, table)
            table[w.key] = slot
            slots.append(slot)
        self.metrics.queued_items.labels(self.model).set(self.in_flight)
        self.metrics.batch_items.labels(self.model).observe(len(work))
        request = EmbedRequest([w.item for w in work], request_id, priority=priority)
        context = contextvars.copy_context()  # the call's log lines carry the request's id
        context.run(request_id_var.set, request_id)
        call.task = asyncio.create_task(self._run_call(call, slots, request, deadline), context=context)
        self._calls[priority].add(call.task)
        call.task.add_done_callback(lambda task: self._call_done(call, slots, task), context=context)

    async def _run_call(self, call: _Call, slots: list[_Slot], request: EmbedRequest, deadline: float | None) -> str:
        """Resolve every slot of the call; returns the outcome label. A batch call waits out load and retries."""
        attributes = {"genembed.model": self.model, "genembed.items": len(slots), "genembed.priority": request.priority}
        try:
            with tracing.span("worker.call", kind="client", attributes=attributes):
                while True:
                    call.sent_at = asyncio.get_running_loop().time()
                    try:
                        response = await self.workers.embed(request, deadline)
                        call.finished_at = asyncio.get_running_loop().time()  # before any waiter wakes
                        break
                    except _TRANSIENT as exc:
                        if request.priority != "batch":
                            raise
                        log.info("model %s: a batch call of %d inputs waits: %s", self.model, len(slots), exc.message)
                        await asyncio.sleep(exc.retry_after or 1)
            if len(response.results) != len(slots):
                raise ServiceError(
                    f"the worker for model {self.model!r} answered {len(response.results)} of {len(slots)}"
                )
        except ServiceError as exc:
            for slot in slots:
                slot.future.set_exception(exc)
            return exc.code or "error"
        outcomes = []
        for item, result, output in zip(request.items, response.results, response.outputs(), strict=True):
            vector, trajectory = output if output is not None else (None, None)
            trajectory = trajectory if item.trajectory else None
            outcomes.append(
                ItemOutcome(vector, result.prompt_tokens, result.truncated, result.error, result.steps, trajectory)
            )
        if self._store is not None:
            call.stored = asyncio.create_task(self._store(request.items, outcomes))
            self._stores.add(call.stored)
            call.stored.add_done_callback(self._stores.discard)
        for slot, outcome in zip(slots, outcomes, strict=True):
            slot.future.set_result(outcome)
        return "ok"

    def _release(self, slot: _Slot) -> None:
        slot.waiters -= 1
        if slot.waiters > 0 or not slot.active or slot.future.done():
            return  # an answered slot leaves once stored (_call_done)
        self._retire(slot)  # abandoned: nobody waits for it any more
        slot.call.live -= 1
        if slot.call.live == 0 and slot.call.task is not None:
            slot.call.task.cancel()

    def _retire_all(self, slots: list[_Slot]) -> None:
        for slot in slots:
            if slot.active:
                self._retire(slot)

    def _retire(self, slot: _Slot) -> None:
        slot.active = False
        if slot.table.get(slot.key) is slot:
            del slot.table[slot.key]
        self.metrics.queued_items.labels(self.model).set(self.in_flight)

    def _call_done(self, call: _Call, slots: list[_Slot], task: asyncio.Task) -> None:
        """Runs however the call ended, even cancelled before it started: frees its slots and its place."""
        now = asyncio.get_running_loop().time()
        call.finished_at = call.finished_at or now
        self._calls[call.priority].discard(task)
        if task.cancelled():
            outcome = "cancelled"
        elif task.exception() is not None:
            outcome = "error"
            log.error("worker call for %s failed", self.model, exc_info=task.exception())
        else:
            outcome = task.result()
        for slot in slots:
            if not slot.future.done():
                slot.future.set_exception(ServiceError(f"the worker call for model {self.model!r} failed"))
        if call.stored is not None and not call.stored.done():
            call.stored.add_done_callback(lambda _: self._retire_all(slots))
        else:
            self._retire_all(slots)
        self.metrics.queue_seconds.labels(self.model).observe((call.sent_at or now) - call.created_at)
        self.metrics.worker_call_seconds.labels(self.model, outcome).observe(now - (call.sent_at or call.created_at))
