"""The batching engine on a tiny random Llama (fast): exactness under joins/leaves, bounds, cancellation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from common.protocol import EmbedItem, EmbedRequest
from model_server.engine import DeadlineExceeded, EngineLimits, QueueFull
from model_server.sequence import Input
from model_server.serving import EmbeddingWorker
from model_server.threads import CpuTurns
from tests.models import cosine, gircse_spec, make_tiny_llama, reference_gircse, start_worker


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-engine"), num_hidden_layers=3)


@pytest.fixture
def worker64(tiny_dir):
    worker = start_worker(gircse_spec(tiny_dir, dtype="float64"), max_running_seqs=8)
    yield worker
    worker.stop()


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 49000, size=n).tolist()


def _steps(worker) -> float:
    return worker.metrics.registry.get_sample_value("genembed_worker_refinement_steps_total") or 0.0


def _submit(worker, ids: list[int], steps: int):
    return worker.engine.submit([Input(ids, steps)])[0]


def test_mixed_lengths_and_budgets_equal_their_references(worker64):
    cases = [(_ids(n, seed), k) for seed, (n, k) in enumerate([(3, 7), (17, 0), (9, 1), (30, 4), (5, 12), (12, 2)])]
    futures = [_submit(worker64, ids, k) for ids, k in cases]
    model = worker64.loaded.model
    for future, (ids, k) in zip(futures, cases, strict=True):
        assert 1 - cosine(future.result(timeout=60).vector, reference_gircse(model, ids, k)) <= 1e-10


def test_join_while_running_and_leave_at_own_k(worker64):
    long_ids, short_ids = _ids(8, 1), _ids(4, 2)
    long = _submit(worker64, long_ids, 20)
    while _steps(worker64) < 3:  # the long one is decoding
        time.sleep(0.001)
    short = _submit(worker64, short_ids, 2)
    short_vector = short.result(timeout=60).vector
    assert not long.done(), "the short request joined the running batch and left at its own K"
    model = worker64.loaded.model
    assert 1 - cosine(short_vector, reference_gircse(model, short_ids, 2)) <= 1e-10
    assert 1 - cosine(long.result(timeout=60).vector, reference_gircse(model, long_ids, 20)) <= 1e-10


def test_more_sequences_than_slots_all_complete_exactly(worker64):
    cases = [(_ids(3 + seed % 7, seed), seed % 5) for seed in range(20)]  # 20 > max_running_seqs=8
    futures = [_submit(worker64, ids, k) for ids, k in cases]
    model = worker64.loaded.model
    for future, (ids, k) in zip(futures, cases, strict=True):
        assert 1 - cosine(future.result(timeout=120).vector, reference_gircse(model, ids, k)) <= 1e-10


def test_cancelled_request_stops_costing_steps(tiny_dir):
    worker = start_worker(gircse_spec(tiny_dir, max_refinement_steps=100000, max_input_tokens=64), max_running_seqs=4)
    try:
        future = _submit(worker, _ids(5, 3), 100000)
        while _steps(worker) < 5:
            time.sleep(0.001)
        assert future.cancel()
        time.sleep(0.2)
        settled = _steps(worker)
        time.sleep(0.3)
        assert _steps(worker) == settled, "steps kept running for a cancelled request"
        assert worker.engine.pending_work() == 0
        # and the engine still serves
        assert _submit(worker, _ids(4, 4), 2).result(timeout=30).vector is not None
    finally:
        worker.stop()


def test_queue_full_refuses_instead_of_growing(tiny_dir):
    worker = start_worker(gircse_spec(tiny_dir, max_refinement_steps=100000), max_running_seqs=1, max_waiting_seqs=2)
    try:
        busy = _submit(worker, _ids(4, 5), 100000)
        while worker.engine.pending_work() and worker.engine.waiting:
            time.sleep(0.001)
        waiting = [_submit(worker, _ids(4, 6), 1), _submit(worker, _ids(4, 7), 1)]
        with pytest.raises(QueueFull):
            _submit(worker, _ids(4, 8), 1)
        assert worker.metrics.registry.get_sample_value("genembed_worker_rejected_requests_total") == 1
        busy.cancel()
        for future in waiting:
            assert future.result(timeout=30).vector.shape == (32,)
    finally:
        worker.stop()


def test_client_cancellation_through_embed(tiny_dir):
    """Cancelling the embed() coroutine (what a disconnect does) cancels its sequences."""
    worker = start_worker(gircse_spec(tiny_dir, max_refinement_steps=100000, max_input_tokens=64))

    async def scenario() -> None:
        task = asyncio.create_task(worker.embed(EmbedRequest(items=[EmbedItem(text="abc", steps=100000)])))
        while _steps(worker) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)

    try:
        asyncio.run(scenario())
        assert worker.engine.pending_work() == 0
    finally:
        worker.stop()


def test_attention_kernels_serve_the_same_vector(tiny_dir):
    """genembed's CPU kernels (decode attention, RMSNorm and rotary, `runners/cpu_kernels`), torch's SDPA and its
    math kernel: the same vector."""
    ids = _ids(9, 11)
    vectors = []
    for attention, kernels in (("auto", "auto"), ("sdpa", "torch"), ("eager", "torch")):
        spec = gircse_spec(tiny_dir, dtype="float64", attn_implementation=attention, kernels=kernels)
        worker = start_worker(spec)
        try:
            assert (worker.method.runner.kernels is not None) == (kernels == "auto")
            vectors.append(_submit(worker, ids, 3).result(timeout=30).vector)
        finally:
            worker.stop()
    assert 1 - cosine(vectors[0], vectors[1]) <= 1e-12 and 1 - cosine(vectors[0], vectors[2]) <= 1e-12


def _dropped(worker) -> float:
    return worker.metrics.registry.get_sample_value("genembed_worker_deadline_dropped_sequences_total") or 0.0


def test_a_sequence_past_its_deadline_is_dropped_and_its_slot_reused(tiny_dir):
    """One slot: a sequence that would run 100000 steps is dropped at its deadline (running), one queued behind
    it is dropped at its own (waiting, never run), and the freed slot serves the next one."""
    worker = start_worker(gircse_spec(tiny_dir, max_refinement_steps=100000, max_input_tokens=64), max_running_seqs=1)
    try:
        now = time.monotonic()
        long = worker.engine.submit([Input(_ids(5, 3), 100000)], deadline=now + 0.6)[0]
        while _steps(worker) < 3:
            time.sleep(0.001)
        queued = worker.engine.submit([Input(_ids(4, 4), 2)], deadline=now + 0.3)[0]
        with pytest.raises(DeadlineExceeded):
            queued.result(timeout=30)
        assert not long.done(), "the waiting one was dropped at its deadline, not when the slot freed"
        with pytest.raises(DeadlineExceeded):
            long.result(timeout=30)
        assert _dropped(worker) == 2
        settled = _steps(worker)
        time.sleep(0.2)
        assert _steps(worker) == settled, "steps kept running past the deadline"
        assert worker.engine.pending_work() == 0
        assert _submit(worker, _ids(4, 5), 2).result(timeout=30).steps == 2
    finally:
        worker.stop()


def test_embed_answers_a_dropped_call_with_the_deadline_error(tiny_dir):
    worker = start_worker(gircse_spec(tiny_dir, max_refinement_steps=100000, max_input_tokens=64))
    try:
        request = EmbedRequest(items=[EmbedItem(text="abc", steps=100000)] * 2, deadline_s=0.3)
        with pytest.raises(DeadlineExceeded):
            asyncio.run(worker.embed(request))
        assert _dropped(worker) == 2 and worker.engine.pending_work() == 0
    finally:
        worker.stop()


def _running(worker) -> list[str]:
    return sorted(s.priority for s in list(worker.engine.running))


def test_batch_runs_in_what_online_leaves(tiny_dir):
    """Batch sequences hold at most batch_share of the slots; an online arrival takes a free slot at once and
    finishes while the batch runs on; a slot a batch sequence frees goes to waiting online work first."""
    spec = gircse_spec(tiny_dir, max_refinement_steps=100000, max_input_tokens=64)
    worker = start_worker(spec, max_running_seqs=4, max_kv_tokens=10**6, batch_share=0.5)
    try:
        batch = worker.engine.submit([Input(_ids(4, i), 100000) for i in range(6)], priority="batch")
        while len(worker.engine.running) < 2:
            time.sleep(0.001)
        time.sleep(0.1)
        assert _running(worker) == ["batch", "batch"] and len(worker.engine.waiting_batch) == 4
        assert _submit(worker, _ids(4, 10), 3).result(timeout=30).steps == 3
        assert not any(f.done() for f in batch)
        # three long online sequences: two take the free slots, one waits; a batch slot that frees goes to it
        online = [_submit(worker, _ids(4, 20 + i), 100000) for i in range(3)]
        while _running(worker) != ["batch", "batch", "online", "online"]:
            time.sleep(0.001)
        batch[0].cancel()
        while len(worker.engine.waiting):
            time.sleep(0.001)
        time.sleep(0.1)
        assert _running(worker) == ["batch", "online", "online", "online"]
        for future in batch + online:
            future.cancel()
    finally:
        worker.stop()


def _passes(worker) -> list[tuple[float, float]]:
    """Start and end of each of the worker's method passes from now on (the method's own step, timed around)."""
    spans: list[tuple[float, float]] = []
    step = worker.engine.method.step

    def timed(iteration):
        began = time.perf_counter()
        try:
            return step(iteration)
        finally:
            spans.append((began, time.perf_counter()))

    worker.engine.method.step = timed
    return spans


def _run_both(workers, inputs: int = 6, steps: int = 12) -> None:
    futures = [f for w in workers for f in w.engine.submit([Input(_ids(20, i), steps) for i in range(inputs)])]
    for future in futures:
        future.result(timeout=120)


def _overlaps(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> int:
    return sum(1 for s, e in a for s2, e2 in b if s < e2 and s2 < e)


@pytest.mark.parametrize("turns", [True, False])
def test_workers_given_one_turns_file_never_compute_at_once(tiny_dir, tmp_path, turns):
    """Two engines (as two workers on shared CPUs would be) with the same `cpu_turns` file: while one runs a pass
    the other waits, and the wait is counted. Without the file their passes overlap and no wait is counted (the
    checks can fail)."""
    spec = gircse_spec(tiny_dir, dtype="float32")
    path = str(tmp_path / "turns") if turns else None
    limits = EngineLimits(max_running_seqs=8)
    workers = [EmbeddingWorker.load(spec, limits, cpu_turns=path and CpuTurns(path)) for _ in range(2)]
    try:
        spans = [_passes(w) for w in workers]
        _run_both(workers)
    finally:
        for w in workers:
            w.stop()
    assert all(len(s) >= 12 for s in spans)  # every sequence decodes 12 steps: at least that many passes each
    waited = [w.metrics.registry.get_sample_value("genembed_worker_cpu_turn_wait_seconds_total") for w in workers]
    if turns:
        assert _overlaps(*spans) == 0
        assert sum(waited) > 0
    else:
        assert _overlaps(*spans) > 0
        assert waited == [0.0, 0.0]  # no turns, no wait counted
