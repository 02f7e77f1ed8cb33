"""The worker's admission (model_server/admission.py), pure: the cost model's fit, the schedule, the decisions; and
one in-process worker (real minilm-l6 weights) for what a refusal costs it."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import numpy as np
import pytest

from common.protocol import EmbedItem, EmbedRequest, EmbedResponse
from model_server.admission import (
    EMPTY,
    TERMS,
    Backlog,
    Call,
    Capacity,
    CostModel,
    Decision,
    Load,
    Policy,
    Schedule,
    Seqs,
    decide,
    drain_seconds,
    refuse_unseen,
    soonest_seconds,
    step_cap,
)
from model_server.engine import EngineLimits
from model_server.loading import load_model
from model_server.serving import EmbeddingWorker, NotAdmitted
from model_server.specs import load_spec

TRUE = np.array([0.01, 0.002, 0.0001, 1e-6, 0.001])  # seconds per iteration, decode row, prefill token, KV, logits
CAPACITY = Capacity(slots=4, batch_tokens=4096, kv_tokens=65536)


def _random_iterations(rng: np.random.Generator, n: int) -> list[Load]:
    loads = []
    for _ in range(n):
        rows = int(rng.integers(0, 65))
        prefill = int(rng.integers(1, 2000)) if rng.random() < 0.3 or rows == 0 else 0
        loads.append(Load(1, rows, prefill, rows * int(rng.integers(10, 300)), int(rng.integers(0, rows + 1))))
    return loads


def _seconds(load: Load) -> float:
    return float(load.vector() @ TRUE)


def _model(coefficients: np.ndarray = TRUE) -> CostModel:
    model = CostModel()
    model.coefficients = coefficients
    return model


def test_the_fit_recovers_the_terms_from_noisy_iterations():
    rng = np.random.default_rng(0)
    model = CostModel()
    for load in _random_iterations(rng, 400):
        model.observe(load, _seconds(load) * (1 + 0.03 * rng.standard_normal()))
    assert model.coefficients is not None and (model.coefficients >= 0).all()
    # the terms that carry the time are recovered closely; every estimate of a fresh iteration is close
    np.testing.assert_allclose(model.coefficients[[1, 2, 4]], TRUE[[1, 2, 4]], rtol=0.1)
    for load in _random_iterations(rng, 50):
        assert model.seconds(load) == pytest.approx(_seconds(load), rel=0.15, abs=0.005)


def test_slow_outliers_are_trimmed():
    """A tenth of the iterations 10x slower (a GC pause, a neighbour's burst) barely moves the fit; a plain
    least-squares fit of the same samples is pulled far off."""
    rng = np.random.default_rng(1)
    model = CostModel()
    loads, seconds = _random_iterations(rng, 400), []
    for load in loads:
        s = _seconds(load) * (1 + 0.03 * rng.standard_normal()) * (10 if rng.random() < 0.08 else 1)
        seconds.append(s)
        model.observe(load, s)
    probe = Load(1, 64, 0, 64 * 150, 64)
    plain, *_ = np.linalg.lstsq(np.stack([load.vector() for load in loads[-512:]]), np.array(seconds), rcond=None)
    assert model.seconds(probe) == pytest.approx(_seconds(probe), rel=0.1)
    assert abs(float(probe.vector() @ plain) - _seconds(probe)) > 0.3 * _seconds(probe)


def test_a_term_that_costs_nothing_stays_at_zero_not_negative():
    rng = np.random.default_rng(2)
    truth = np.array([0.01, 0.002, 0.0001, 0.0, 0.001])
    model = CostModel()
    for load in _random_iterations(rng, 200):
        model.observe(load, float(load.vector() @ truth) * (1 + 0.03 * rng.standard_normal()))
    assert (model.coefficients >= 0).all()
    assert model.coefficients[TERMS.index("kv_position")] < 1e-7


def test_pinned_calibration_keeps_what_a_uniform_window_cannot_tell_apart():
    """Steady state: every iteration 64 decode rows and 64 logits rows, so the window alone cannot split the
    per-iteration cost from the per-row one; the pinned warm-up shapes (1 to 32 rows) still can."""
    model = CostModel(window=256)
    for rows in (1, 8, 32, 1, 8, 32, 1, 8, 32):
        for load in (Load(1, 0, rows * 12, 0, rows), Load(1, rows, 0, rows * 15, rows)):
            model.observe(load, _seconds(load))
    model.pin()
    steady = Load(1, 64, 0, 64 * 40, 64)
    for _ in range(256):
        model.observe(steady, _seconds(steady))
    one_row = Load(1, 1, 0, 40, 1)
    assert model.seconds(one_row) == pytest.approx(_seconds(one_row), rel=0.05)
    assert model.seconds(steady) == pytest.approx(_seconds(steady), rel=0.01)


def test_discard_forgets_the_lazy_first_pass():
    model = CostModel()
    model.observe(Load(1, 1, 10, 0, 1), 5.0)  # the first pass: lazy initialisation
    model.discard()
    for load in _random_iterations(np.random.default_rng(3), 40):
        model.observe(load, _seconds(load))
    model.pin()
    probe = Load(1, 1, 10, 11, 1)
    assert model.seconds(probe) == pytest.approx(_seconds(probe), rel=0.05)


def test_the_list_schedule_fills_the_first_free_slot():
    running = Seqs.of([0, 0], [10, 10], [3, 1])  # two running: 3 and 1 decode iterations left
    schedule = Schedule(running, slots=2, batch_tokens=4096)
    # waiting: 4 iterations each (prefill + 3 decodes): the first takes the slot freed at 1, the next the one at 3
    assert schedule.extend(Seqs.waiting([5], [3])) == 5
    assert schedule.extend(Seqs.waiting([5], [3])) == 7
    assert schedule.makespan == 7
    # a queue whose prefill exceeds the token budget needs an iteration per budget's worth
    assert Schedule(EMPTY, slots=64, batch_tokens=100).extend(Seqs.waiting([90] * 10, [0] * 10)) == 9


def test_the_work_up_to_a_horizon_counts_each_term():
    schedule = Schedule(EMPTY, slots=4, batch_tokens=4096)
    schedule.extend(Seqs.waiting([10], [3]))  # prefill, then decodes attending to 11, 12, 13 positions
    assert schedule.work(4) == Load(iterations=4, decode_rows=3, prefill_tokens=10, kv_read=36, logits_rows=3)
    # two iterations in: the prefill and one decode step
    assert schedule.work(2) == Load(iterations=2, decode_rows=1, prefill_tokens=10, kv_read=11, logits_rows=2)


def test_drain_prices_the_whole_schedule():
    backlog = Backlog(Seqs.of([0], [20], [2]), Seqs.waiting([10, 10], [3, 3]), Seqs.waiting([10] * 5, [3] * 5))
    schedule = backlog.schedule(CAPACITY)
    # the running one (2 left) and the two online ones (4 iterations each) in 4 slots: 4 iterations
    expected = Load(4, 2 + 6, 20, 20 + 21 + 2 * 36, 1 + 6)
    assert drain_seconds(_model(), schedule) == pytest.approx(_seconds(expected))
    # batch waiting counts only when asked for
    assert backlog.schedule(CAPACITY, include_batch=True).makespan > schedule.makespan


def _call(n: int, steps: int, deadline_s: float | None = 10.0, lowest: int | None = None, prompt: int = 20) -> Call:
    return Call(
        prompts=np.full(n, prompt),
        lowest=np.full(n, steps if lowest is None else lowest),
        highest=np.full(n, steps),
        extra=np.zeros(n, np.int64),
        decodes=np.ones(n, bool),
        inputs=n,
        deadline_s=deadline_s,
    )


def _idle(call: Call) -> Schedule:
    return Schedule(EMPTY, CAPACITY.slots_for(call.seqs(0)), CAPACITY.batch_tokens)


def _busy(waiting: int, steps: int) -> Schedule:
    return Backlog(EMPTY, Seqs.waiting([20] * waiting, [steps] * waiting), EMPTY).schedule(CAPACITY)


def _decide(ahead: Schedule, call: Call, policy: Policy | None = None) -> Decision:
    return decide(_model(), ahead, _idle(call), call, policy or Policy(), now=0.0)


def test_an_idle_worker_accepts_what_fits_and_expects_its_finish():
    call = _call(4, 5)
    decision = _decide(_idle(call), call)
    assert decision.outcome == "accepted" and decision.steps.tolist() == [5] * 4
    # 6 iterations: 4 rows prefilled, then 5 decode steps of 4 rows
    expected = Load(6, 20, 80, 4 * (5 * 21 + 10), 20)
    assert decision.expected_s == pytest.approx(_seconds(expected))


def test_a_call_that_cannot_fit_even_alone_never_fits():
    call = _call(64, 20, deadline_s=1.0)
    decision = _decide(_idle(call), call)
    assert decision.outcome == "never_fits"
    assert "64 inputs" in decision.detail and "fewer inputs per request" in decision.detail
    assert "step range" in decision.detail
    # a ranged call is told to lower its minimum
    ranged = _call(64, 20, deadline_s=1.0, lowest=10)
    assert "lower minimum" in _decide(_idle(ranged), ranged).detail


def test_a_call_that_fits_alone_but_not_behind_the_queue_is_refused_with_the_excess():
    call = _call(4, 5, deadline_s=2.0)
    ahead = _busy(400, 5)
    decision = _decide(ahead, call)
    assert decision.outcome == "refused"
    finish = _model().seconds(_extended(ahead, call.seqs(0)))
    assert decision.retry_after_s == min(int(np.ceil(finish - 2.0 * 0.7)), 30)
    assert "would finish after the 1.4 s its deadline leaves" in decision.detail
    assert _decide(ahead, call, Policy(max_retry_after_s=3)).retry_after_s == 3
    # without a deadline there is nothing to miss: accepted (the engine's bounds are the safety net)
    assert _decide(ahead, replace(call, deadline_s=None)).outcome == "accepted"


def _extended(schedule: Schedule, seqs: Seqs) -> Load:
    trial = schedule.copy()
    return trial.work(trial.extend(seqs))


def test_batch_calls_are_never_refused_and_run_their_highest_steps():
    call = replace(_call(64, 20, deadline_s=None, lowest=1), priority="batch")
    decision = _decide(_busy(400, 5), call)
    assert decision.outcome == "accepted" and decision.steps.tolist() == [20] * 64


def test_a_step_range_sheds_as_the_queue_fills_and_never_takes_more_than_fits():
    call = _call(4, 20, deadline_s=3.0, lowest=1)
    assert _decide(_idle(call), call).steps.tolist() == [20] * 4  # idle: every step
    granted = []
    for waiting in (8, 40, 56, 64):
        decision = _decide(_busy(waiting, 5), call)
        assert decision.outcome == "accepted"
        assert decision.expected_s <= 3.0 * 0.7
        granted.append(int(decision.steps[0]))
    assert granted == sorted(granted, reverse=True) and granted[0] > granted[-1] >= 1
    # one more step than granted would not have fitted, or the shedding curve capped it
    ahead = _busy(48, 5)
    k = int(_decide(ahead, call).steps[0])
    wait = drain_seconds(_model(), ahead)
    over = _model().seconds(_extended(ahead, Seqs.waiting([20] * 4, [k + 1] * 4)))
    assert over > 3.0 * 0.7 or k + 1 > step_cap(wait, 3.0 * 0.7, 1, 20)


def test_the_shedding_curve():
    assert step_cap(0.0, 10.0, 1, 21) == 21
    assert step_cap(5.0, 10.0, 1, 21) == 21  # all steps up to half of what the deadline allows
    assert step_cap(7.5, 10.0, 1, 21) == 11  # then linearly fewer
    assert step_cap(10.0, 10.0, 1, 21) == 1
    assert step_cap(12.0, 10.0, 1, 21) == 1


def test_one_pass_sequences_cost_the_same_at_any_step():
    """A one-pass method's K is not decode iterations (debater's deliberation tokens, o1 documents): its range
    is granted at the highest whenever the call fits at all."""
    call = replace(_call(4, 8, lowest=1), decodes=np.zeros(4, bool))
    assert call.seqs(0).decode.tolist() == call.seqs(call.levels).decode.tolist() == [0] * 4
    assert _decide(_busy(40, 5), call).steps.tolist() == [8] * 4


def test_the_kv_budget_bounds_the_slots():
    capacity = Capacity(slots=64, batch_tokens=4096, kv_tokens=1000)
    assert capacity.slots_for(Seqs.waiting([240] * 10, [9] * 10)) == 4
    assert (
        Capacity(slots=64, batch_tokens=4096, kv_tokens=1000, stateful=False).slots_for(
            Seqs.waiting([240] * 10, [0] * 10)
        )
        == 64
    )


def test_a_call_that_would_make_an_accepted_one_late_is_refused():
    """Sequences share iterations: a call whose long prompts join the passes an accepted call waits for makes
    that call later. It is refused when that would break the accepted call's plan, even though it would finish
    in time itself; the same queue without a promise to keep admits it."""
    model = _model()
    queued = Seqs.waiting([20] * 4, [5] * 4)
    finish = model.seconds(_extended(Schedule(EMPTY, 4, 4096), queued))
    heavy = _call(2, 1, deadline_s=30.0, prompt=400)
    promised = Backlog(EMPTY, Seqs.waiting([20] * 4, [5] * 4, due=finish + 0.05), EMPTY).schedule(
        Capacity(8, 4096, 65536)
    )
    decision = _decide(promised, heavy)
    assert decision.outcome == "refused" and "already accepted" in decision.detail
    assert decision.retry_after_s == int(np.ceil(finish + model.seconds(Load(0, 0, 800, 0, 2))))
    unpromised = Backlog(EMPTY, queued, EMPTY).schedule(Capacity(8, 4096, 65536))
    assert _decide(unpromised, heavy).outcome == "accepted"
    # work that starts after the promised sequences are done breaks nothing
    after = _busy(4, 5)
    assert _decide(after, _call(1, 1, deadline_s=30.0, prompt=400)).outcome == "accepted"


def test_a_refusal_says_how_long_it_holds_for_a_call_at_least_as_heavy():
    """A call sent d seconds later meets the queue d seconds drained with a deadline d later: as if it had d more
    seconds of deadline now. `holds_s` is the most such d that is still refused, so the gateway can answer calls
    covered by it without asking (service/workers.py, `Refusal`)."""
    ahead = _busy(400, 5)
    call = _call(4, 5, deadline_s=2.0)
    decision = _decide(ahead, call)
    assert decision.outcome == "refused" and not decision.holds_for_any
    finish = _model().seconds(_extended(ahead, call.seqs(0)))
    assert decision.holds_s == pytest.approx(finish - 2.0 * 0.7)

    def with_more_deadline(c: Call, seconds: float) -> Call:
        return replace(c, deadline_s=c.deadline_s + seconds / 0.7)

    assert _decide(ahead, with_more_deadline(call, decision.holds_s + 0.01)).outcome == "accepted"
    assert _decide(ahead, with_more_deadline(call, decision.holds_s - 0.01)).outcome == "refused"
    for heavier in (_call(5, 5, deadline_s=2.0), _call(4, 6, deadline_s=2.0), _call(4, 5, deadline_s=2.0, prompt=30)):
        assert _decide(ahead, with_more_deadline(heavier, decision.holds_s - 0.01)).outcome == "refused"


def test_a_refusal_for_a_promise_holds_until_that_promise_is_kept_whatever_the_deadline():
    model = _model()
    queued = Seqs.waiting([20] * 4, [5] * 4)
    finish = model.seconds(_extended(Schedule(EMPTY, 4, 4096), queued))
    promised = Backlog(EMPTY, Seqs.waiting([20] * 4, [5] * 4, due=finish + 0.05), EMPTY).schedule(
        Capacity(8, 4096, 65536)
    )
    heavy = _call(2, 1, deadline_s=30.0, prompt=400)
    decision = _decide(promised, heavy)
    assert decision.outcome == "refused" and "already accepted" in decision.detail
    # the promised calls' finish, later by the share of the call's work that joins their passes
    assert finish < decision.holds_s <= finish + model.seconds(_extended(_idle(heavy), heavy.seqs(0)))
    assert decision.retry_after_s == int(np.ceil(decision.holds_s))
    assert _decide(promised, replace(heavy, deadline_s=3000.0)).outcome == "refused"


def test_a_refusal_unseen_holds_for_any_call():
    model = _model()
    soonest = soonest_seconds(model, _busy(400, 5))
    refusal = refuse_unseen(soonest, 0.9 * soonest / 0.7, 0.0, Policy(), now=0.0)
    assert refusal is not None and refusal.holds_for_any
    assert refusal.holds_s == pytest.approx(0.1 * soonest)
    # a deadline longer by more than it holds is not refused unseen
    assert refuse_unseen(soonest, (0.9 * soonest + refusal.holds_s + 0.01) / 0.7, 0.0, Policy(), now=0.0) is None


def test_the_time_spent_before_the_decision_counts_against_the_deadline():
    call = replace(_call(4, 5, deadline_s=2.0), received=-1.35)  # arrived 1.35 s before `now`
    assert _decide(_idle(call), replace(call, received=0.0)).outcome == "accepted"
    decision = _decide(_idle(call), call)
    assert decision.outcome == "refused" and "its deadline leaves" in decision.detail


def test_the_work_by_each_horizon_matches_an_iteration_by_iteration_count():
    """The schedule's sums against walking its iterations one by one, on a random queue behind a running set."""
    rng = np.random.default_rng(4)
    running = Seqs.of([0] * 5, rng.integers(5, 50, 5).tolist(), rng.integers(1, 9, 5).tolist())
    waiting = Seqs.waiting(rng.integers(3, 60, 30), rng.integers(0, 12, 30))
    schedule = Schedule(running, slots=8, batch_tokens=10**6)
    schedule.extend(waiting)
    seqs = running.concat(waiting)
    starts = [0] * 5 + list(_list_schedule(running.occupancy().tolist(), waiting.occupancy().tolist(), 8))
    walked = np.zeros((schedule.makespan + 1, 4))
    for t in range(schedule.makespan):
        step = np.zeros(4)
        for i, begin in enumerate(starts):
            prefill, length, decode = int(seqs.prefill[i]), int(seqs.length[i]), int(seqs.decode[i])
            first = begin + (prefill > 0)
            if prefill and t == begin:
                step += [0, prefill, 0, decode > 0]
            if first <= t < first + decode:
                step += [1, 0, length + t - first, t < first + decode - 1]
        walked[t + 1] = walked[t] + step
    horizons = np.arange(schedule.makespan + 1)
    np.testing.assert_array_equal(schedule.work_at(horizons), walked)


