"""Workers as the gateway sees them: one client per worker address, grouped by model, and routing.

A `WorkerClient` is one worker: an aiohttp session, its /info, its state and its backlog. It is *ready* once /ready
and /info answered. A worker that answers with an error (loading, draining: /ready or /embed say 503) is
taken out of rotation while its in-flight calls run on; one that cannot be reached (refused, reset,
probe timeout) is marked down, and its in-flight calls are aborted at once (503) instead of being left to
hang until the deadline. The background probe takes either back when /ready answers.

A `WorkerGroup` is every worker of one model: fixed URLs, and `dns+http://NAME:PORT` names re-resolved
periodically (a Kubernetes headless Service resolves to every ready pod). Addresses that appear are
probed before they get work; addresses that vanish leave rotation at once and are closed once their calls
end.

Routing: admission is the worker's (its engine sees every gateway's work and its own speed); the gateway only picks
where to ask. Each worker reports its backlog, the seconds it expects to need for the work it holds, on every /embed
answer (`x-genembed-drain-s`, `x-genembed-queued-seqs`) and on `GET /load`, polled every `worker_load_interval_s`. A
call goes to the ready worker with the earliest expected finish: its last reported drain time, less the time since
that report, plus what this gateway has sent it since (sequences times the worker's drain seconds per online
sequence, from its last /load); ties go to the fewest inputs in flight, then the least recently chosen. A worker
that refuses (429) or fails (unreachable, 503, down mid-call) is followed by the next best one while the request's
deadline allows, each worker at most once; when every one refused, the caller gets the smallest `Retry-After` seen.
A worker's 429 says how long its decision holds for calls at least as heavy (`Refusal`): while it does, such calls
count as refused by that worker without being sent (`remember_refusals`), so overload does not cost the worker an
HTTP request, a parse and a decision per refused call, taken from the cores its engine computes on.
Embedding is idempotent, so a retry at worst repeats work. The worker's other answers are final: 400
`exceeds_deadline` (the call cannot fit its deadline even on an idle worker), 504 (dropped past its deadline), other
4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from common import tracing
from common.protocol import (
    DRAIN_HEADER,
    EXCEEDS_DEADLINE,
    REFUSAL_HOLDS_FOR_HEADER,
    REFUSAL_HOLDS_HEADER,
    REQUEST_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    EmbedRequest,
    EmbedResponse,
    ModelInfo,
)
from service.errors import DeadlineExceeded, InvalidRequest, ModelNotFound, Overloaded, ServiceError, Unavailable
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings

log = logging.getLogger(__name__)

DNS_PREFIX = "dns+"
Resolver = Callable[[str, int], Awaitable[list[str]]]
#: how long past a call's deadline its connection is kept open: the worker answers 504 at its next iteration
_ANSWER_GRACE_S = 5.0


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA records), in the resolver's order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def sequences(request: EmbedRequest) -> int:
    """Engine sequences a call holds: an o1 input with n samples is n."""
    return sum(item.samples or 1 for item in request.items)


@dataclass
class Backlog:
    """A worker's last report of the work it holds, and what this gateway has sent it since."""

    drain_s: float = 0.0  # expected seconds to finish the online work it held (running and waiting), as reported
    at: float = 0.0  # loop time of the report
    per_seq_s: float = 0.0  # drain seconds per online sequence, from the last /load that held any
    sent_seqs: int = 0  # sequences this gateway sent it since the report

    def report(self, drain_s: float, now: float, seqs: int | None = None) -> None:
        """`seqs`: the online sequences the drain time covers (GET /load says; an /embed answer's headers count
        batch work too, so they leave the per-sequence cost as it was)."""
        self.drain_s, self.at, self.sent_seqs = max(drain_s, 0.0), now, 0
        if seqs:
            self.per_seq_s = self.drain_s / seqs

    def expected_finish(self, now: float) -> float:
        """Seconds until the worker would be done with what it holds and what was sent since."""
        return max(self.drain_s - (now - self.at), 0.0) + self.sent_seqs * self.per_seq_s


