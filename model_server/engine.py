"""The step-level batching engine: scheduling only, the methods compute.

A single thread runs the loop. Every iteration is one forward pass over the next step of every
running sequence *and* the prefill of newly admitted ones (their prompts packed beside the decode
rows), so arrivals never stall the running batch. A sequence leaves as soon as its own K is
reached and waiting ones join at the next iteration, so requests with different step budgets
share every pass. Admission is bounded by a sequence cap
and token budgets; the waiting queue is bounded and refuses with `QueueFull` rather than growing.
A cancelled request's sequences are dropped at the next iteration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from model_server.methods import EngineMethod, Sequence
from model_server.metrics import WorkerMetrics
from model_server.prompts import PreparedInput

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the HTTP layer answers 429 with Retry-After."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has failed; the HTTP layer answers 503."""


@dataclass(frozen=True)
class EngineLimits:
    max_running_seqs: int = 64
    max_batch_tokens: int = 4096  # tokens in one forward pass (padded tokens for stateless methods)
    max_kv_tokens: int = 65536  # prompt + steps, summed over running sequences
    max_waiting_seqs: int = 1024


class Engine:
    def __init__(self, method: EngineMethod, limits: EngineLimits, metrics: WorkerMetrics) -> None:
        self.method = method
        self.limits = limits
        self.metrics = metrics
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == the sequence's slot in the method
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

    def submit(self, prepared: list[PreparedInput]) -> list[Future]:
        """Queue one request's inputs together (all or none); each future yields an `Embedded`."""
        seqs = [Sequence(p) for p in prepared]
        with self._cv:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            if len(self.waiting) + len(seqs) > self.limits.max_waiting_seqs:
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(self.waiting)} inputs are already waiting")
            self.waiting.extend(seqs)
            self.metrics.waiting.set(len(self.waiting))
            self._cv.notify()
        return [s.future for s in seqs]

    def pending_work(self) -> int:
        """Sequences waiting or running: what a router compares workers by."""
        return len(self.waiting) + len(self.running)

    # -- the loop (engine thread) ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.waiting and not self.running:
                    self._cv.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            try:
                self._drop_cancelled()
                self._run(self.running, admitted)
                self.running.extend(admitted)
                self._retire()
            except Exception as exc:  # a failed pass fails its sequences, never the engine
                log.exception("engine iteration failed")
                self.metrics.errors.inc()
                self._fail_all(admitted + self.running, exc)
        self._fail_all(list(self.waiting) + self.running, EngineStopped("the engine stopped"))

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences (FIFO) while the batch bounds allow; caller holds the lock.

        When nothing runs, the first one is taken even if it alone exceeds a budget, so an
        oversized input is served instead of blocking the queue.
        """
        limits, stateful, admitted = self.limits, self.method.stateful, []
        kv_tokens = sum(s.kv_tokens for s in self.running)
        prefill_tokens = widest = 0
        while self.waiting and len(self.running) + len(admitted) < limits.max_running_seqs:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            n = seq.prompt_tokens
            # A padded (stateless) batch pays for its widest row in every row; a packed one does not.
            cost = len(self.running) + prefill_tokens + n if stateful else max(widest, n) * (len(admitted) + 1)
            fits = cost <= limits.max_batch_tokens and (
                not stateful or kv_tokens + seq.kv_tokens <= limits.max_kv_tokens
            )
            if not fits and (admitted or self.running):
                break
            self.waiting.popleft()
            admitted.append(seq)
            prefill_tokens, widest, kv_tokens = prefill_tokens + n, max(widest, n), kv_tokens + seq.kv_tokens
        self.metrics.waiting.set(len(self.waiting))
        return admitted

    def _run(self, running: list[Sequence], admitted: list[Sequence]) -> None:
        if not running and not admitted:
            return
        started = time.perf_counter()
        self.method.step(running, admitted)
        phase = "mixed" if running and admitted else ("decode" if running else "prefill")
        self.metrics.steps.inc(len(running))
        self.metrics.forward_seconds.labels(phase).observe(time.perf_counter() - started)
        self.metrics.batch_seqs.labels(phase).observe(len(running) + len(admitted))
        self.metrics.batch_tokens.labels(phase).observe(len(running) + sum(s.prompt_tokens for s in admitted))

    def _retire(self) -> None:
        """Remove finished sequences (descending slots: each swap moves a still-running one)."""
        for slot in range(len(self.running) - 1, -1, -1):
            seq = self.running[slot]
            if seq.finished:
                self._remove(slot)
                self._resolve(seq, seq.result, None)
        self.metrics.running.set(len(self.running))

    def _drop_cancelled(self) -> None:
        for slot in range(len(self.running) - 1, -1, -1):
            if self.running[slot].cancelled:
                self._remove(slot)

    def _remove(self, slot: int) -> None:
        self.method.remove(slot)
        self.running[slot] = self.running[-1]
        self.running.pop()

    def _fail_all(self, seqs: list[Sequence], exc: BaseException) -> None:
        """Fail `seqs` (which include every running one) and empty the method's slots."""
        self.method.clear()
        self.running = []
        for seq in seqs:
            self._resolve(seq, None, exc)

    @staticmethod
    def _resolve(seq: Sequence, result, exc: BaseException | None) -> None:
        try:  # the client may have cancelled the future between our check and here
            if exc is None:
                seq.future.set_result(result)
            else:
                seq.future.set_exception(exc)
        except InvalidStateError:
            pass
