"""The step-level batching engine: scheduling only, the methods compute.

The engine owns its sequences. Each iteration it hands the method plain data, an `Iteration` (who decodes, who
joins with what input, who left), and gets an `IterationResult` back (who finished, with what vector): see
model_server/sequence.py. The method keeps its own per-sequence state and KV slots by id.

A single thread runs the loop. Every iteration is one forward pass over the next step of every
running sequence *and* the prefill of newly admitted ones (their prompts packed beside the decode
rows), so arrivals never stall the running batch. A sequence leaves as soon as its own K is
reached and waiting ones join at the next iteration, so requests with different step budgets
share every pass. Admission is bounded by a sequence cap and token budgets; the waiting queue is
bounded and refuses with `QueueFull` rather than growing (a safety net: serving admits online calls
by their deadline first, see admission.py).

Two priorities: online sequences are always taken first; batch sequences join the running set only
while no online one waits, and never take more than `batch_share` of the slots and token budgets, so
an online arrival finds room at the next iteration instead of waiting behind batch work.
A cancelled request's sequences, and any sequence past its deadline, are dropped at the next
iteration (the latter answered with `DeadlineExceeded`). Every iteration is timed against what it
did (`admission.Load`), which fits the cost model admission estimates with.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from common.protocol import Priority
from model_server.admission import Backlog, CostModel, Load, Seqs
from model_server.metrics import WorkerMetrics
from model_server.sequence import Embedded, Input, Iteration, Joining, Method, Prepared, SeqId, as_input
from model_server.threads import CpuTurns

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the HTTP layer answers 429 with Retry-After."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has failed; the HTTP layer answers 503."""


class DeadlineExceeded(RuntimeError):
    """The sequence's deadline passed before it finished; it was dropped (the HTTP layer answers 504)."""


@dataclass(eq=False)
class Sequence:
    """One input in flight, as the engine schedules it: its work, its future, when it is due and how far it got.
    The method sees only its id and `input` (`sequence.Joining`)."""

    id: SeqId
    input: Input
    future: Future = field(default_factory=Future)
    deadline: float | None = None  # time.monotonic() after which nobody reads its answer: dropped, not run
    finish_by: float | None = None  # when admission planned its call to be answered by (admission.Seqs.due)
    priority: Priority = "online"  # batch runs only in the capacity online work leaves
    iterations: int = 0  # engine iterations it has run in (its prefill is the first)

    @property
    def prompt_tokens(self) -> int:
        return self.input.prompt_tokens

    @property
    def kv_tokens(self) -> int:
        return self.input.kv_tokens

    @property
    def decode_iterations(self) -> int:
        """Iterations after its prefill, for a method whose sequences live on (o1: the thought, EOS and `<emb>`)."""
        return self.input.steps + self.input.reserve if self.input.steps else 0

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


@dataclass(frozen=True)
class EngineLimits:
    max_running_seqs: int = 64
    max_batch_tokens: int = 4096  # tokens in one forward pass (padded tokens for stateless methods)
    max_kv_tokens: int = 65536  # prompt + steps, summed over running sequences
    max_waiting_seqs: int = 4096  # online sequences waiting: one request at the gateway's 2048-input cap fits
    batch_share: float = 0.75  # of the slots and token budgets, the most batch sequences may hold


