"""How long a model's workers take for a piece of work: the cost model the coalescer admits requests by.

A *busy period* is time during which at least one worker call of the model is in flight. Its length is
modelled as

    seconds = per_call × calls + per_token × prompt tokens + per_step × refinement steps

(steps counted once per sequence: an input's K, times its o1 samples), fitted by non-negative least squares over
the most recent periods. Separating the per-call overhead is what keeps a light warm-up from poisoning the
estimate: one input alone is mostly overhead, and a plain "work per second" learned from it makes any later
burst look like minutes of work. The fit is used only once several periods of *batched* calls (more than one
input a call) are in the window. The workers' calibration is a second fit: each worker times a few batched
calls at warm-up and publishes them (`ModelInfo.calibration`), so a fresh gateway starts with an estimate; with
both, the larger estimate counts (see `seconds`). Without either, admission relies on its bounds alone.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Work:
    """Some inputs, as the cost model sees them."""

    calls: float
    items: int
    tokens: int
    steps: int

    def __add__(self, other: Work) -> Work:
        return Work(
            self.calls + other.calls, self.items + other.items, self.tokens + other.tokens, self.steps + other.steps
        )

    def __sub__(self, other: Work) -> Work:
        return Work(
            self.calls - other.calls, self.items - other.items, self.tokens - other.tokens, self.steps - other.steps
        )

    def features(self) -> np.ndarray:
        return np.array([self.calls, self.tokens, self.steps], dtype=np.float64)


NO_WORK = Work(0, 0, 0, 0)


class CostModel:
    """Seconds of worker time per call, token and step, learned from completed calls."""

    def __init__(self, window: int = 64, min_batched: int = 3, min_period_s: float = 0.2) -> None:
        self._periods: deque[tuple[Work, float]] = deque(maxlen=window)
        self._min_batched = min_batched
        self._min_period_s = min_period_s
        self._coef: np.ndarray | None = None  # fitted on this gateway's own periods
        self._prior: np.ndarray | None = None  # fitted on the workers' calibration
        # the busy period being measured
        self._in_flight = 0
        self._mark = 0.0
        self._busy_s = 0.0
        self._done = NO_WORK

    @property
    def coefficients(self) -> tuple[float, float, float] | None:
        """(seconds per call, per token, per step) of this gateway's own fit (else the prior), or None."""
        coef = self._coef if self._coef is not None else self._prior
        return None if coef is None else (float(coef[0]), float(coef[1]), float(coef[2]))

    def seconds(self, work: Work) -> float | None:
        """Estimated worker time for `work`, or None while nothing batched has been measured. With both a prior
        and an own fit, the larger of their estimates: busy periods attribute work to the period in which its call
        ended, so the own fit is noisy in how it splits calls, tokens and steps, and it underestimated bursts of a
        different mix than it was fitted on (measured: a burst of 256 mixed-K queries after single queries); the
        calibration ran calls one at a time, so it errs on the slow side."""
        estimates = [float(work.features() @ c) for c in (self._coef, self._prior) if c is not None]
        return max(estimates) if estimates else None

    def seed(self, periods: list[list[float]]) -> None:
        """A prior from periods measured elsewhere (a worker's timed warm-up calls: `ModelInfo.calibration`), kept
        apart from this gateway's own periods (warm-up ran alone, so its periods are not like theirs)."""
        measured = [
            (Work(calls, int(items), int(tokens), int(steps)), seconds)
            for calls, items, tokens, steps, seconds in periods
        ]
        self._prior = _fit(measured, self._min_batched)

    def call_started(self, now: float) -> None:
        if self._in_flight == 0:
            self._mark = now
        self._in_flight += 1

    def call_finished(self, now: float, work: Work | None) -> None:
        """`work` of a completed call; None for one that failed or was cancelled (its period is discarded)."""
        self._busy_s += now - self._mark
        self._mark = now
        self._in_flight -= 1
        if work is None:
            self._busy_s, self._done = 0.0, NO_WORK
            return
        self._done = self._done + work
        if self._busy_s >= self._min_period_s or (self._in_flight == 0 and self._busy_s > 0):
            self._periods.append((self._done, self._busy_s))
            self._busy_s, self._done = 0.0, NO_WORK
            fitted = _fit(list(self._periods), self._min_batched)
            if fitted is not None:
                self._coef = fitted


def _fit(periods: list[tuple[Work, float]], min_batched: int) -> np.ndarray | None:
    """Coefficients from `periods`, or None unless `min_batched` of them had several inputs a call."""
    if sum(1 for work, _ in periods if work.items > work.calls) < min_batched:
        return None
    x = np.stack([work.features() for work, _ in periods])
    coef = _nonnegative_least_squares(x, np.array([seconds for _, seconds in periods]))
    return coef if coef.any() else None


def _nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (three unknowns: drop the most negative and refit), with a light ridge
    so that collinear columns (tokens and steps move together when every request asks for the same K) stay finite."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        cols = x[:, active]
        ridge = np.diag(1e-3 * np.linalg.norm(cols, axis=0) + 1e-12)
        solution, *_ = np.linalg.lstsq(np.vstack([cols, ridge]), np.concatenate([y, np.zeros(len(active))]), rcond=None)
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    return coef


def calls_for(items: int, per_call: int) -> float:
    return math.ceil(items / per_call) if items else 0


def step_cap(wait_s: float | None, allowed_s: float, lowest: int, highest: int) -> int:
    """The most steps a ranged request may take with `wait_s` of work ahead: all of them up to half of what the
    deadline allows, then linearly fewer, down to `lowest` at the limit (no estimate: all of them)."""
    if wait_s is None:
        return highest
    headroom = min(max((allowed_s - wait_s) / (allowed_s / 2), 0.0), 1.0)
    return lowest + math.floor((highest - lowest) * headroom)
