"""The gateway's HTTP layer: validate, translate, and hand over to the Embedder. No policy lives here.

Routes: POST /v1/embeddings, GET /v1/models[/{id}], /health, /ready, /metrics, /docs.
Every error leaves in OpenAI's shape, FastAPI's own 404/405/422 included (422 becomes 400).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import tracing
from common.drain import Drain, DrainMiddleware
from common.logs import request_id_var
from common.protocol import REQUEST_ID_HEADER
from service.auth import ApiKeys, load_api_keys
from service.batches.routes import batch_router
from service.batches.runner import BatchRunner
from service.batches.storage import build_store
from service.batches.store import BatchStore
from service.cache import build_cache
from service.disconnect import ClientDisconnected, unless_disconnected
from service.embedder import Embedder
from service.errors import NotFound, PayloadTooLarge, ServiceError, Unavailable
from service.limits import KeyLimiter
from service.metrics import GatewayMetrics
from service.openai_api import (
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    embed_options,
    error_response,
    error_responses,
    http_error,
    render_embeddings,
    validation_error,
)
from service.refine.corpora import Corpora
from service.refine.routes import refine_router
from service.refine.teachers import Teachers
from service.rerank import rerank_router
from service.settings import GatewaySettings
from service.workers import WorkerGroup, WorkerPool

log = logging.getLogger(__name__)
_access_log = logging.getLogger("genembed.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PROBES = frozenset({"/health", "/ready", "/metrics"})  # logged at DEBUG: a line per probe is noise


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not ready", "draining"]
    workers: dict[str, bool] = Field(description="per model: whether a worker takes requests")


class RequestContext:
    """ASGI middleware: request id (in every log line: `request_id_var`), the request's span, the body-size
    limit, the in-flight gauge, the duration histogram and one access log line per request."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        request_id_var.set(request_id)  # this request's own context (each request runs in its own task)
        declared = int(headers.get(b"content-length", b"0") or 0)
        received = 0
        status = 500
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if declared > limit or received > limit:  # raised inside body parsing: becomes the 413 answer
                raise HTTPException(413, f"the request body is larger than the {limit}-byte limit")
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        method, path = scope["method"], scope["path"]
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]} if tracing.enabled() else {}
        with tracing.server_span(method, carrier, {"genembed.request_id": request_id}) as span:
            try:
                await self.app(scope, limited_receive, send_with_id)
            finally:
                self.metrics.in_flight.dec()
                elapsed = time.perf_counter() - started
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                model = state.get("model", "")
                self.metrics.request_seconds.labels(endpoint, model, str(status)).observe(elapsed)
                _access_log.log(
                    logging.DEBUG if path in _PROBES else logging.INFO,
                    '"%s %s" %d %.1f ms model=%s key=%s',
                    method,
                    path,
                    status,
                    elapsed * 1000,
                    model or "-",
                    state.get("api_key", "-"),
                )
                if span is not None:
                    span.update_name(f"{method} {endpoint}")
                    span.set_attributes(
                        {"http.request.method": method, "http.route": endpoint, "http.response.status_code": status}
                    )


