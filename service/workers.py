"""Workers as the gateway sees them: an httpx client per worker, its /info, and its health.

A worker is *ready* once /ready and /info answered; a background probe keeps that current.
A failed connection marks it down at once, so new requests get 503 immediately rather than
waiting; a worker the probe finds unresponsive has its in-flight calls aborted (503) instead of
leaving them to hang until the deadline. The probe takes it back when /ready answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import httpx

from model_server.protocol import (
    REQUEST_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    EmbedRequest,
    EmbedResponse,
    ModelInfo,
)
from service.openai_api import ApiError, DeadlineExceeded, ModelNotFound, Overloaded, Unavailable
from service.settings import GatewaySettings

log = logging.getLogger(__name__)


class WorkerClient:
    def __init__(self, name: str, url: str, settings: GatewaySettings) -> None:
        self.name = name
        self.url = url
        self.info: ModelInfo | None = None
        self._probe_timeout = settings.worker_probe_timeout_s
        self._retry_after = math.ceil(settings.worker_probe_interval_s)
        # Callers time out on their own deadline; this bound only catches a worker that never answers.
        timeout = httpx.Timeout(settings.request_timeout_s + 5, connect=2.0)
        limits = httpx.Limits(max_connections=settings.max_concurrent_calls + 4, keepalive_expiry=30)
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)
        self._down = asyncio.Event()  # set while down; in-flight calls watch it
        self._down.set()

    @property
    def ready(self) -> bool:
        return self.info is not None and not self._down.is_set()

    def unavailable(self) -> Unavailable:
        return Unavailable(f"the worker for model {self.name!r} is unavailable", retry_after=self._retry_after)

    async def probe(self) -> None:
        """Check /ready; on the way back up, refetch /info (the revision may have changed)."""
        try:
            response = await self._http.get("/ready", timeout=self._probe_timeout)
            if response.status_code != 200:
                raise RuntimeError(f"/ready answered {response.status_code}")
            if not self.ready:
                response = await self._http.get("/info", timeout=self._probe_timeout)
                response.raise_for_status()
                self.info = ModelInfo(**response.json())
                self._down = asyncio.Event()
                log.info("worker %s at %s ready: %s revision %s", self.name, self.url, self.info.id, self.info.revision)
        except (httpx.HTTPError, RuntimeError, ValueError, TypeError) as exc:
            self.mark_down(f"probe failed: {exc!r}")

    def mark_down(self, reason: str) -> None:
        if not self._down.is_set():
            log.warning("worker %s at %s is down: %s", self.name, self.url, reason)
            self._down.set()

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """One /embed call. Raises an ApiError for whole-call failures (503, 429, 504, 500)."""
        if not self.ready:
            raise self.unavailable()
        down = self._down
        call = asyncio.ensure_future(
            self._http.post(
                "/embed",
                content=request.encode(),
                headers={"content-type": REQUEST_CONTENT_TYPE, REQUEST_ID_HEADER: request.request_id or ""},
            )
        )
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
            self.mark_down(f"/embed answered 503: {response.text[:200]}")
            raise self.unavailable()
        if response.status_code != 200:
            raise ApiError(f"the worker for model {self.name!r} answered {response.status_code}: {response.text[:200]}")
        try:
            return EmbedResponse.decode(response.content)
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(f"the worker for model {self.name!r} sent a malformed response: {exc}") from exc

    async def aclose(self) -> None:
        await self._http.aclose()


class WorkerPool:
    """The workers by the model name clients send; probes them in the background."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.workers = {name: WorkerClient(name, url, settings) for name, url in settings.worker_urls().items()}
        self._interval = settings.worker_probe_interval_s
        self._task: asyncio.Task | None = None

    def get(self, model: str) -> WorkerClient:
        worker = self.workers.get(model)
        if worker is None:
            raise ModelNotFound(f"the model {model!r} does not exist; see GET /v1/models", param="model")
        return worker

    @property
    def ready(self) -> bool:
        return all(w.ready for w in self.workers.values())

    async def probe_all(self) -> None:
        await asyncio.gather(*(w.probe() for w in self.workers.values()))

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.create_task(self._monitor())

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe_all()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(w.aclose() for w in self.workers.values()))