def _list_schedule(running: list[int], waiting: list[int], slots: int) -> list[int]:
    """Start iterations of `waiting` in the first free of `slots`, the running ones holding theirs."""
    free = sorted(running + [0] * (slots - len(running)))
    starts = []
    for occupancy in waiting:
        begin = free.pop(0)
        starts.append(begin)
        free = sorted([*free, begin + occupancy])
    return starts


def _fitted(rng: np.random.Generator) -> CostModel:
    """A cost model fitted on iterations at the true cost, as after a quiet spell."""
    model = CostModel()
    for load in _random_iterations(rng, 300):
        model.observe(load, _seconds(load))
    return model


def test_the_correction_follows_a_step_change_in_iteration_time_and_returns_when_it_goes():
    rng = np.random.default_rng(1)
    model = _fitted(rng)
    probe = Load(10, 400, 800, 40000, 400)
    assert model.correction == pytest.approx(1.0, abs=0.01)
    # a neighbour starts on the shared cores: every iteration takes twice as long
    estimates = []
    for load in _random_iterations(rng, 16):
        model.observe(load, 2 * _seconds(load))
        estimates.append(model.seconds(probe) / _seconds(probe))
    assert estimates[6] < 1.5 < 1.9 < estimates[8]  # the median of the last 16 turns after half of them
    assert estimates[-1] == pytest.approx(2.0, rel=0.05)
    # it stops: the estimates come back as fast (whatever the fit kept of the slow spell)
    estimates = []
    for load in _random_iterations(rng, 16):
        model.observe(load, _seconds(load))
        estimates.append(model.seconds(probe) / _seconds(probe))
    assert estimates[-1] == pytest.approx(1.0, rel=0.05)
    assert model.seconds(probe, corrected=False) == pytest.approx(model.seconds(probe) / model.correction)