def _model_card(name: str, group: WorkerGroup) -> ModelCard:
    info, workers, workers_ready = group.info, len(group.members), group.ready_count
    if info is None:
        return ModelCard(id=name, ready=False, workers=workers, workers_ready=workers_ready)
    return ModelCard(
        id=name,
        ready=group.ready,
        workers=workers,
        workers_ready=workers_ready,
        served_model=info.id,
        revision=info.revision,
        method=info.method,
        dimension=info.dimension,
        min_refinement_steps=info.min_refinement_steps,
        max_refinement_steps=info.max_refinement_steps,
        default_refinement_steps=info.default_refinement_steps,
        max_input_tokens=info.max_input_tokens,
    )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The document as the API behaves: /v1/embeddings' body (parsed from the raw bytes, so FastAPI does not see
    it), and no 422 anywhere (validation errors are 400s, documented per route)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        request = EmbeddingRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(request.pop("$defs", {}))
        body = {"required": True, "content": {"application/json": {"schema": request}}}
        schema["paths"]["/v1/embeddings"]["post"]["requestBody"] = body
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            operation["responses"].pop("422", None)
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: GatewaySettings) -> FastAPI:
    """Raises ValueError on bad worker entries or an unreadable keys file."""
    metrics = GatewayMetrics()
    pool = WorkerPool(settings, metrics)
    drain = Drain(settings.drain_grace_s)  # the CLI's DrainingServer runs it on SIGTERM
    cache = build_cache(settings, metrics)
    embedder = Embedder(pool, cache, settings, metrics)
    teachers = Teachers(settings, embedder)  # one judge client for refine-query and rerank
    corpora = Corpora(settings, embedder)
    batches = BatchStore(build_store(settings))
    batch_runner = BatchRunner(batches, embedder, settings, metrics)
    auth = ApiKeys(load_api_keys(settings))
    authorized = [Depends(KeyLimiter(metrics).dependency(auth))]  # the key, then its rate limits and usage
    metrics_auth = [Depends(auth)] if settings.metrics_require_auth else []
    if settings.otel:
        tracing.setup("genembed-gateway")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await pool.start()
        embedder.loop_lag.start()
        await batches.start()
        batch_runner.start()
        yield
        await batch_runner.aclose()
        await batches.aclose()
        await embedder.aclose()
        await teachers.aclose()
        await corpora.aclose()
        await pool.aclose()
        await cache.aclose()
        tracing.shutdown()

    app = FastAPI(
        title="genembed gateway",
        description="OpenAI-compatible embeddings for generative embedding models",
        lifespan=lifespan,
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.drain = drain

    def shutting_down(message: str) -> Response:
        error = Unavailable(message, code="shutting_down", retry_after=1)
        metrics.rejections.labels(error.code).inc()
        return error_response(error)

    # Inside RequestContext, so a drain's 503s carry the request id and are measured like any answer.
    app.add_middleware(DrainMiddleware, drain=drain, reject=shutting_down, exempt=("/health", "/ready", "/metrics"))
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> Response:
        metrics.rejections.labels(exc.code or http_error(exc)[1]).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return await service_error(request, validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def protocol_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 413:
            return await service_error(request, PayloadTooLarge(str(exc.detail)))
        if exc.status_code == 404:
            return await service_error(request, NotFound(str(exc.detail)))
        error = ServiceError(str(exc.detail))  # 405 and the like: HTTP's own, with its status
        metrics.rejections.labels("invalid_request_error" if exc.status_code < 500 else "server_error").inc()
        return error_response(error, exc.status_code)

    @app.exception_handler(ClientDisconnect)  # gone before its body was read: a client that gave up waiting
    @app.exception_handler(ClientDisconnected)
    async def gone(_: Request, __: Exception) -> Response:
        metrics.rejections.labels("client_disconnected").inc()
        return Response(status_code=499)

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        dependencies=authorized,
        summary="Create embeddings (OpenAI-compatible, with genembed's extensions)",
        responses=error_responses(400, 401, 404, 413, 429, 503, 504),
    )
    async def embeddings(request: Request) -> Response:
        raw = await request.body()
        with tracing.span("validate"):
            # Parsed by pydantic-core straight from the bytes, whatever the content type says (curl -d: a form's).
            try:
                body = EmbeddingRequest.model_validate_json(raw)
            except ValidationError as exc:
                raise validation_error(exc.errors()) from None
            options = embed_options(embedder, body, settings.max_inputs)
            request.state.model = body.model
        result = await unless_disconnected(
            request, embedder.embed(body.model, body.inputs(), options, request.state.request_id)
        )
        headers = {
            "x-queue-time": f"{result.queue_s * 1000:.2f}",
            "x-compute-time": f"{result.compute_s * 1000:.2f}",
            "x-cache": result.cache,
        }
        return render_embeddings(result, body, headers)

    app.include_router(refine_router(settings, embedder, teachers, corpora), dependencies=authorized)
    app.include_router(rerank_router(settings, embedder, teachers), dependencies=authorized)
    app.include_router(batch_router(batches, batch_runner), dependencies=authorized)

    @app.get("/v1/models", response_model=ModelList, dependencies=authorized, responses=error_responses(401, 429, 503))
    async def models() -> ModelList:
        return ModelList(data=[_model_card(name, g) for name, g in pool.groups.items()])

    @app.get(
        "/v1/models/{model:path}",
        response_model=ModelCard,
        dependencies=authorized,
        responses=error_responses(401, 404, 429, 503),
    )
    async def model(model: str) -> ModelCard:
        return _model_card(model, pool.get(model))

    @app.get("/health", response_model=Health, summary="liveness: the gateway process answers")
    async def health() -> Health:
        return Health()

    @app.get(
        "/ready",
        response_model=Readiness,
        summary="readiness: every model has a ready worker, and not draining",
        responses={503: {"model": Readiness, "description": "a model has no ready worker, or the gateway drains"}},
    )
    async def ready() -> JSONResponse:
        workers = {name: g.ready for name, g in pool.groups.items()}
        if drain.draining:
            return JSONResponse({"status": "draining", "workers": workers}, 503)
        status = 200 if all(workers.values()) else 503
        return JSONResponse({"status": "ready" if status == 200 else "not ready", "workers": workers}, status)

    @app.get(
        "/metrics",
        dependencies=metrics_auth,
        response_class=Response,
        summary="Prometheus metrics (text exposition format)",
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "the metrics"},
            **(error_responses(401) if settings.metrics_require_auth else {}),
        },
    )
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