@dataclass(frozen=True)
class Weight:
    """What a call asks of a worker in the terms its admission prices, as the gateway counts them untokenized."""

    sequences: int
    steps: int  # each sequence's fewest steps (a range's minimum), summed
    chars: int  # the prompts' characters: a stand-in for their tokens
    token_ids: int  # inputs sent as token ids, counted in tokens

    @classmethod
    def of(cls, request: EmbedRequest) -> Weight:
        sequences = steps = chars = token_ids = 0
        for item in request.items:
            n = item.samples or 1
            sequences += n
            steps += n * (item.min_steps if item.min_steps is not None else item.steps or 0)
            chars += len(item.text or "") + len(item.text_pair or "") + len(item.instruction or "")
            token_ids += len(item.token_ids or ())
        return cls(sequences, steps, chars, token_ids)

    def at_least(self, other: Weight) -> bool:
        return (
            self.sequences >= other.sequences
            and self.steps >= other.steps
            and self.chars >= other.chars
            and self.token_ids >= other.token_ids
        )


@dataclass(frozen=True)
class Refusal:
    """A worker's last refusal and how long it holds. The worker refused a call because it would finish past its
    deadline share, or break an earlier call's promise: a call at least as heavy sent d seconds later meets the
    same queue less d seconds of work (more, if others were admitted meanwhile) with a deadline d later, so it is
    refused while d is under the worker's `holds_s`; a longer deadline shortens that by the difference."""

    since: float  # loop time the refused call was sent: the decision came after it
    holds_s: float
    weight: Weight | None  # None: the worker's queue alone refuses any call
    deadline_s: float
    message: str
    drain_s: float  # the worker's drain time reported with the refusal

    def covers(self, weight: Weight, deadline_s: float | None, now: float) -> bool:
        """Whether the worker would refuse this call now by the same reasoning (until a call of its is answered:
        `WorkerClient` then forgets the refusal)."""
        if deadline_s is None or (self.weight is not None and not weight.at_least(self.weight)):
            return False
        return now - self.since + max(deadline_s - self.deadline_s, 0.0) < self.holds_s

    def caught_up(self, drain_s: float, at: float) -> bool:
        """Whether a drain time reported at `at` says the worker got through its queue faster than the refusal
        assumed (the queue less the time since): then its estimates were pessimistic, or nobody else was admitted.
        A gateway whose calls are all refused has no answer of its own to end a refusal by, so `GET /load` asks."""
        return at > self.since and drain_s + (at - self.since) < self.drain_s

    def overloaded(self, name: str, now: float) -> Overloaded:
        left = self.holds_s - (now - self.since)
        return Overloaded(
            f"the worker for model {name!r} refused a call at least as heavy {1000 * (now - self.since):.0f} ms "
            f"ago ({self.message})",
            retry_after=max(1, math.ceil(left)),
        )