def test_waits_for_turns_enter_the_correction_as_a_share_and_leave_with_the_neighbour():
    """Turns shared by time: seven passes run unhindered, the eighth first waits while the neighbour runs as long as
    the eight computed. The estimates double (a median of per-iteration ratios would read 1), the fit keeps the
    device's own speed, and once the neighbour stops the estimates are back within the share's 64 iterations."""
    rng = np.random.default_rng(4)
    model = _fitted(rng)
    probe = Load(10, 400, 800, 40000, 400)
    computed: list[float] = []
    for i, load in enumerate(_random_iterations(rng, 128)):
        computed.append(_seconds(load))
        waited = sum(computed[-8:]) if i % 8 == 7 else 0.0
        model.observe(load, computed[-1] + waited, waited)
    assert model.seconds(probe) / _seconds(probe) == pytest.approx(2.0, rel=0.15)
    assert model.seconds(probe, corrected=False) == pytest.approx(_seconds(probe), rel=0.05)
    for load in _random_iterations(rng, 64):
        model.observe(load, _seconds(load), 0.0)
    assert model.seconds(probe) / _seconds(probe) == pytest.approx(1.0, rel=0.05)


def test_one_slow_iteration_does_not_move_the_correction():
    rng = np.random.default_rng(2)
    model = _fitted(rng)
    load = _random_iterations(rng, 1)[0]
    model.observe(load, 50 * _seconds(load))  # a GC pause
    assert model.correction == pytest.approx(1.0, abs=0.01)


