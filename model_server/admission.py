"""Admission where the work runs: what an engine iteration costs, when the queue drains, and whether a call fits.

Pure (numpy only: no torch, no threads, no clock): the engine feeds `CostModel` what each iteration did and how
long it took; serving builds a `Schedule` from a snapshot of the engine's queue and asks `decide` about a call.

**Cost model.** One engine iteration's wall time is modelled as

    seconds = c_iteration + c_decode × decode rows + c_prefill × prefill tokens
              + c_kv × KV positions read (the running sequences' lengths) + c_logits × logits rows

fitted by non-negative least squares over a window of recent iterations, with the largest residuals trimmed
(a GC pause or a neighbour's burst on shared cores is one slow iteration, not a slower device). The warm-up's
iterations are pinned as seed samples that stay in every fit: they span batch shapes (1 to 32 rows, prefill and
decode) that a window of steady-state iterations may not, so a coefficient the window cannot tell apart from
another (every iteration 64 decode rows and 64 logits rows) keeps what the calibration measured.

**Schedule (the approximation).** The engine admits FIFO into `slots` running slots; a sequence holds its slot
for one prefill iteration and then one iteration per decode step (o1: its thought plus EOS and `<emb>`), so a
queue is list-scheduled at iteration granularity: each waiting sequence starts in the first slot that frees.
That is exact for the engine's admission while slots are the binding bound. The token budgets are folded in
as bounds: slots never exceed what the KV budget holds for the queue's mean sequence, and a queue's iterations
are at least its prefill tokens over the per-iteration token budget. Every iteration until a horizon runs (the
list schedule leaves no idle slot while work waits), so the work done by then is summed per term from each
sequence's share of the schedule, and the cost model prices it. Batch sequences count only once running:
batch waits behind online work, so an online call is scheduled behind the running set and the online queue.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

#: the cost model's terms, in the order of `Load.vector()` and of its coefficients
TERMS = ("iteration", "decode_row", "prefill_token", "kv_position", "logits_row")


@dataclass(frozen=True)
class Load:
    """What some engine iterations did, summed: one observed iteration, or a schedule's work up to a horizon."""

    iterations: float = 0
    decode_rows: float = 0
    prefill_tokens: float = 0
    kv_read: float = 0  # KV positions the decode rows attended to
    logits_rows: float = 0

    def vector(self) -> np.ndarray:
        return np.array(
            [self.iterations, self.decode_rows, self.prefill_tokens, self.kv_read, self.logits_rows], np.float64
        )