@dataclass(frozen=True)
class Answer:
    """A worker's whole answer, read before its connection goes back to the pool."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def _closed_by_worker(exc: BaseException) -> bool:
    """Whether a request failed because it went out on a pooled connection the worker was closing: uvicorn drops idle
    connections after 5 s and the pool expires them at 4 s, but an event loop busy for over a second (a burst on a
    loaded machine) expires them late. Such a request is sent again once, on another connection, before the worker
    counts as down: one such failure used to take the worker out and abort every call in flight on it
    (docs/benchmarks.md, issue 22). A refused connection is not this: the worker is not listening."""
    if isinstance(exc, aiohttp.ClientConnectorError | TimeoutError):
        return False
    return isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | aiohttp.ClientPayloadError)


class WorkerClient:
    """One worker at one address."""

    def __init__(self, name: str, url: str, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.name = name  # the model clients send
        self.url = url
        self.info: ModelInfo | None = None
        self.outstanding = 0  # inputs in calls in flight: routing's tie-break
        self.last_chosen = 0  # routing's last tie-break
        self.backlog = Backlog()
        self.refusal: Refusal | None = None  # its last refusal while it may hold (`remember_refusals`)
        self.idle = asyncio.Event()  # set while nothing is in flight
        self.idle.set()
        self._remember_refusals = settings.remember_refusals
        self._metrics = metrics
        self._probe_timeout = aiohttp.ClientTimeout(total=settings.worker_probe_timeout_s)
        self._retry_after = math.ceil(settings.worker_probe_interval_s)
        self._has_load = True  # GET /load answers (a worker older than it does not)
        self._refused_token = False  # the last /info answered 401: logged once until the worker is ready
        # aiohttp, not httpx: httpcore's pool walks every connection (and for each idle one, all of them again) on
        # each request and release, and a call in flight holds a connection (HTTP/1.1), so at overload, with hundreds
        # computing, a quick refusal cost the gateway 4.5 ms of CPU against aiohttp's 0.06 ms
        # (loadtests/bench_http_client.py). Connections are bounded by the calls a model may have in flight, so a call
        # never waits in the pool behind others. Idle ones are dropped before uvicorn's own keep-alive timeout (5 s)
        # closes them; a call that still meets a closing one goes again once (`_closed_by_worker`).
        self._connections = settings.max_worker_calls
        self._headers = settings.worker_headers()
        self._session: aiohttp.ClientSession | None = None  # made on first use, inside the running loop
        self._accepting = False  # takes new calls
        self._down = asyncio.Event()  # set while unreachable; in-flight calls watch it
        self._down.set()

    @property
    def ready(self) -> bool:
        return self.info is not None and self._accepting and not self._down.is_set()

    def unavailable(self) -> Unavailable:
        return Unavailable(f"the worker for model {self.name!r} is unavailable", retry_after=self._retry_after)

    async def probe(self) -> None:
        """Check /ready; on the way back up, refetch /info (the revision may have changed)."""
        try:
            response = await self._request("GET", "/ready", self._probe_timeout)
            if response.status != 200:
                self.take_out(f"/ready answered {response.status}: {response.text[:200]}")
                return
            if not self.ready:
                response = await self._request("GET", "/info", self._probe_timeout)
                if response.status != 200:
                    self._info_refused(response)
                    return
                self.info = ModelInfo(**response.json())
                if self._down.is_set():
                    self._down = asyncio.Event()
                # Back in rotation: what it held before (a restart lost it) and what was sent to it while it failed
                # are not its queue; until its next report it counts as idle.
                self.backlog = Backlog()
                self.refusal = None
                self._accepting = True
                self._refused_token = False
                log.info("worker %s at %s ready: %s revision %s", self.name, self.url, self.info.id, self.info.revision)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.mark_down(f"probe failed: {exc!r}")
        except (ValueError, TypeError) as exc:
            self.take_out(f"/info failed: {exc!r}")

    def _info_refused(self, response: Answer) -> None:
        if response.status == 401 and not self._refused_token:  # once, not on every probe
            log.error(
                "worker %s at %s refuses this gateway's token (401): set the same GENEMBED_WORKER_TOKEN on both",
                self.name,
                self.url,
            )
        self._refused_token = response.status == 401
        self.take_out(f"/info answered {response.status}: {response.text[:200]}")

    async def poll_load(self) -> None:
        """Refresh the backlog from `GET /load` (cheap: the worker answers from its counters). Failures are the
        probe's business; a worker without the endpoint is asked no more."""
        if not self.ready or not self._has_load:
            return
        asked = asyncio.get_running_loop().time()
        try:
            response = await self._request("GET", "/load", self._probe_timeout)
        except (aiohttp.ClientError, TimeoutError):
            return
        if response.status == 404:
            self._has_load = False
            log.info("worker %s at %s has no /load: routing on its /embed answers only", self.name, self.url)
            return
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            if response.status == 200:
                load = response.json()  # {"drain_s", "queued_seqs" (all held), "running_seqs", "waiting": {...}}
                self._report(float(load["drain_s"]), int(load["running_seqs"]) + int(load["waiting"]["online"]))
                if self.refusal is not None and self.refusal.caught_up(self.backlog.drain_s, asked):
                    self.refusal = None

    def _report(self, drain_s: float, seqs: int | None = None) -> None:
        self.backlog.report(drain_s, asyncio.get_running_loop().time(), seqs)
        self._metrics.worker_drain_seconds.labels(self.name, self.url).set(self.backlog.drain_s)

    def _report_headers(self, headers: CIMultiDictProxy[str]) -> None:
        """The backlog every /embed answer carries (absent from an older worker: nothing changes)."""
        with contextlib.suppress(KeyError, ValueError):
            self._report(float(headers[DRAIN_HEADER]))

    async def _request(
        self,
        method: str,
        path: str,
        timeout: aiohttp.ClientTimeout,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request to the worker, sent again once if its connection turned out closed (`_closed_by_worker`): a
        worker that is really gone fails the second try too (an embedding call is safe to repeat). aiohttp already
        does that itself for a GET on a reused connection, not for a POST."""
        try:
            return await self._send(method, path, timeout, data, headers)
        except aiohttp.ClientError as exc:
            if method != "POST" or not _closed_by_worker(exc):
                raise
            return await self._send(method, path, timeout, data, headers)

    async def _send(
        self, method: str, path: str, timeout: aiohttp.ClientTimeout, data: bytes | None, headers: dict[str, str] | None
    ) -> Answer:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=4.0)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        async with self._session.request(
            method, self.url.rstrip("/") + path, data=data, headers=headers, timeout=timeout
        ) as r:
            return Answer(r.status, r.headers, await r.read())

    def take_out(self, reason: str) -> None:
        """No new calls; the ones in flight run on (a loading or draining worker finishes what it has)."""
        if self.ready:
            log.warning("worker %s at %s taken out of rotation: %s", self.name, self.url, reason)
        self._accepting = False

    def mark_down(self, reason: str) -> None:
        """Unreachable: no new calls, and the ones in flight are aborted."""
        if not self._down.is_set():
            log.warning("worker %s at %s is down: %s", self.name, self.url, reason)
            self._down.set()
        self._accepting = False

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """One /embed call. Raises a ServiceError for whole-call failures: Overloaded (the worker refused it now),
        Unavailable (the worker failed), InvalidRequest (it can never fit its deadline), DeadlineExceeded."""
        if self.refusal is not None and request.priority == "online":
            now = asyncio.get_running_loop().time()
            if self.refusal.covers(Weight.of(request), request.deadline_s, now):
                self._metrics.worker_calls.labels(self.name, self.url, "refused_remembered").inc()
                raise self.refusal.overloaded(self.name, now)
        items = len(request.items)
        self._in_flight(items)
        self.backlog.sent_seqs += sequences(request)
        outcome = "error"
        try:
            response = await self._embed(request)
            outcome = "ok"
            return response
        except ServiceError as exc:
            outcome = exc.code or "error"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._in_flight(-items)
            self._metrics.worker_calls.labels(self.name, self.url, outcome).inc()

    def _in_flight(self, items: int) -> None:
        self.outstanding += items
        self._metrics.worker_outstanding.labels(self.name, self.url).set(self.outstanding)
        if self.outstanding:
            self.idle.clear()
        else:
            self.idle.set()

    async def _embed(self, request: EmbedRequest) -> EmbedResponse:
        if not self.ready:
            raise self.unavailable()
        down = self._down
        headers = {"content-type": REQUEST_CONTENT_TYPE, REQUEST_ID_HEADER: request.request_id or ""}
        tracing.inject(headers)  # traceparent: the worker's spans join the trace of the calling span
        # The worker answers 504 once the deadline has passed; this bound only catches one that never answers.
        read = None if request.deadline_s is None else max(request.deadline_s, 0.0) + _ANSWER_GRACE_S
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=read)
        sent = asyncio.get_running_loop().time()
        post = self._request("POST", "/embed", timeout, data=request.encode(), headers=headers)
        call = asyncio.ensure_future(post)
        watch = asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not call.done():
                call.cancel()  # closes the connection: the worker cancels the work
                with contextlib.suppress(asyncio.CancelledError):
                    await call
        if call.cancelled():
            raise self.unavailable()
        try:
            response = call.result()
        except TimeoutError as exc:
            raise DeadlineExceeded(f"the worker for model {self.name!r} did not answer in time") from exc
        except aiohttp.ClientError as exc:
            self.mark_down(f"{exc!r}")
            raise self.unavailable() from exc
        self._report_headers(response.headers)
        if response.status == 200:
            # A call done: the queue the refusal saw has moved on, and the worker's estimates are pessimistic (its
            # correction never below 1, the deadline share's headroom), so the promise a refusal waited for is
            # often kept early; holding the refusal on past it refused calls the worker would have taken.
            self.refusal = None
            try:
                return EmbedResponse.decode(response.body)
            except (ValueError, KeyError, TypeError) as exc:
                raise ServiceError(f"the worker for model {self.name!r} sent a malformed response: {exc}") from exc
        detail, code = _detail(response)
        if response.status == 429:
            self._remember(request, response.headers, sent, detail)
            retry_after = response.headers.get("retry-after", "1")
            raise Overloaded(detail, retry_after=max(1, int(retry_after)) if retry_after.isdigit() else 1)
        if response.status == 503:
            self.take_out(f"/embed answered 503: {detail}")
            raise self.unavailable()
        if response.status == 400 and code == EXCEEDS_DEADLINE:
            raise InvalidRequest(detail, code=EXCEEDS_DEADLINE)
        if response.status == 504:
            raise DeadlineExceeded(detail)
        raise ServiceError(f"the worker for model {self.name!r} answered {response.status}: {detail}")

    def _remember(self, request: EmbedRequest, headers: CIMultiDictProxy[str], sent: float, detail: str) -> None:
        """Keep the refusal while it holds (only admission's refusals say so; not a full queue's)."""
        try:
            holds_s = float(headers.get(REFUSAL_HOLDS_HEADER, ""))
        except ValueError:
            return
        if not self._remember_refusals or request.deadline_s is None or not holds_s > 0:
            return
        weight = None if headers.get(REFUSAL_HOLDS_FOR_HEADER) == "any" else Weight.of(request)
        self.refusal = Refusal(sent, holds_s, weight, request.deadline_s, detail, self.backlog.drain_s)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        for series in (
            self._metrics.worker_outstanding,
            self._metrics.worker_calls,
            self._metrics.worker_drain_seconds,
        ):
            series.remove_by_labels({"model": self.name, "worker": self.url})


def _detail(response: Answer) -> tuple[str, str | None]:
    """A worker's error body, `{"detail", "code"}`, as (message, code); other bodies as their first 200 characters."""
    try:
        body = response.json()
        return str(body["detail"]), body.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:200], None


