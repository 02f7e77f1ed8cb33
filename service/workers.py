"""Workers as the gateway sees them: one client per worker address, grouped by model.

A `WorkerClient` is one worker: an httpx client, its /info and its state. It is *ready* once /ready and
/info answered. A worker that answers with an error (loading, draining: /ready or /embed say 503) is
taken out of rotation while its in-flight calls run on; one that cannot be reached (refused, reset,
probe timeout) is marked down, and its in-flight calls are aborted at once (503) instead of being left to
hang until the deadline. The background probe takes either back when /ready answers.

A `WorkerGroup` is every worker of one model: fixed URLs, and `dns+http://NAME:PORT` names re-resolved
periodically (a Kubernetes headless Service resolves to every ready pod). Addresses that appear are
probed before they get work; addresses that vanish leave rotation at once and are closed once their calls
end. Each call goes to the ready worker with the fewest inputs in flight (ties: the least recently chosen).
A call that fails because its worker failed (unreachable, 503, down mid-call) is retried once on another
ready worker while the request's deadline allows: embedding is idempotent, so a retry at worst repeats
work. 4xx, 429 and timeouts are never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

from model_server import tracing
from model_server.protocol import (
    REQUEST_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    EmbedRequest,
    EmbedResponse,
    ModelInfo,
)
from service.errors import DeadlineExceeded, ModelNotFound, Overloaded, ServiceError, Unavailable
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings

log = logging.getLogger(__name__)

DNS_PREFIX = "dns+"
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA records), in the resolver's order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class WorkerClient:
    """One worker at one address."""

    def __init__(self, name: str, url: str, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.name = name  # the model clients send
        self.url = url
        self.info: ModelInfo | None = None
        self.outstanding = 0  # inputs in calls in flight: what routing compares
        self.last_chosen = 0  # routing tie-break
        self.idle = asyncio.Event()  # set while nothing is in flight
        self.idle.set()
        self._metrics = metrics
        self._probe_timeout = settings.worker_probe_timeout_s
        self._retry_after = math.ceil(settings.worker_probe_interval_s)
        # Callers time out on their own deadline; this bound only catches a worker that never answers.
        timeout = httpx.Timeout(settings.request_timeout_s + 5, connect=2.0)
        limits = httpx.Limits(max_connections=settings.max_concurrent_calls + 4, keepalive_expiry=30)
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=settings.worker_headers())
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
            response = await self._http.get("/ready", timeout=self._probe_timeout)
            if response.status_code != 200:
                self.take_out(f"/ready answered {response.status_code}: {response.text[:200]}")
                return
            if not self.ready:
                response = await self._http.get("/info", timeout=self._probe_timeout)
                response.raise_for_status()
                self.info = ModelInfo(**response.json())
                if self._down.is_set():
                    self._down = asyncio.Event()
                self._accepting = True
                log.info("worker %s at %s ready: %s revision %s", self.name, self.url, self.info.id, self.info.revision)
        except httpx.TransportError as exc:
            self.mark_down(f"probe failed: {exc!r}")
        except (httpx.HTTPStatusError, ValueError, TypeError) as exc:
            self.take_out(f"/info failed: {exc!r}")

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
        """One /embed call. Raises a ServiceError for whole-call failures; Unavailable means the worker failed."""
        items = len(request.items)
        self._in_flight(items)
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
        call = asyncio.ensure_future(self._http.post("/embed", content=request.encode(), headers=headers))
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
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"the worker for model {self.name!r} did not answer in time") from exc
        except httpx.TransportError as exc:
            self.mark_down(f"{exc!r}")
            raise self.unavailable() from exc
        if response.status_code == 429:
            raise Overloaded(
                f"the worker for model {self.name!r} is at capacity",
                retry_after=int(response.headers.get("retry-after", "1")),
            )
        if response.status_code == 503:
            self.take_out(f"/embed answered 503: {response.text[:200]}")
            raise self.unavailable()
        if response.status_code != 200:
            raise ServiceError(
                f"the worker for model {self.name!r} answered {response.status_code}: {response.text[:200]}"
            )
        try:
            return EmbedResponse.decode(response.content)
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceError(f"the worker for model {self.name!r} sent a malformed response: {exc}") from exc

    async def aclose(self) -> None:
        await self._http.aclose()
        self._metrics.worker_outstanding.remove_by_labels({"model": self.name, "worker": self.url})
        self._metrics.worker_calls.remove_by_labels({"model": self.name, "worker": self.url})


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

    def choose(self, exclude: WorkerClient | None = None) -> WorkerClient | None:
        """The ready worker with the fewest inputs in flight, the least recently chosen among equals."""
        ready = [w for w in self.members.values() if w.ready and w is not exclude]
        if not ready:
            return None
        worker = min(ready, key=lambda w: (w.outstanding, w.last_chosen))
        self._chosen += 1
        worker.last_chosen = self._chosen
        return worker

    async def embed(self, request: EmbedRequest, deadline: float) -> EmbedResponse:
        """One call on the best worker, retried once on another if that worker failed; `deadline` in loop time."""
        worker = self.choose()
        if worker is None:
            raise self.unavailable()
        try:
            return await worker.embed(request)
        except Unavailable:
            other = self.choose(exclude=worker)
            if other is None or asyncio.get_running_loop().time() >= deadline:
                raise
            log.warning(
                "model %s: a call of %d inputs failed on %s; retrying on %s",
                self.name,
                len(request.items),
                worker.url,
                other.url,
            )
            self._metrics.worker_retries.labels(self.name).inc()
            return await other.embed(request)

    async def probe(self) -> None:
        await asyncio.gather(*(w.probe() for w in list(self.members.values())))
        self._metrics.workers_ready.labels(self.name).set(self.ready_count)

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

    async def resolve(self) -> None:
        await asyncio.gather(*(g.resolve() for g in self.groups.values() if g.has_dns))

    async def start(self) -> None:
        await self.resolve()
        await self.probe()
        self._tasks.append(asyncio.create_task(_every(self._probe_interval, self.probe)))
        if any(g.has_dns for g in self.groups.values()):
            self._tasks.append(asyncio.create_task(_every(self._dns_interval, self.resolve)))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(g.aclose() for g in self.groups.values()))
