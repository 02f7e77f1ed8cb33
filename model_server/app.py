"""The worker's small internal HTTP API: /embed, /load, /info, /health, /ready, /metrics.

The model loads in the background so /health answers at once (a Kubernetes startup probe
watches /ready). A client that disconnects cancels its sequences in the engine.

/embed admits a call where its work runs (admission.py): 429 with Retry-After when the queue would
finish it past its deadline, 400 (`exceeds_deadline`) when it could not finish in time even on an idle
worker, 504 (`deadline_exceeded`) when its deadline passed before it was done. Every /embed answer and
`GET /load` carry the backlog (protocol.DRAIN_HEADER, protocol.QUEUED_HEADER), so a gateway routes by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common import tracing
from common.drain import Drain, DrainMiddleware
from common.logs import request_id_var
from common.protocol import (
    CONTENT_TYPE,
    DEADLINE_PASSED,
    EXCEEDS_DEADLINE,
    OVERLOADED,
    REFUSAL_HOLDS_FOR_HEADER,
    REFUSAL_HOLDS_HEADER,
    REQUEST_ID_HEADER,
    EmbedRequest,
)
from model_server.auth import require_token
from model_server.engine import DeadlineExceeded, EngineStopped, QueueFull
from model_server.metrics import WorkerMetrics
from model_server.serving import EmbeddingWorker, LoadReport, NotAdmitted
from model_server.settings import WorkerSettings
from model_server.specs import load_spec
from model_server.threads import in_a_thread_of_its_own

log = logging.getLogger(__name__)


def _error(status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    body = {"detail": message} if code is None else {"detail": message, "code": code}
    return JSONResponse(body, status_code=status, headers=headers)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: WorkerSettings, on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """`on_fatal` is called when the model cannot be loaded (the CLI exits; tests inspect)."""
    spec = load_spec(settings.model, **settings.spec_overrides())
    metrics = WorkerMetrics()
    state: dict[str, object] = {"worker": None, "ready": False, "error": None}
    if settings.otel:
        tracing.setup("genembed-worker")

    async def load() -> None:
        try:
            # asyncio's executor thread only waits: the load's torch code runs in a thread that ends with it
            load_args = (
                EmbeddingWorker.load,
                spec,
                settings.limits(),
                metrics,
                settings.policy(),
                settings.turns(),
                settings.ingress_nice,
            )
            started = time.perf_counter()
            worker = await asyncio.to_thread(in_a_thread_of_its_own, *load_args)
            state["worker"] = worker
            loaded = time.perf_counter()
            await worker.warmup()
            state["ready"] = True
            load_s, warmup_s = loaded - started, time.perf_counter() - loaded
            metrics.startup_seconds.labels("load").set(load_s)
            metrics.startup_seconds.labels("warmup").set(warmup_s)
            log.info(
                "worker ready: %s revision %s (load %.1f s, warm-up %.1f s)",
                spec.id,
                worker.loaded.revision,
                load_s,
                warmup_s,
            )
        except Exception as exc:
            log.exception("model %s failed to load", spec.id)
            state["error"] = f"model {spec.id!r} failed to load: {exc}"
            if on_fatal:
                on_fatal(exc)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        task = asyncio.create_task(load())
        yield
        task.cancel()
        worker = state["worker"]
        if isinstance(worker, EmbeddingWorker):
            await asyncio.to_thread(worker.stop)
        tracing.shutdown()

    app = FastAPI(title=f"genembed worker ({spec.id})", lifespan=lifespan)
    app.state.worker_state = state
    drain = app.state.drain = Drain(settings.drain_grace_s, metrics.in_flight)  # run by the CLI on SIGTERM
    app.add_middleware(
        DrainMiddleware,
        drain=drain,
        reject=lambda message: _error(503, message, {"Retry-After": "1"}),
        exempt=("/health", "/ready", "/info", "/metrics"),
    )
    require_token(app, settings.host, [settings.token, settings.rotation_token], metrics.registry)  # outermost

    def ready_worker() -> EmbeddingWorker | None:
        worker = state["worker"]
        return worker if state["ready"] and isinstance(worker, EmbeddingWorker) and worker.engine.alive else None

    @app.get("/health")
    async def health() -> Response:
        worker = state["worker"]
        if state["error"] or (state["ready"] and not (isinstance(worker, EmbeddingWorker) and worker.engine.alive)):
            return _error(503, str(state["error"] or "the engine thread has stopped"))
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if drain.draining:
            return _error(503, "draining: finishing the requests in flight, then exiting")
        if ready_worker() is None:
            return _error(503, str(state["error"] or "loading"))
        return JSONResponse({"status": "ready"})

    @app.get("/info")
    async def info() -> Response:
        worker = ready_worker()
        if worker is None:
            return _error(503, str(state["error"] or "loading"))
        return JSONResponse(worker.info().to_json())

    @app.get("/metrics")
    async def prometheus() -> Response:
        if (worker := ready_worker()) is not None:
            worker.backlog()  # the drain and cost gauges, fresh for the scrape
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load_report() -> Response:
        """The backlog, cheaply: what a gateway polls between calls to pick the worker that finishes first."""
        worker = ready_worker()
        if worker is None:
            return _error(503, str(state["error"] or "loading"), {"Retry-After": "5"})
        report = worker.backlog()
        return JSONResponse(report.to_json(), headers=report.headers())

    @app.post("/embed")
    async def embed(request: Request) -> Response:
        received = time.monotonic()  # the call's deadline counts from here
        worker = ready_worker()
        if worker is None:
            return _error(503, str(state["error"] or "the model is still loading"), {"Retry-After": "5"})
        try:
            embed_request = EmbedRequest.decode(await request.body())
        except ValueError as exc:
            return _error(400, str(exc), worker.backlog().headers())
        embed_request.request_id = embed_request.request_id or request.headers.get(REQUEST_ID_HEADER)
        # The gateway's ids of every request in this batch: on each log line and span of its work.
        request_id_var.set(embed_request.request_id)
        items = len(embed_request.items)
        if embed_request.deadline_s is not None and embed_request.deadline_s <= 0:
            metrics.admission.labels("deadline_passed").inc()
            message = "the request's deadline passed before it reached the worker"
            return _error(504, message, worker.backlog().headers(), DEADLINE_PASSED)
        log.info("embed: %d items received", items)
        started = time.perf_counter()
        attributes = {"genembed.request_ids": embed_request.request_id or "", "genembed.items": items}
        with tracing.server_span("POST /embed", request.headers, attributes) as span:
            work = asyncio.create_task(worker.embed(embed_request, received))
            watcher = asyncio.create_task(_until_disconnected(request))
            try:
                await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the server gave up on the request (drain grace over): free its work
                work.cancel()
                raise
            finally:
                watcher.cancel()
            if not work.done():  # the client went away: stop spending compute on it
                work.cancel()
                log.info("embed: cancelled by the client after %.1f ms", (time.perf_counter() - started) * 1000)
                return Response(status_code=499)
            try:
                response = work.result()
            except NotAdmitted as refusal:
                return _refusal(refusal, worker.backlog())
            except QueueFull as exc:
                log.warning("embed: refused, the queue is full: %s", exc)
                metrics.admission.labels("queue_full").inc()
                report = worker.backlog()
                headers = {"Retry-After": str(worker.retry_after(report.drain_s)), **report.headers()}
                return _error(429, f"worker queue is full: {exc}", headers, OVERLOADED)
            except DeadlineExceeded as exc:
                log.warning("embed: %s", exc)
                return _error(504, str(exc), worker.backlog().headers(), DEADLINE_PASSED)
            except EngineStopped as exc:
                return _error(503, str(exc))
            errors = sum(r.error is not None for r in response.results)
            tracing.set_attributes(span, {"genembed.item_errors": errors})
        log.info(
            "embed: %d items done in %.1f ms (%d errors, %d prompt tokens)",
            items,
            (time.perf_counter() - started) * 1000,
            errors,
            sum(r.prompt_tokens for r in response.results),
        )
        return Response(response.encode(), media_type=CONTENT_TYPE, headers=worker.backlog().headers())

    return app


def _refusal(refusal: NotAdmitted, report: LoadReport) -> JSONResponse:
    """429 (refused for now, Retry-After) or 400 (never fits: what to change), with the backlog headers."""
    decision = refusal.decision
    if decision.outcome == "never_fits":
        return _error(400, decision.detail, report.headers(), EXCEEDS_DEADLINE)
    headers = {
        "Retry-After": str(decision.retry_after_s),
        REFUSAL_HOLDS_HEADER: f"{decision.holds_s:.3f}",
        **report.headers(),
    }
    if decision.holds_for_any:
        headers[REFUSAL_HOLDS_FOR_HEADER] = "any"
    return _error(429, decision.detail, headers, OVERLOADED)
