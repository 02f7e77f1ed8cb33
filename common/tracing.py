"""Optional OpenTelemetry tracing for both processes (`pip install 'genembed[otel]'`; the gateway imports it too).

Off unless `setup` ran (GENEMBED_OTEL / GENEMBED_WORKER_OTEL): every helper is then a constant no-op and
nothing here imports opentelemetry, so tracing costs nothing when off. On, spans go to an OTLP exporter that
the standard variables configure (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _PROTOCOL / _HEADERS, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_BSP_*), and W3C `traceparent` (OTEL_PROPAGATORS) links the
gateway's worker call to the worker's spans.

The provider is ours, not the global one: FastAPI versions with native telemetry start tracing every route
(dependencies, serialisation) as soon as a global provider exists; these spans are the ones we chose.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

SpanKindName = Literal["internal", "server", "client"]
Attributes = Mapping[str, str | bool | int | float | Sequence[str] | Sequence[int]]

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def enabled() -> bool:
    return _tracer is not None


def _otlp_exporter() -> SpanExporter:
    """http/protobuf (the OTLP default, port 4318) unless OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL says grpc."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def setup(default_service_name: str, exporter: SpanExporter | None = None) -> None:
    """Turn tracing on; `exporter` replaces the OTLP one (tests). Raises RuntimeError without the extra."""
    global _tracer, _provider
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError("tracing needs the otel extra: pip install 'genembed[otel]'") from exc
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; attributes given here would win.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter or _otlp_exporter()))
    _provider, _tracer = provider, provider.get_tracer("genembed")


def shutdown() -> None:
    """Export what is buffered and turn tracing off."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def current_context() -> Context | None:
    """The active trace context, to parent work that runs later in another task (None when off)."""
    if _tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


def span(
    name: str,
    *,
    kind: SpanKindName = "internal",
    parent: Context | None = None,
    links: Sequence[Context | None] = (),
    attributes: Attributes | None = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """A current span around a block (yields None when off). `parent` defaults to the current context;
    `links` are the contexts of other requests served by the same work (a batch)."""
    if _tracer is None:
        return _OFF
    from opentelemetry import trace

    span_links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in links if c is not None]
    return _tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind[kind.upper()], links=span_links, attributes=attributes
    )


def server_span(
    name: str, headers: Mapping[str, str], attributes: Attributes | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A SERVER span continuing the caller's trace from its `traceparent` header (a new trace without one)."""
    if _tracer is None:
        return _OFF
    from opentelemetry import propagate

    return span(name, kind="server", parent=propagate.extract(headers), attributes=attributes)


def record_span(name: str, started: float, ended: float, attributes: Attributes | None = None) -> None:
    """A span for an interval already over (`time.monotonic`-like seconds, e.g. the event loop's clock)."""
    if _tracer is None:
        return
    offset_ns = time.time_ns() - int(time.monotonic() * 1e9)
    finished = _tracer.start_span(name, attributes=attributes, start_time=int(started * 1e9) + offset_ns)
    finished.end(end_time=int(ended * 1e9) + offset_ns)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and any other configured propagator's headers) for the current span."""
    if _tracer is None:
        return
    from opentelemetry import propagate

    propagate.inject(headers)


def set_attributes(current: Span | None, attributes: Mapping[str, Any]) -> None:
    if current is not None:
        current.set_attributes(attributes)