class Engine:
    def __init__(
        self, method: Method, limits: EngineLimits, metrics: WorkerMetrics, turns: CpuTurns | None = None
    ) -> None:
        self.method = method
        self.limits = limits
        self.metrics = metrics
        self.turns = turns  # passes wait for their turn at CPUs shared with other workers (None: not shared)
        self.cost = CostModel()  # fed by the engine thread alone
        self.waiting: deque[Sequence] = deque()  # online
        self.waiting_batch: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._left: list[SeqId] = []  # running sequences dropped since the last iteration: the method frees them
        self._ids = itertools.count()
        self.version = 0  # changes whenever the queue does: a backlog snapshot's identity
        self._running_view = Seqs.of([], [], [])  # the running set as admission sees it, published per iteration
        self._next_expiry = math.inf  # the earliest deadline among waiting sequences
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="genembed-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    # -- submission (any thread) -------------------------------------------------------------------

    def submit(
        self,
        inputs: list[Prepared],
        deadline: float | None = None,
        priority: Priority = "online",
        finish_by: float | None = None,
    ) -> list[Future]:
        """Queue one request's inputs together (all or none); each future yields an `Embedded`, or raises
        `DeadlineExceeded` once `deadline` (time.monotonic()) passes before it is done. `finish_by`: when admission
        planned them to be done (later admissions keep to it). Batch calls are never refused: the gateway bounds
        how many it has in flight."""
        seqs = [
            Sequence(next(self._ids), as_input(i), deadline=deadline, priority=priority, finish_by=finish_by)
            for i in inputs
        ]
        with self._cv:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            queue = self.waiting if priority == "online" else self.waiting_batch
            if priority == "online" and len(queue) + len(seqs) > self.limits.max_waiting_seqs:
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(queue)} inputs are already waiting")
            queue.extend(seqs)
            if deadline is not None:
                self._next_expiry = min(self._next_expiry, deadline)
            self.version += 1
            self._count_waiting()
            self._cv.notify()
        return [s.future for s in seqs]

    def pending_work(self) -> int:
        """Sequences waiting or running: what a router compares workers by."""
        return len(self.waiting) + len(self.waiting_batch) + len(self.running)

    def backlog(self) -> tuple[Backlog, int]:
        """The queue as admission sees it, and its `version` (the snapshot is that version's)."""
        stateful = self.method.stateful
        with self._cv:
            online, batch = (
                Seqs.waiting(
                    [s.prompt_tokens for s in queue],
                    [s.decode_iterations if stateful else 0 for s in queue],
                    [_due(s) for s in queue],
                )
                for queue in (self.waiting, self.waiting_batch)
            )
            return Backlog(self._running_view, online, batch), self.version

    # -- the loop (engine thread) ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.waiting and not self.waiting_batch and not self.running:
                    self._cv.wait()
                if self._stopping:
                    break
                started = time.perf_counter()
                self._drop_expired_waiting()
                left = self._drop_gone()  # before admission: a freed slot is taken in this very iteration
                admitted = self._admit()
                self._publish(admitted)  # this iteration's work is in the backlog while it runs
            try:
                load, waited_s = self._run(admitted, left)
                if load is not None:
                    self.cost.observe(load, time.perf_counter() - started, waited_s)
            except Exception as exc:  # a failed pass fails its sequences, never the engine
                log.exception("engine iteration failed")
                self.metrics.errors.inc()
                self._fail_all(admitted + self.running, exc)
            with self._cv:
                self._publish([])
        self._fail_all(
            list(self.waiting) + list(self.waiting_batch) + self.running, EngineStopped("the engine stopped")
        )

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences (FIFO, online before batch) while the batch bounds allow; caller holds the lock.

        When nothing runs, the first one is taken even if it alone exceeds a budget, so an
        oversized input is served instead of blocking the queue. Batch sequences are taken only when no
        online one waits, within `batch_share` of each bound (counting the batch ones already running).
        """
        limits, stateful, padded, admitted = self.limits, self.method.stateful, self.method.padded, []
        kv_tokens = sum(s.kv_tokens for s in self.running)
        prefill_tokens = widest = 0
        batch_running = [s for s in self.running if s.priority == "batch"]
        batch_seqs, batch_kv, batch_tokens = len(batch_running), sum(s.kv_tokens for s in batch_running), 0
        share = limits.batch_share
        for queue in (self.waiting, self.waiting_batch):
            batch = queue is self.waiting_batch
            if batch and self.waiting:
                break  # online work waits: it goes first
            while queue and len(self.running) + len(admitted) < limits.max_running_seqs:
                seq = queue[0]
                if seq.cancelled:
                    queue.popleft()
                    continue
                n = seq.prompt_tokens
                # A padded batch pays for its widest row in every row; a packed one for its tokens.
                cost = max(widest, n) * (len(admitted) + 1) if padded else len(self.running) + prefill_tokens + n
                fits = cost <= limits.max_batch_tokens and (
                    not stateful or kv_tokens + seq.kv_tokens <= limits.max_kv_tokens
                )
                if batch:
                    fits = fits and (
                        batch_seqs + 1 <= max(1, math.floor(limits.max_running_seqs * share))
                        and batch_tokens + n <= limits.max_batch_tokens * share
                        and (not stateful or batch_kv + seq.kv_tokens <= limits.max_kv_tokens * share)
                    )
                if not fits and (admitted or self.running):
                    break
                queue.popleft()
                admitted.append(seq)
                prefill_tokens, widest, kv_tokens = prefill_tokens + n, max(widest, n), kv_tokens + seq.kv_tokens
                if batch:
                    batch_seqs, batch_kv, batch_tokens = batch_seqs + 1, batch_kv + seq.kv_tokens, batch_tokens + n
        self._count_waiting()
        return admitted

    def _run(self, admitted: list[Sequence], left: list[SeqId]) -> tuple[Load | None, float]:
        """One forward pass over the running sequences and `admitted` (after the method frees `left`); resolves
        the finished ones. What it did, for the cost model (None when there was nothing to run), and the seconds it
        waited for its turn at shared CPUs."""
        running = self.running
        if not running and not admitted and not left:
            return None, 0.0
        stateful = self.method.stateful
        kv_read = sum(s.prompt_tokens + s.iterations for s in running) if stateful else 0
        iteration = Iteration([s.id for s in running], [Joining(s.id, s.input) for s in admitted], left)
        waiting = time.perf_counter()
        with self.turns or contextlib.nullcontext():
            started = time.perf_counter()
            waited_s = started - waiting
            if self.turns is not None:
                self.metrics.cpu_turn_wait.inc(waited_s)
            finished = self.method.step(iteration).finished
        if not running and not admitted:
            return None, waited_s  # the method only freed the slots of dropped sequences
        stepped = running + admitted
        for seq in stepped:
            seq.iterations += 1
        phase = "mixed" if running and admitted else ("decode" if running else "prefill")
        prefill_tokens = sum(s.prompt_tokens for s in admitted)
        self.metrics.steps.inc(len(running))
        self.metrics.forward_seconds.labels(phase).observe(time.perf_counter() - started)
        self.metrics.batch_seqs.labels(phase).observe(len(stepped))
        self.metrics.batch_tokens.labels(phase).observe(len(running) + prefill_tokens)
        self.running = [s for s in stepped if s.id not in finished]
        for seq in stepped:
            if (embedded := finished.get(seq.id)) is not None:
                self._resolve(seq, embedded, None)
        # a sequence that goes on needed the logits of this pass (gircse's next soft token, o1's next token)
        logits = len(self.running) if stateful else 0
        return Load(1, len(running), prefill_tokens, kv_read, logits), waited_s

    def _drop_gone(self) -> list[SeqId]:
        """Drop running sequences that were cancelled or whose deadline passed; their ids (the method frees them).
        Caller holds the lock."""
        now = time.monotonic()
        gone = {
            s.id: s.cancelled for s in self.running if s.cancelled or (s.deadline is not None and s.deadline <= now)
        }
        if gone:
            expired = [s for s in self.running if s.id in gone and not gone[s.id]]
            self.running = [s for s in self.running if s.id not in gone]  # first: an answered caller may look
            self._expire(expired)
        return list(gone)

    def _drop_expired_waiting(self) -> None:
        """Drop waiting sequences past their deadline (a sweep only once the earliest deadline has passed);
        caller holds the lock."""
        now = time.monotonic()
        if now < self._next_expiry:
            return
        expired: list[Sequence] = []
        for queue in (self.waiting, self.waiting_batch):
            kept = [s for s in queue if s.deadline is None or s.deadline > now]
            if len(kept) < len(queue):
                expired.extend(s for s in queue if s.deadline is not None and s.deadline <= now)
                queue.clear()
                queue.extend(kept)
        self._next_expiry = min(
            (s.deadline for q in (self.waiting, self.waiting_batch) for s in q if s.deadline is not None),
            default=math.inf,
        )
        self._expire(expired)

    def _expire(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            self.metrics.deadline_dropped.inc()
            self._resolve(seq, None, DeadlineExceeded("the request's deadline passed before it was done"))

    def _publish(self, admitted: list[Sequence]) -> None:
        """The running set for admission (other threads read it: replaced whole), `admitted` still to prefill, and
        a new queue version; caller holds the lock."""
        stateful = self.method.stateful
        running = self.running
        self._running_view = Seqs.of(
            [0] * len(running) + [s.prompt_tokens for s in admitted],
            [s.prompt_tokens + s.iterations for s in running] + [s.prompt_tokens + 1 for s in admitted],
            [s.decode_iterations - s.iterations + 1 if stateful else 0 for s in running]
            + [s.decode_iterations if stateful else 0 for s in admitted],
            [_due(s) for s in running] + [_due(s) for s in admitted],
        )
        self.version += 1
        self.metrics.running.set(len(running) + len(admitted))

    def _count_waiting(self) -> None:
        self.metrics.waiting.set(len(self.waiting) + len(self.waiting_batch))
        self.metrics.queued.labels("online").set(len(self.waiting))
        self.metrics.queued.labels("batch").set(len(self.waiting_batch))

    def _fail_all(self, seqs: list[Sequence], exc: BaseException) -> None:
        """Fail `seqs` (which include every running one); the method forgets all it holds."""
        self.method.clear()
        self.running = []
        for seq in seqs:
            self._resolve(seq, None, exc)

    @staticmethod
    def _resolve(seq: Sequence, result: Embedded | None, exc: BaseException | None) -> None:
        try:  # the client may have cancelled the future between our check and here
            if exc is None:
                seq.future.set_result(result)
            else:
                seq.future.set_exception(exc)
        except InvalidStateError:
            pass


def _due(seq: Sequence) -> float:
    return math.inf if seq.finish_by is None else seq.finish_by