class CostModel:
    """Seconds per iteration term, fitted online from the engine's own iterations (one writer: the engine thread;
    readers take `coefficients`, an array replaced whole at each refit, and `correction`, a float).

    The fit spans a window of hundreds of iterations, so it follows a change in the device's speed (a neighbour on
    shared cores starting or stopping, the event loop busy parsing a burst) only slowly. Estimates carry a
    `correction` for that: the median of the last `recent` iterations' measured over modelled seconds, so a
    neighbour's load shows within `recent` / 2 iterations and goes when it goes (never below 1: while the fit
    still remembers a slower spell, estimates keep it). It is learned from iterations, not from calls: a call's
    time also holds the iterations widened by calls admitted after it, which the queue it was admitted against
    could not know, and a correction learned from that made estimates on an idle burst 3x too long
    (docs/benchmarks.md, issue 22).

    Time an iteration spent waiting for its turn at CPUs shared with another worker (`threads.CpuTurns`) is kept
    out of both: the fit and the median see the pass's own time, the device's speed. The waits enter the
    correction as a share instead, the last `held` iterations' wall time over their time computing: turns are
    shared by time, so a worker waits once for a neighbour's second-long pass and then runs several passes
    unhindered, a pattern a median of ratios reads as no neighbour at all, and a fit that learned the waits kept
    refusing for its whole window once the neighbour had gone (docs/benchmarks.md, "Turns shared by time")."""

    def __init__(
        self, window: int = 512, trim: float = 0.1, refit_every: int = 16, recent: int = 16, held: int = 64
    ) -> None:
        self._window: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self._seed: list[tuple[np.ndarray, float]] = []
        self._trim = trim
        self._refit_every = refit_every
        self._since_fit = 0
        self._ratios: deque[float] = deque(maxlen=recent)
        self._held: deque[tuple[float, float]] = deque(maxlen=held)  # (wall seconds, seconds waiting for a turn)
        self._slower = 1.0  # the device part of the correction
        self.coefficients: np.ndarray | None = None
        self.correction = 1.0

    def observe(self, load: Load, seconds: float, waited_s: float = 0.0) -> None:
        """One iteration: it took `seconds` of wall time, `waited_s` of them waiting for its turn at the CPUs."""
        computing = seconds - waited_s
        modelled = self.seconds(load, corrected=False)
        if modelled:
            self._ratios.append(computing / modelled)
            # Never below 1: the fit's memory of a slower spell is what keeps a burst after a quiet spell from
            # being admitted on the quiet spell's speed (4 of 16 admitted calls answered 504 in CI's overload test).
            self._slower = max(1.0, float(np.median(np.array(self._ratios))))
        self._held.append((seconds, waited_s))
        wall = sum(s for s, _ in self._held)
        self.correction = self._slower * (wall / max(wall - sum(w for _, w in self._held), 1e-9))
        self._window.append((load.vector(), computing))
        self._since_fit += 1
        # refit at every sample while there are few, then every `refit_every` (a fit is ~1 ms of numpy)
        if self._since_fit >= self._refit_every or len(self._window) < 4 * self._refit_every:
            self.refit()

    def discard(self) -> None:
        """Forget the window (warm-up: the first pass pays for lazy initialisation, no later one does)."""
        self._window.clear()

    def pin(self) -> None:
        """Keep the window's samples in every later fit (warm-up: the calibration's batch shapes); the correction
        starts afresh from the fit they give."""
        self._seed = list(self._window)
        self.refit()
        self._ratios.clear()
        self._held.clear()
        self._slower = self.correction = 1.0

    def refit(self) -> None:
        self._since_fit = 0
        samples = self._seed + list(self._window)
        if len(samples) < len(TERMS):
            return
        x = np.stack([v for v, _ in samples])
        y = np.array([s for _, s in samples])
        coef = _trimmed_nnls(x, y, self._trim, len(self._seed))
        if coef.any():
            self.coefficients = coef

    def seconds(self, load: Load, corrected: bool = True) -> float | None:
        coef = self.coefficients
        if coef is None:
            return None
        return float(load.vector() @ coef) * (self.correction if corrected else 1.0)

    def price(self, iterations: np.ndarray, work: np.ndarray) -> np.ndarray:
        """Corrected seconds of many loads at once: `iterations` [n] and the other terms `work` [n, 4]."""
        coef = self.coefficients
        assert coef is not None
        return (iterations * coef[0] + work @ coef[1:]) * self.correction