def test_pinning_the_calibration_starts_the_correction_afresh():
    rng = np.random.default_rng(3)
    model = CostModel()
    for load in _random_iterations(rng, 40):
        model.observe(load, _seconds(load) * (3 if rng.random() < 0.5 else 1))
    model.pin()
    assert model.correction == 1.0


def test_admission_plans_with_the_correction_but_never_fits_only_by_the_model():
    model = _model()
    call = _call(4, 5)
    raw = decide(model, _idle(call), _idle(call), call, Policy(), now=0.0).expected_s
    model.correction = 1.5
    decision = decide(model, _idle(call), _idle(call), call, Policy(), now=0.0)
    assert decision.expected_s == pytest.approx(raw * 1.5)
    # a call that fits an idle worker by the model, but not with the correction, is refused for now, not for ever
    tight = replace(call, deadline_s=raw / 0.7 * 1.1)
    assert decide(model, _idle(call), _idle(call), tight, Policy(), now=0.0).outcome == "refused"


def test_soonest_is_a_lower_bound_of_every_estimate_against_the_same_queue():
    rng = np.random.default_rng(4)
    model = _model()
    for _ in range(30):
        ahead = _busy(int(rng.integers(0, 300)), int(rng.integers(0, 21)))
        call = _call(
            int(rng.integers(1, 17)), int(rng.integers(0, 21)), deadline_s=None, prompt=int(rng.integers(1, 60))
        )
        soonest = soonest_seconds(model, ahead)
        assert 0 < soonest <= decide(model, ahead, _idle(call), call, Policy(), now=0.0).expected_s


