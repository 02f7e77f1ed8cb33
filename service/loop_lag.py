"""How late the gateway's event loop runs: a wait that no deadline and no worker sees.

A gateway short of CPU (cores shared with busy workers, or more requests than one process parses) falls behind
its own event loop: every request then waits its turn before its handler runs and again at each await, and that
wait is outside the request's deadline (it starts in the handler) and outside the workers' admission. In load
scenario (d) of docs/benchmarks.md a starved gateway answered requests 25 s after they came, while its own
request timer said 10 s at most. A sampler that sleeps `INTERVAL_S` and measures how late it wakes tells how far
behind the loop is; the coalescer refuses new online work while that passes `max_loop_lag_s` (a quick 429 costs a
fraction of an answered request, so the backlog drains instead of every answer coming late).
"""

from __future__ import annotations

import asyncio
import contextlib

from service.metrics import GatewayMetrics

#: how often the loop's lateness is sampled
INTERVAL_S = 0.1


class LoopLag:
    """The event loop's lateness, sampled by a task of its own (the gateway starts it with the app)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self._task: asyncio.Task | None = None
        self._last = 0.0  # the latest sample's lateness, seconds
        self._due: float | None = None  # loop time the pending sample is due (None: not sampling)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._due = due = asyncio.get_running_loop().time() + INTERVAL_S
            self._task = asyncio.create_task(self._sample(due), name="genembed-loop-lag")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._due = None

    def seconds(self) -> float:
        """How far behind the loop is now: the latest sample, or how overdue the next one is when that is more
        (a loop behind by many seconds takes that long to deliver the sample that would say so)."""
        if self._due is None:
            return self._last
        return max(self._last, asyncio.get_running_loop().time() - self._due)

    async def _sample(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(due - loop.time(), 0.0))
            now = loop.time()
            self._last = max(now - due, 0.0)
            self.metrics.loop_lag.set(self._last)
            self._due = due = now + INTERVAL_S
