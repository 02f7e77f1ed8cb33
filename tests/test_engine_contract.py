"""The engine's scheduling over the plain-data contract (model_server/sequence.py), driven by a fake method: no
model, no torch. The test lets the engine run one iteration at a time and reads what each `Iteration` said.

The engine decides an iteration before it calls `step`, so a test that submits between passes first waits until
the engine waits in `step` (`FakeMethod.wait_entered`): the pass it waits in was decided without the new work."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from model_server.engine import DeadlineExceeded, Engine, EngineLimits
from model_server.metrics import WorkerMetrics
from model_server.sequence import Embedded, Input, Iteration, IterationResult, SeqId

#: the fake method fails any pass in which an input with these token ids joins
POISON = [13, 13]


class FakeMethod:
    """Counts steps like gircse: a sequence of budget K finishes in its prefill when K = 0, else at its K-th decode
    step; its vector names its first token and its steps. Each `step` waits for the test to let it run."""

    stateful = True
    padded = False

    def __init__(self) -> None:
        self.running: dict[SeqId, list[int]] = {}  # id -> [first token, budget, steps done]
        self.log: list[Iteration] = []
        self.cleared = 0
        self.entered = 0  # `step` calls begun
        self._gate = threading.Semaphore(0)
        self._done = threading.Condition()
        self._free = False

    def step(self, iteration: Iteration) -> IterationResult:
        with self._done:
            self.entered += 1
            self._done.notify_all()
        if not self._free:
            self._gate.acquire()
        try:
            return self._step(iteration)
        finally:
            with self._done:
                self.log.append(iteration)
                self._done.notify_all()

    def _step(self, iteration: Iteration) -> IterationResult:
        for seq in iteration.leave:
            del self.running[seq]  # a KeyError fails the pass: the engine named one the method does not hold
        assert set(iteration.decode) == set(self.running), "every running sequence decodes in every pass"
        if any(j.input.token_ids == POISON for j in iteration.join):
            raise RuntimeError("poisoned input")
        finished = {}
        for seq in iteration.decode:
            state = self.running[seq]
            state[2] += 1
            if state[2] == state[1]:
                finished[seq] = self._embedded(*state)
        for j in iteration.join:
            state = [j.input.token_ids[0], j.input.steps, 0]
            if j.input.steps == 0:
                finished[j.id] = self._embedded(*state)
            else:
                self.running[j.id] = state
        for seq in finished:
            self.running.pop(seq, None)
        return IterationResult(finished)

    @staticmethod
    def _embedded(token: int, steps: int, done: int) -> Embedded:
        return Embedded(np.array([token, steps], np.float32), done)

    def clear(self) -> None:
        self.running.clear()
        self.cleared += 1

    def run(self, iterations: int) -> list[Iteration]:
        """Let `iterations` more passes run; the ones they were."""
        with self._done:
            start = len(self.log)
            self._gate.release(iterations)
            assert self._done.wait_for(lambda: len(self.log) >= start + iterations, timeout=30)
            return self.log[start:]

    def wait_entered(self, n: int) -> None:
        """Until the engine has begun its `n`-th pass (it waits for `run` inside it)."""
        with self._done:
            assert self._done.wait_for(lambda: self.entered >= n, timeout=30)

    def open(self) -> None:
        self._free = True
        self._gate.release(1000)


@pytest.fixture
def make_engine():
    engines: list[tuple[Engine, FakeMethod]] = []

    def make(**limits) -> tuple[Engine, FakeMethod]:
        method = FakeMethod()
        engine = Engine(method, EngineLimits(**limits), WorkerMetrics())
        engine.start()
        engines.append((engine, method))
        return engine, method

    yield make
    for engine, method in engines:
        method.open()
        engine.stop()


def _ids(iteration: Iteration) -> tuple[list[SeqId], list[SeqId], list[SeqId]]:
    return iteration.decode, [j.id for j in iteration.join], iteration.leave


def _result(future: Future) -> tuple[list[float], int]:
    embedded = future.result(timeout=30)
    return embedded.vector.tolist(), embedded.steps


def test_budgets_of_different_lengths_share_passes_and_each_leaves_at_its_own(make_engine):
    engine, method = make_engine()
    futures = engine.submit([Input([7], 0), Input([8], 2), Input([9], 4)])
    passes = method.run(5)
    a, b, c = _ids(passes[0])[1]
    assert [_ids(i) for i in passes] == [
        ([], [a, b, c], []),  # all three prefill together; K=0 is done at once
        ([b, c], [], []),
        ([b, c], [], []),  # b leaves here, after its 2nd step
        ([c], [], []),
        ([c], [], []),
    ]
    assert [_result(f) for f in futures] == [([7, 0], 0), ([8, 2], 2), ([9, 4], 4)]
    assert engine.pending_work() == 0 and not method.running


@pytest.mark.parametrize(("padded", "joined"), [(True, 2), (False, 8)])
def test_a_padded_pass_pays_for_its_widest_row_a_packed_one_for_its_tokens(make_engine, padded, joined):
    engine, method = make_engine(max_batch_tokens=2000)
    method.stateful, method.padded = False, padded  # a one-pass encoder: padded (HF forward) or packed
    futures = engine.submit([Input([1] * 1000, 0)] + [Input([2] * 100, 0)] * 7)
    first = method.run(1)[0]
    assert len(first.join) == joined  # padded: 2 rows of 1000; packed: 1000 + 7 x 100 tokens
    method.open()
    assert all(f.result(timeout=30).steps == 0 for f in futures)


def test_a_sequence_joins_the_running_batch_and_leaves_before_it(make_engine):
    engine, method = make_engine()
    first = engine.submit([Input([1], 5)])[0]
    (a,) = _ids(method.run(1)[0])[1]
    method.wait_entered(2)
    second = engine.submit([Input([2], 1)])[0]
    passes = method.run(3)
    b = _ids(passes[1])[1][0]
    assert [_ids(i) for i in passes] == [([a], [], []), ([a], [b], []), ([a, b], [], [])]
    assert _result(second) == ([2, 1], 1) and not first.done()
    method.run(2)
    assert _result(first) == ([1, 5], 5)


def test_cancelled_and_expired_sequences_free_their_slot_for_the_next_waiting(make_engine):
    engine, method = make_engine(max_running_seqs=1)
    cancelled = engine.submit([Input([1], 100)])[0]
    deadline = time.monotonic() + 1.5
    expiring = engine.submit([Input([2], 100)], deadline=deadline)[0]
    last = engine.submit([Input([3], 1)])[0]
    (a,) = _ids(method.run(2)[0])[1]  # the first one prefills and decodes; the others wait for its slot
    method.wait_entered(3)
    assert cancelled.cancel()
    passes = method.run(2)
    (b,) = _ids(passes[1])[1]
    assert [_ids(i) for i in passes] == [([a], [], []), ([], [b], [a])]  # it leaves, the next one takes its slot
    method.wait_entered(5)
    while time.monotonic() <= deadline:
        time.sleep(0.01)
    passes = method.run(2)
    (c,) = _ids(passes[1])[1]
    assert [_ids(i) for i in passes] == [([b], [], []), ([], [c], [b])]  # past its deadline: dropped likewise
    with pytest.raises(DeadlineExceeded):
        expiring.result(timeout=30)
    method.run(1)
    assert _result(last) == ([3, 1], 1)
    assert engine.pending_work() == 0 and not method.running


def test_online_work_joins_before_batch_work_that_came_first(make_engine):
    engine, method = make_engine(max_running_seqs=1)
    engine.submit([Input([1], 1)])  # holds the one slot
    method.wait_entered(1)
    batch = engine.submit([Input([2], 0)], priority="batch")[0]
    online = engine.submit([Input([3], 0)])[0]
    joins = [[j.input.token_ids[0] for j in i.join] for i in method.run(4)]
    assert joins == [[1], [], [3], [2]]
    assert _result(online) == ([3, 0], 0) and _result(batch) == ([2, 0], 0)


def test_a_failed_pass_fails_its_sequences_only(make_engine):
    engine, method = make_engine(max_running_seqs=2)
    failing = engine.submit([Input([1], 2), Input(POISON, 1)])
    waiting = engine.submit([Input([4], 1)])[0]
    method.run(1)
    for future in failing:
        with pytest.raises(RuntimeError, match="poisoned"):
            future.result(timeout=30)
    assert method.cleared == 1
    passes = method.run(2)
    (c,) = _ids(passes[0])[1]
    assert [_ids(i) for i in passes] == [([], [c], []), ([c], [], [])]
    assert _result(waiting) == ([4, 1], 1)
    assert engine.alive and engine.pending_work() == 0