class WorkerGroup:
    """The workers of one model: what the coalescer, the embedder and the routes use."""

    def __init__(
        self,
        name: str,
        urls: list[str],
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        resolve: Resolver = resolve_addresses,
    ) -> None:
        """Raises ValueError on a dns+ URL without a name or port."""
        self.name = name
        self.members: dict[str, WorkerClient] = {}  # by URL
        self._settings = settings
        self._metrics = metrics
        self._resolve = resolve
        self._names: dict[str, set[str]] = {}  # dns+ URL -> the member URLs it resolved to
        self._leaving: set[asyncio.Task] = set()
        self._last_info: ModelInfo | None = None
        self._chosen = 0
        self._retry_after = math.ceil(settings.worker_probe_interval_s)
        self._retry_after_max = settings.retry_after_max_s
        for url in urls:
            if url.startswith(DNS_PREFIX):
                parts = urlsplit(url.removeprefix(DNS_PREFIX))
                if not parts.hostname or not parts.port:
                    raise ValueError(f"worker {name}={url}: expected dns+http://NAME:PORT")
                self._names[url] = set()
            else:
                self.members[url] = WorkerClient(name, url, settings, metrics)

    @property
    def has_dns(self) -> bool:
        return bool(self._names)

    @property
    def ready_count(self) -> int:
        return sum(w.ready for w in self.members.values())

    @property
    def ready(self) -> bool:
        return any(w.ready for w in self.members.values())

    @property
    def info(self) -> ModelInfo | None:
        """A ready worker's /info; while none is ready, the last one seen (cache hits still need it)."""
        for worker in self.members.values():
            if worker.ready and worker.info is not None:
                self._last_info = worker.info
                break
        return self._last_info

    def unavailable(self) -> Unavailable:
        return Unavailable(f"the worker for model {self.name!r} is unavailable", retry_after=self._retry_after)

    def retry_after(self) -> int:
        """Whole seconds until the least busy ready worker expects to have drained (at least 1, capped)."""
        now = asyncio.get_running_loop().time()
        finish = min((w.backlog.expected_finish(now) for w in self.members.values() if w.ready), default=1.0)
        return min(max(1, math.ceil(finish)), self._retry_after_max)

    def choose(self, exclude: Collection[WorkerClient] = ()) -> WorkerClient | None:
        """The ready worker with the earliest expected finish (ties: fewest inputs in flight, least recently chosen)."""
        ready = [w for w in self.members.values() if w.ready and w not in exclude]
        if not ready:
            return None
        now = asyncio.get_running_loop().time()
        worker = min(ready, key=lambda w: (w.backlog.expected_finish(now), w.outstanding, w.last_chosen))
        self._chosen += 1
        worker.last_chosen = self._chosen
        return worker

    async def embed(self, request: EmbedRequest, deadline: float | None) -> EmbedResponse:
        """One call, on the best worker and then on the next while they refuse or fail and the deadline (loop time;
        None: no deadline) allows. Every try carries the time then left to the deadline (`deadline_s`)."""
        loop = asyncio.get_running_loop()
        tried: list[WorkerClient] = []
        refusals: list[Overloaded] = []
        last: ServiceError | None = None
        while (worker := self.choose(exclude=tried)) is not None:
            left = None if deadline is None else deadline - loop.time()
            if last is not None:
                if left is not None and left <= 0:
                    break
                reason = "refused" if isinstance(last, Overloaded) else "failed"
                log.warning(
                    "model %s: a call of %d inputs %s on %s; trying %s",
                    self.name,
                    len(request.items),
                    reason,
                    tried[-1].url,
                    worker.url,
                )
                self._metrics.worker_retries.labels(self.name, reason).inc()
            tried.append(worker)
            try:
                return await worker.embed(dataclasses.replace(request, deadline_s=left))
            except Overloaded as exc:
                refusals.append(exc)
                last = exc
            except Unavailable as exc:
                last = exc
        if len(refusals) == 1:
            raise Overloaded(
                f"model {self.name!r} is overloaded: {refusals[0].message}", retry_after=refusals[0].retry_after
            )
        if refusals:
            retry_after = min(r.retry_after or 1 for r in refusals)
            raise Overloaded(
                f"model {self.name!r} is overloaded: {len(refusals)} workers refused the request; retry after "
                f"{retry_after} s (the first: {refusals[0].message})",
                retry_after=retry_after,
            )
        raise last or self.unavailable()

    async def probe(self) -> None:
        await asyncio.gather(*(w.probe() for w in list(self.members.values())))
        self._metrics.workers_ready.labels(self.name).set(self.ready_count)

    async def poll_load(self) -> None:
        await asyncio.gather(*(w.poll_load() for w in list(self.members.values())))

    async def resolve(self) -> None:
        """Re-resolve the dns+ names: new addresses join once probed, vanished ones are drained out.

        A name that fails to resolve keeps its members: a DNS hiccup must not empty the fleet (the probe
        still takes dead workers out).
        """
        for source, current in self._names.items():
            parts = urlsplit(source.removeprefix(DNS_PREFIX))
            try:
                addresses = await self._resolve(str(parts.hostname), int(parts.port or 0))
            except OSError as exc:
                log.warning("model %s: %s did not resolve (%r); keeping its workers", self.name, source, exc)
                continue
            wanted = {f"{parts.scheme}://{_host(a)}:{parts.port}" for a in addresses}
            joining = [WorkerClient(self.name, url, self._settings, self._metrics) for url in wanted - current]
            await asyncio.gather(*(w.probe() for w in joining))  # probed before they get work
            for worker in joining:
                log.info("model %s: worker %s joined (ready: %s)", self.name, worker.url, worker.ready)
                self.members[worker.url] = worker
            for url in current - wanted:
                self._drain_out(self.members.pop(url))
            self._names[source] = wanted
        self._metrics.workers_ready.labels(self.name).set(self.ready_count)

    def _drain_out(self, worker: WorkerClient) -> None:
        """A vanished address: out of rotation now, closed once its calls have ended."""
        log.info("model %s: worker %s left; %d inputs still in flight there", self.name, worker.url, worker.outstanding)
        worker.take_out("its address no longer resolves")

        async def close() -> None:
            await worker.idle.wait()
            await worker.aclose()

        task = asyncio.create_task(close())
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def aclose(self) -> None:
        for task in self._leaving:
            task.cancel()
        await asyncio.gather(*self._leaving, return_exceptions=True)
        await asyncio.gather(*(w.aclose() for w in self.members.values()))


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address  # IPv6 literals are bracketed in URLs