def _trimmed_nnls(x: np.ndarray, y: np.ndarray, trim: float, pinned: int, rounds: int = 3) -> np.ndarray:
    """Non-negative least squares without the `trim` share of samples with the largest residuals: refitted a few
    times, each time trimming by the residuals of the fit before (the first fit is pulled by the outliers, so one
    round misses some of them). The first `pinned` samples (the calibration's) are never trimmed: they are few,
    and what they carry is the shapes the others may lack."""
    coef = _nnls(x, y)
    keep = max(len(TERMS), math.ceil((len(y) - pinned) * (1 - trim)))
    if keep < len(y) - pinned:
        for _ in range(rounds):
            kept = pinned + np.argsort(np.abs(x[pinned:] @ coef - y[pinned:]))[:keep]
            rows = np.concatenate([np.arange(pinned), kept])
            coef = _nnls(x[rows], y[rows])
    return coef


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact NNLS for a handful of terms: the unconstrained fit if it is non-negative, else the best non-negative
    fit over every subset of terms (the optimum is the plain least-squares fit on its own support). Columns are
    scaled to unit norm first (KV positions run to 1e5 per iteration, iterations to 1)."""
    scale = np.linalg.norm(x, axis=0)
    scale[scale == 0] = 1
    xs = x / scale
    full, *_ = np.linalg.lstsq(xs, y, rcond=None)
    if (full >= 0).all():
        return full / scale
    best, best_sse = np.zeros(x.shape[1]), float(y @ y)
    for size in range(1, x.shape[1]):
        for subset in itertools.combinations(range(x.shape[1]), size):
            cols = list(subset)
            solution, *_ = np.linalg.lstsq(xs[:, cols], y, rcond=None)
            if (solution < 0).any():
                continue
            sse = float(np.sum((xs[:, cols] @ solution - y) ** 2))
            if sse < best_sse:
                best, best_sse = np.zeros(x.shape[1]), sse
                best[cols] = solution
    return best / scale


@dataclass(frozen=True)
class Seqs:
    """Sequences as the schedule sees them (arrays, one entry each, in the order the engine takes them)."""

    prefill: np.ndarray  # prompt tokens still to prefill (0 once running)
    length: np.ndarray  # KV positions its next decode step attends to
    decode: np.ndarray  # decode iterations left
    due: np.ndarray  # when its call planned to be answered by (the caller's clock; inf: no deadline)

    @classmethod
    def of(cls, prefill: list[int], length: list[int], decode: list[int], due: list[float] | None = None) -> Seqs:
        return cls(
            np.asarray(prefill, np.int64),
            np.asarray(length, np.int64),
            np.asarray(decode, np.int64),
            np.full(len(decode), math.inf) if due is None else np.asarray(due, np.float64),
        )

    @classmethod
    def waiting(
        cls, prompts: list[int] | np.ndarray, decode: list[int] | np.ndarray, due: float | list[float] = math.inf
    ) -> Seqs:
        """Sequences not yet prefilled: their first decode step attends to the prompt and its own position."""
        prompts = np.asarray(prompts, np.int64)
        return cls(
            prompts,
            prompts + 1,
            np.asarray(decode, np.int64),
            np.broadcast_to(np.asarray(due, np.float64), prompts.shape),
        )

    def __len__(self) -> int:
        return len(self.decode)

    def occupancy(self) -> np.ndarray:
        """Iterations each holds a slot from now: its prefill (if still to come) and its decode steps."""
        return self.decode + (self.prefill > 0)

    def concat(self, other: Seqs) -> Seqs:
        return Seqs(
            np.concatenate([self.prefill, other.prefill]),
            np.concatenate([self.length, other.length]),
            np.concatenate([self.decode, other.decode]),
            np.concatenate([self.due, other.due]),
        )


EMPTY = Seqs.of([], [], [])


@dataclass(frozen=True)
class Capacity:
    """The engine's bounds, as the schedule uses them."""

    slots: int  # max running sequences
    batch_tokens: int  # tokens one iteration may prefill
    kv_tokens: int  # KV positions over the running set (stateful methods)
    stateful: bool = True

    def slots_for(self, seqs: Seqs) -> int:
        """Running slots a queue of `seqs` gets: the sequence cap, or fewer where the KV budget binds first."""
        if not self.stateful or not len(seqs):
            return self.slots
        mean_kv = float(np.mean(seqs.length + seqs.decode))
        return max(1, min(self.slots, int(self.kv_tokens // max(mean_kv, 1.0))))


@dataclass(frozen=True)
class Commitments:
    """What the scheduled sequences with a deadline were promised: per distinct finish iteration, the work done
    by then (decode rows, prefill tokens, KV read, logits rows) and the earliest `due` of those finishing then."""

    horizons: np.ndarray  # [H] iterations
    work: np.ndarray  # [H, 4]
    due: np.ndarray  # [H]


class Schedule:
    """A list schedule of a queue into running slots, at iteration granularity; `extend` appends sequences in
    the engine's order and returns the iteration at which the last of them finishes.

    Sequences appended later never move earlier ones (FIFO into the first free slot), but they do share their
    iterations: a call that joins a running batch makes every pass it is in longer. So admitting a call checks
    the sequences already promised an answer (`commitments`) as well as the call's own finish."""

    def __init__(self, running: Seqs, slots: int, batch_tokens: int) -> None:
        occupancy = running.occupancy().tolist()
        self._free = sorted(occupancy[:slots] + [0] * max(slots - len(occupancy), 0))
        self._seqs = running
        self._start = np.zeros(len(running), np.int64)
        self._finish = np.asarray(occupancy, np.int64)
        self._batch_tokens = batch_tokens
        self._prefill = 0
        self._commitments: Commitments | None = None
        self._cumulative: np.ndarray | None = None  # `_cumulative_work` of everything scheduled, until `extend`

    def copy(self) -> Schedule:
        twin = Schedule.__new__(Schedule)
        twin.__dict__.update(self.__dict__)
        twin._free = list(self._free)
        return twin

    def extend(self, seqs: Seqs) -> int:
        """Schedule `seqs` after everything so far; the iteration by which all of them are done."""
        starts, finishes = [], []
        free = self._free
        for occupancy in seqs.occupancy().tolist():
            start = free[0]
            heapq.heapreplace(free, start + occupancy)
            starts.append(start)
            finishes.append(start + occupancy)
        self._seqs = self._seqs.concat(seqs)
        self._start = np.concatenate([self._start, np.asarray(starts, np.int64)])
        self._finish = np.concatenate([self._finish, np.asarray(finishes, np.int64)])
        self._prefill += int(seqs.prefill.sum())
        self._commitments = self._cumulative = None
        # a queue needs at least its prefill tokens over the per-iteration budget
        return max(max(finishes, default=0), math.ceil(self._prefill / self._batch_tokens))

    @property
    def first_free(self) -> int:
        """The iteration at which a sequence appended now would start."""
        return self._free[0]

    @property
    def makespan(self) -> int:
        """Iterations until everything scheduled is done."""
        last = int(self._finish.max()) if len(self._finish) else 0
        return max(last, math.ceil(self._prefill / self._batch_tokens))

    def work(self, horizon: int) -> Load:
        """What the iterations before `horizon` do, summed over every scheduled sequence's share of them."""
        return Load(horizon, *self.work_at(np.array([horizon]))[0].tolist())

    def work_at(self, horizons: np.ndarray, last: int | None = None) -> np.ndarray:
        """[len(horizons), 4]: decode rows, prefill tokens, KV read and logits rows before each horizon, of every
        scheduled sequence (or of the `last` appended ones). Every sequence's table is kept until the next `extend`:
        each call decided against a queue reads it instead of walking the queue again."""
        s, start = self._seqs, self._start
        if last is None:
            if self._cumulative is None:
                self._cumulative = _cumulative_work(s, start, self.makespan)
            return self._cumulative[np.minimum(horizons, len(self._cumulative) - 1)]  # nothing runs after the makespan
        s = Seqs(*(a[len(a) - last :] for a in (s.prefill, s.length, s.decode, s.due)))
        start = start[len(start) - last :]
        return _cumulative_work(s, start, int(horizons.max(initial=0)))[horizons]

    def commitments(self) -> Commitments:
        if self._commitments is None:
            promised = np.isfinite(self._seqs.due)
            horizons, index = np.unique(self._finish[promised], return_inverse=True)
            due = np.full(len(horizons), math.inf)
            np.minimum.at(due, index, self._seqs.due[promised])
            self._commitments = Commitments(horizons, self.work_at(horizons), due)
        return self._commitments


def _cumulative_work(s: Seqs, start: np.ndarray, until: int) -> np.ndarray:
    """[until + 1, 4]: row T is the work of the iterations before T (decode rows, prefill tokens, KV read, logits
    rows), from per-iteration difference arrays: O(sequences + iterations), not their product.

    A sequence starting at iteration `start` prefills there (if it still has to), then decodes for `decode`
    iterations from `first`; its j-th decode step reads `length + j` KV positions, so an iteration t reads
    sum(length - first) + t * rows over the sequences decoding in it. Logits: the prefill's when a decode follows,
    every decode step's but the last one's."""
    prefills = s.prefill > 0
    first = start + prefills
    end = first + s.decode

    def per_iteration(at: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Sum of `weights` landing in each iteration 0..until-1 (later ones fall off the end)."""
        return np.bincount(np.minimum(at, until), weights=weights, minlength=until + 1)[:until]

    def running_total(begin: np.ndarray, stop: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Per iteration, the sum of `weights` over sequences with begin <= t < stop."""
        return np.cumsum(per_iteration(begin, weights) - per_iteration(stop, weights))

    ones = np.ones(len(start))
    rows = running_total(first, end, ones)
    kv = running_total(first, end, (s.length - first).astype(np.float64)) + np.arange(until) * rows
    prefill = per_iteration(start[prefills], s.prefill[prefills].astype(np.float64))
    decoding = s.decode > 0
    logits = per_iteration(start[prefills & decoding], ones[prefills & decoding]) + running_total(
        first[decoding], end[decoding] - 1, ones[decoding]
    )
    cumulative = np.zeros((until + 1, 4))
    cumulative[1:] = np.cumsum(np.stack([rows, prefill, kv, logits], axis=1), axis=0)
    return cumulative


@dataclass(frozen=True)
class Backlog:
    """A snapshot of the engine's queue: the running set (all priorities) and the waiting sequences by priority."""

    running: Seqs
    online: Seqs
    batch: Seqs

    def schedule(self, capacity: Capacity, include_batch: bool = False) -> Schedule:
        """The running set, then the online queue (then the batch queue): what a new online call waits behind."""
        queue = self.online.concat(self.batch) if include_batch else self.online
        schedule = Schedule(self.running, capacity.slots_for(self.running.concat(queue)), capacity.batch_tokens)
        schedule.extend(queue)
        return schedule


def drain_seconds(model: CostModel, schedule: Schedule) -> float:
    """Expected seconds until everything in `schedule` is done (0 without a fitted model)."""
    return model.seconds(schedule.work(schedule.makespan)) or 0.0


@dataclass(frozen=True)
class Call:
    """One /embed call's sequences, each with its step range (`lowest == highest` without one). `extra`: decode
    iterations a sequence runs beyond its K when K > 0 (o1: EOS and `<emb>` after the thought); `decodes`: whether
    K is decode iterations at all (False for one-pass methods and o1 documents, whose cost does not move with K).
    `deadline_s` counts from `received` (the caller's clock, as `now` in `decide`)."""

    prompts: np.ndarray
    lowest: np.ndarray
    highest: np.ndarray
    extra: np.ndarray
    decodes: np.ndarray
    inputs: int  # request inputs (an o1 input runs as one sequence per sampled thought)
    deadline_s: float | None = None
    priority: Literal["online", "batch"] = "online"
    received: float = 0.0

    @property
    def levels(self) -> int:
        """Grant levels above the lowest: 0 runs every range at its lowest, `levels` at its highest."""
        return int((self.highest - self.lowest).max()) if len(self.highest) else 0

    def steps(self, level: int) -> np.ndarray:
        """Each sequence's K at grant `level`: its range scaled to the level, rounded down."""
        span = self.highest - self.lowest
        if self.levels == 0:
            return self.highest
        return self.lowest + (span * level) // self.levels

    def due(self, policy: Policy) -> float:
        """When the call plans to be answered by: its deadline's share after it arrived (inf without one)."""
        return math.inf if self.deadline_s is None else self.received + self.deadline_s * policy.deadline_share

    def seqs(self, level: int, due: float = math.inf) -> Seqs:
        return self.seqs_at(self.steps(level), due)

    def seqs_at(self, steps: np.ndarray, due: float = math.inf) -> Seqs:
        """The call's sequences when each runs `steps[i]` steps."""
        return Seqs.waiting(self.prompts, np.where(self.decodes & (steps > 0), steps + self.extra, 0), due)


@dataclass(frozen=True)
class Policy:
    deadline_share: float = 0.7  # of a call's deadline, what its estimate may use (headroom for estimation error)
    max_retry_after_s: int = 30


Outcome = Literal["accepted", "refused", "never_fits"]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # granted K per sequence (accepted)
    expected_s: float | None = None  # expected seconds until the call is answered (accepted, with an estimate)
    retry_after_s: int = 0  # refused: when enough is expected to have drained
    detail: str = ""
    # refused: for about these seconds from the decision this worker would refuse a call at least as heavy
    # (as many sequences, steps and prompt tokens, no longer a deadline) sent later; `holds_for_any`: any call
    holds_s: float = 0.0
    holds_for_any: bool = False


def decide(model: CostModel, ahead: Schedule, idle: Schedule, call: Call, policy: Policy, now: float) -> Decision:
    """Admit `call` behind `ahead` (the running set and the online queue) at time `now`, or say why not.

    Batch calls and calls without a deadline are accepted at their highest steps (batch waits and the gateway
    bounds it; an online call without a deadline still gets its expected finish, which the model learns from).
    A call whose cheapest form (every range at its lowest) does not fit the deadline's share even on an `idle`
    worker never will: `never_fits`. One that fits idle but not behind the queue, or whose work would make a call
    already accepted miss the answer it was planned for, is `refused`, with a Retry-After of about when enough
    will have drained. A step range sheds as the queue fills, as the gateway did: every step while the wait ahead
    is under half of what the deadline allows, then linearly fewer down to the lowest at the limit, and never
    more than fits.
    """
    if call.priority == "batch" or model.coefficients is None:
        return Decision("accepted", call.steps(call.levels))
    due = call.due(policy)
    promised = ahead.commitments()
    promised_s = model.price(promised.horizons, promised.work)

    trials: dict[int, tuple[Load, float | None]] = {}

    def trial(level: int) -> tuple[Load, float | None]:
        """The work until the call is answered, and the seconds until the promises it would break are kept (None:
        it breaks none). The queue's share comes from its kept table; only the call's own sequences are walked."""
        if level not in trials:
            schedule = ahead.copy()
            seqs = call.seqs(level, due)
            horizon = schedule.extend(seqs)
            own = schedule.work_at(np.append(promised.horizons, horizon), last=len(seqs))
            # the call's own work inside the iterations that promised sequences wait for makes those longer
            added = model.price(np.zeros(len(promised.horizons)), own[:-1])
            broken = (added > 0) & (now + promised_s + added > promised.due)
            work = Load(horizon, *(ahead.work_at(np.array([horizon]))[0] + own[-1]).tolist())
            trials[level] = work, float((promised_s + added)[broken].max()) if broken.any() else None
        return trials[level]

    def accept(level: int) -> Decision:
        work = trial(level)[0]
        return Decision("accepted", call.steps(level), expected_s=model.seconds(work))

    if call.deadline_s is None:
        return accept(call.levels)
    allowed = call.deadline_s * policy.deadline_share
    # never fits: by the model alone, uncorrected (a correction learned in a busy spell is no reason to say never)
    alone = model.seconds(_extended(idle, call.seqs(0)), corrected=False) or 0.0
    if alone > allowed:
        return Decision("never_fits", detail=_never_fits(call, alone, allowed))
    remaining = due - now
    # the wait ahead only moves the step cap of a ranged call (and names the refusal's cause)
    cap = step_cap(drain_seconds(model, ahead), remaining, 0, call.levels) if call.levels else 0
    # the highest level <= cap that fits (both checks grow with the level): a bisection over the levels
    low, high = -1, cap
    while low < high:
        mid = (low + high + 1) // 2
        work, blocked_s = trial(mid)
        if (model.seconds(work) or 0.0) <= remaining and blocked_s is None:
            low = mid
        else:
            high = mid - 1
    if low < 0:
        work, blocked_s = trial(0)
        finish_s = model.seconds(work) or 0.0
        # A heavier call sent d seconds later meets the same queue, d seconds drained, with a deadline d later:
        # it is late while d < finish_s - remaining; a promise it would break is kept only after blocked_s.
        holds_s = max(finish_s - remaining, blocked_s or 0.0)
        retry = min(max(math.ceil(holds_s), 1), policy.max_retry_after_s)
        why = (
            f"would finish after the {remaining:.1f} s its deadline leaves"
            if finish_s > remaining
            else "would make calls already accepted miss their deadlines"
        )
        return Decision(
            "refused",
            retry_after_s=retry,
            detail=(
                f"the worker's queue is expected to take {drain_seconds(model, ahead):.1f} s; this call {why}; "
                f"retry after {retry} s"
            ),
            holds_s=holds_s,
        )
    return accept(low)


def soonest_seconds(model: CostModel, ahead: Schedule) -> float:
    """Seconds until any call appended to `ahead` could be answered at the soonest: its first sequence starts in
    the first slot that frees and takes an iteration there (0 without a fitted model). A lower bound of every
    `decide` estimate against the same queue, known before the call is tokenized."""
    return model.seconds(ahead.work(ahead.first_free + 1)) or 0.0


def refuse_unseen(soonest_s: float, deadline_s: float, received: float, policy: Policy, now: float) -> Decision | None:
    """A refusal decided before the call is even tokenized (None: it needs `decide`): when the queue ahead alone,
    `soonest_s` (`soonest_seconds`), outlasts what the deadline leaves, `decide` would refuse whatever the call
    holds, and at overload most calls are refused, so they should cost the worker the least. (A call that would
    never fit is told so once it meets a worker with room to say it: that needs its token counts.)"""
    remaining = received + deadline_s * policy.deadline_share - now
    if soonest_s <= remaining:
        return None
    retry = min(max(math.ceil(soonest_s - remaining), 1), policy.max_retry_after_s)
    return Decision(
        "refused",
        retry_after_s=retry,
        detail=(
            f"the worker's queue is expected to hold any new call for {soonest_s:.1f} s, more than the "
            f"{max(remaining, 0.0):.1f} s its deadline leaves; retry after {retry} s"
        ),
        holds_s=soonest_s - remaining,
        holds_for_any=True,
    )


def _extended(schedule: Schedule, seqs: Seqs) -> Load:
    """The work until `seqs`, appended to `schedule`, are done."""
    trial = schedule.copy()
    return trial.work(trial.extend(seqs))


def step_cap(wait_s: float, allowed_s: float, lowest: int, highest: int) -> int:
    """The most steps a ranged call may take with `wait_s` of work ahead: all of them up to half of what the
    deadline allows, then linearly fewer, down to `lowest` at the limit."""
    if allowed_s <= 0:
        return lowest
    headroom = min(max((allowed_s - wait_s) / (allowed_s / 2), 0.0), 1.0)
    return lowest + math.floor((highest - lowest) * headroom)


def _never_fits(call: Call, alone_s: float, allowed_s: float) -> str:
    lowest = int(call.lowest.max()) if len(call.lowest) else 0
    ranged = bool((call.highest > call.lowest).any())
    change = (
        "fewer inputs per request or a lower minimum of the step range"
        if ranged
        else (
            'fewer inputs per request, fewer refinement_steps, or a step range ({"min", "max"})'
            if lowest > 0
            else "fewer inputs per request"
        )
    )
    return (
        f"{call.inputs} inputs at {lowest} refinement steps need about {alone_s:.1f} s even on an idle worker, "
        f"more than the {allowed_s:.1f} s of the deadline this worker plans with; send {change}"
    )