def test_a_call_the_queue_alone_makes_late_is_refused_unseen_as_decide_would():
    model = _model()
    ahead = _busy(400, 5)
    soonest = soonest_seconds(model, ahead)
    call = _call(1, 0, deadline_s=0.9 * soonest / 0.7)  # the cheapest call there is: one pooled sequence
    refusal = refuse_unseen(soonest, call.deadline_s, 0.0, Policy(), now=0.0)
    assert refusal is not None and refusal.outcome == "refused"
    assert decide(model, ahead, _idle(call), call, Policy(), now=0.0).outcome == "refused"
    assert refusal.retry_after_s == max(1, int(np.ceil(soonest - 0.9 * soonest)))
    assert "retry after" in refusal.detail
    # time already spent before the check counts; a deadline that leaves room goes on to `decide`
    assert refuse_unseen(soonest, 2 * soonest / 0.7, 0.0, Policy(), now=0.0) is None
    assert refuse_unseen(soonest, 2 * soonest / 0.7, 0.0, Policy(), now=1.5 * soonest) is not None


def test_a_call_without_a_deadline_is_accepted_with_its_expected_finish():
    call = _call(4, 5, deadline_s=None)
    decision = _decide(_busy(400, 5), call)
    assert decision.outcome == "accepted" and decision.steps.tolist() == [5] * 4
    assert decision.expected_s == pytest.approx(_model().seconds(_extended(_busy(400, 5), call.seqs(0))))