async def _every(interval: float, action: Callable[[], Awaitable[object]]) -> None:
    while True:
        await asyncio.sleep(interval)
        await action()


class WorkerPool:
    """The worker groups by the model name clients send; probes and re-resolves them in the background."""

    def __init__(
        self, settings: GatewaySettings, metrics: GatewayMetrics, resolve: Resolver = resolve_addresses
    ) -> None:
        """Raises ValueError on bad worker entries."""
        self.groups = {
            name: WorkerGroup(name, urls, settings, metrics, resolve) for name, urls in settings.worker_urls().items()
        }
        self._probe_interval = settings.worker_probe_interval_s
        self._load_interval = settings.worker_load_interval_s
        self._dns_interval = settings.worker_dns_interval_s
        self._tasks: list[asyncio.Task] = []

    def get(self, model: str) -> WorkerGroup:
        group = self.groups.get(model)
        if group is None:
            raise ModelNotFound(f"the model {model!r} does not exist; see GET /v1/models", param="model")
        return group

    @property
    def ready(self) -> bool:
        return all(g.ready for g in self.groups.values())

    async def probe(self) -> None:
        await asyncio.gather(*(g.probe() for g in self.groups.values()))

    async def poll_load(self) -> None:
        await asyncio.gather(*(g.poll_load() for g in self.groups.values()))

    async def resolve(self) -> None:
        await asyncio.gather(*(g.resolve() for g in self.groups.values() if g.has_dns))

    async def start(self) -> None:
        await self.resolve()
        await self.probe()
        self._tasks.append(asyncio.create_task(_every(self._probe_interval, self.probe)))
        self._tasks.append(asyncio.create_task(_every(self._load_interval, self.poll_load)))
        if any(g.has_dns for g in self.groups.values()):
            self._tasks.append(asyncio.create_task(_every(self._dns_interval, self.resolve)))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(g.aclose() for g in self.groups.values()))
