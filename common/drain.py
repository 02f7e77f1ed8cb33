"""Graceful stop for either process (gateway and worker): drain, then exit.

uvicorn alone stops listening at once on SIGTERM (new connections are refused, readiness never goes false
first) and, past `timeout_graceful_shutdown`, cancels the requests still running, which drops their
connections without an answer. `DrainingServer` puts a drain in front of that: on the first SIGTERM/SIGINT
`/ready` answers 503 and every new request (probes and /metrics excepted) gets a 503 with `Retry-After`,
while the requests already accepted finish. When none is left, or after `grace_s`, uvicorn's own shutdown
runs. A request still running at the end of the grace is answered 503, never dropped. A second signal
stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from types import FrameType

import uvicorn
from prometheus_client import Gauge
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# What a draining process answers: a Response for the message (each process renders its own error shape).
Rejection = Callable[[str], Response]

# uvicorn's last wait, for connections that are idle by then (the drain already answered every request).
_SHUTDOWN_BACKSTOP_S = 5.0


class Drain:
    """Whether the process is draining, and the requests it still owes an answer."""

    def __init__(self, grace_s: float, in_flight_gauge: Gauge | None = None) -> None:
        self.grace_s = grace_s
        self._gauge = in_flight_gauge
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.expired = asyncio.Event()  # the grace is over: whatever still runs is answered 503

    def started(self) -> None:
        self.in_flight += 1
        self._idle.clear()
        if self._gauge is not None:
            self._gauge.inc()

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
        if self._gauge is not None:
            self._gauge.dec()

    async def run(self) -> None:
        """Stop taking work, then wait for what was accepted (at most `grace_s`)."""
        self.draining = True
        log.info("draining: %d requests in flight, up to %g s to finish", self.in_flight, self.grace_s)
        try:
            await asyncio.wait_for(self._idle.wait(), self.grace_s)
            log.info("drained: every accepted request was answered")
        except TimeoutError:
            log.warning("drain grace of %g s over: %d requests left get 503", self.grace_s, self.in_flight)
            self.expired.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), _SHUTDOWN_BACKSTOP_S)


class DrainMiddleware:
    """ASGI middleware: refuses new requests while draining, tracks the rest, answers them when the grace ends."""

    def __init__(self, app: ASGIApp, drain: Drain, reject: Rejection, exempt: Collection[str]) -> None:
        self.app = app
        self.drain = drain
        self.reject = reject
        self.exempt = exempt  # paths that keep answering (they report the drain themselves, or are probes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if drain.draining:
            await self.reject("the server is shutting down; retry (another replica) shortly")(scope, receive, send)
            return
        responded = False

        async def tracked_send(message: Message) -> None:
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        drain.started()
        try:
            work = asyncio.ensure_future(self.app(scope, receive, tracked_send))
            expired = asyncio.ensure_future(drain.expired.wait())
            try:
                await asyncio.wait({work, expired}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                expired.cancel()
                if not work.done():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
            if not work.cancelled():
                work.result()  # the app's own exceptions propagate as before
            elif not responded:
                message = f"the server shut down before this request finished (drain grace {drain.grace_s:g} s)"
                await self.reject(message)(scope, receive, send)
        finally:
            drain.finished()


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains `drain` before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        config.timeout_graceful_shutdown = config.timeout_graceful_shutdown or _SHUTDOWN_BACKSTOP_S
        super().__init__(config)
        self.drain = drain
        self._drain_requested = False
        self._draining: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        self._captured_signals.append(sig)  # uvicorn re-raises it after shutdown, as for its own handling

    async def on_tick(self, counter: int) -> bool:
        """Runs every 0.1 s on the server's loop: starts the drain a signal asked for, exits once it is done."""
        if self._drain_requested and self._draining is None:
            self._draining = asyncio.create_task(self.drain.run())
        if self._draining is not None and self._draining.done():
            self.should_exit = True
        return await super().on_tick(counter)