#: 3000 documents without a deadline (accepted): a backlog, and a long tokenization
_BACKLOG = EmbedRequest(
    items=[EmbedItem(text=f"document {i} about solar panels", input_type="document") for i in range(3000)]
)
#: a query that cannot wait for much of anything
_QUERY = EmbedRequest(items=[EmbedItem(text="a query", input_type="query")], deadline_s=0.05)


def _minilm_worker() -> EmbeddingWorker:
    """An in-process minilm-l6 worker with its engine running (the caller stops it)."""
    worker = EmbeddingWorker(load_model(load_spec("minilm-l6")), EngineLimits())
    worker.engine.start()
    return worker


async def _refusal(worker: EmbeddingWorker, request: EmbedRequest) -> NotAdmitted:
    with pytest.raises(NotAdmitted) as refused:
        await worker.embed(request)
    return refused.value


def test_a_call_refused_at_overload_is_not_tokenized():
    """At 4x most calls are refused; the worker refuses them from the queue alone, before paying for their prompts
    (which share the cores with the engine)."""
    worker = _minilm_worker()
    tokenized = []
    prepare = worker.method.prompts.prepare

    def counted(item: EmbedItem):
        tokenized.append(item)
        return prepare(item)

    async def scenario() -> NotAdmitted:
        await worker.warmup()
        backlog = asyncio.create_task(worker.embed(_BACKLOG))
        while worker.engine.pending_work() < 1000:
            await asyncio.sleep(0.01)
        worker.method.prompts.prepare = counted
        try:
            return await _refusal(worker, _QUERY)
        finally:
            worker.method.prompts.prepare = prepare
            await backlog

    try:
        refused = asyncio.run(scenario())
    finally:
        worker.stop()
    assert refused.decision.outcome == "refused" and refused.decision.retry_after_s >= 1
    assert tokenized == []
    unseen = {"outcome": "refused_unseen"}
    assert worker.metrics.registry.get_sample_value("genembed_worker_admission_decisions_total", unseen) == 1


def test_a_call_that_waited_for_its_turn_is_asked_again_and_refused_untokenized():
    """Calls are tokenized one at a time, in arrival order: a call that arrives while a large one is being tokenized
    passes the first check (the engine's queue is still empty), waits for its turn, and is checked again then; its
    deadline has gone meanwhile, so it is refused without being tokenized."""
    worker = _minilm_worker()
    prepare = worker.method.prompts.prepare
    tokenized: list[str | None] = []
    started = threading.Event()

    def counted(item: EmbedItem):
        tokenized.append(item.text)
        started.set()
        return prepare(item)

    async def scenario() -> NotAdmitted:
        await worker.warmup()
        worker.method.prompts.prepare = counted
        backlog = asyncio.create_task(worker.embed(_BACKLOG))
        await asyncio.to_thread(started.wait, 30)  # its tokenization has begun: it holds the turn
        try:
            return await _refusal(worker, _QUERY)
        finally:
            await backlog
            worker.method.prompts.prepare = prepare

    try:
        refused = asyncio.run(scenario())
    finally:
        worker.stop()
    assert refused.decision.outcome == "refused" and refused.decision.holds_for_any
    assert "a query" not in tokenized and len(tokenized) == 3000
    unseen = {"outcome": "refused_unseen"}
    assert worker.metrics.registry.get_sample_value("genembed_worker_admission_decisions_total", unseen) == 1


def test_concurrent_calls_from_one_event_loop_after_another_are_served():
    """In-process users (eval scripts, tests) drive a worker from one `asyncio.run` after another: calls that wait
    for their turn at the ingress thread in a second loop are served, not failed by the first loop's lock."""
    worker = _minilm_worker()
    texts = [f"passage {i} about tides" for i in range(3)]

    async def together() -> list[EmbedResponse]:
        return await asyncio.gather(*(worker.embed(EmbedRequest([EmbedItem(text=t)])) for t in texts))

    try:
        rounds = [asyncio.run(together()) for _ in range(2)]
    finally:
        worker.stop()
    for responses in rounds:
        assert [r.vectors.shape for r in responses] == [(1, worker.loaded.dimension)] * 3
    np.testing.assert_allclose(
        np.concatenate([r.vectors for r in rounds[0]]), np.concatenate([r.vectors for r in rounds[1]]), atol=1e-6
    )
