"""Request ids, JSON logs and OpenTelemetry across a real gateway and a real minilm-l6 worker.

The end-to-end tests run both processes with JSON logs and tracing on, exporting over OTLP/HTTP to a
receiver in this process (a plain HTTP server decoding the protobuf), so they see what a collector would.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from common import tracing
from harness.procs import REPO, worker_process
from service.app import create_app
from service.settings import GatewaySettings
from tests.gateway_fixtures import gateway_process

MODEL = "minilm-l6"
GATEWAY_SPANS = {"POST /v1/embeddings", "validate", "cache.lookup", "queue", "worker.call"}
WORKER_SPANS = {"POST /embed", "prepare", "engine"}


class _OtlpHandler(BaseHTTPRequestHandler):
    server: _OtlpReceiver

    def do_POST(self) -> None:
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.server.add(
                        {
                            "service": resource.get("service.name"),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                            "attributes": {a.key: a.value for a in span.attributes},
                        }
                    )
        payload = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: object) -> None:
        pass


class _OtlpReceiver(ThreadingHTTPServer):
    """The OTLP/HTTP traces endpoint of a collector, keeping what it receives."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OtlpHandler)
        self.spans: list[dict] = []
        self._lock = threading.Lock()

    def add(self, span: dict) -> None:
        with self._lock:
            self.spans.append(span)

    def wait_for(self, found: Callable[[list[dict]], bool], timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                spans = list(self.spans)
            if found(spans):
                return spans
            time.sleep(0.1)
        received = [(s["service"], s["name"]) for s in spans]
        raise AssertionError(f"the expected spans did not arrive; received: {received}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[_OtlpReceiver]:
    server = _OtlpReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def traced(receiver, tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    """(gateway URL, gateway log, worker log): both processes with JSON logs and OTLP tracing to `receiver`."""
    tmp = tmp_path_factory.mktemp("traced")
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    worker_env = {**otel, "GENEMBED_WORKER_OTEL": "true", "GENEMBED_WORKER_LOG_FORMAT": "json"}
    with worker_process(MODEL, tmp, env=worker_env) as (worker_url, _):
        gateway_env = {**otel, "GENEMBED_OTEL": "true", "GENEMBED_LOG_FORMAT": "json"}
        with gateway_process(tmp, {MODEL: worker_url}, env=gateway_env) as (url, _):
            yield url, next(tmp.glob("gateway-*.log")), next(tmp.glob("worker-*.log"))


def _embed(url: str, text: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": [text]}, headers=headers, timeout=60)


def _json_lines(path: Path) -> list[dict]:
    """Every log line as JSON; only tqdm's progress bar (model loading) writes to stderr outside logging."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and "Loading weights" not in line]
    return [json.loads(line) for line in lines]


def _wait_log(path: Path, found: Callable[[list[dict]], bool], timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        entries = _json_lines(path)
        if found(entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


def test_given_request_id_is_returned_and_in_both_processes_json_logs(traced) -> None:
    url, gateway_log, worker_log = traced
    request_id = f"test-{uuid.uuid4().hex[:12]}"
    response = _embed(url, f"request ids travel {request_id}", {"x-request-id": request_id})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id

    worker = _wait_log(worker_log, lambda e: any("done" in x["message"] and x["request_id"] == request_id for x in e))
    mine = [e for e in worker if e["request_id"] == request_id]
    assert any(e["message"] == "embed: 1 items received" for e in mine), mine
    assert any(e["message"].startswith("embed: 1 items done in") for e in mine), mine
    for entry in worker:
        assert set(entry) >= {"time", "level", "logger", "message", "request_id"}

    gateway = _wait_log(gateway_log, lambda e: any(x["request_id"] == request_id for x in e))
    access = [e for e in gateway if e["request_id"] == request_id and e["logger"] == "genembed.access"]
    assert len(access) == 1 and '"POST /v1/embeddings" 200' in access[0]["message"], gateway[-5:]


def test_request_id_generated_when_missing_or_unsafe_and_on_errors(traced) -> None:
    url = traced[0]
    for headers in ({}, {"x-request-id": "a" * 129}, {"x-request-id": "no spaces or ; allowed"}):
        response = _embed(url, "a generated id", headers)
        assert response.status_code == 200
        generated = response.headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0 and generated != headers.get("x-request-id")
    error = httpx.post(f"{url}/v1/embeddings", json={"model": "nope", "input": ["x"]}, headers={"x-request-id": "e-1"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "e-1"


def test_one_trace_spans_gateway_and_worker(traced, receiver) -> None:
    url = traced[0]
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{'1' * 16}-01"  # a caller's trace: the gateway continues it
    response = _embed(url, f"traced sentence {trace_id}", {"traceparent": traceparent})
    assert response.status_code == 200 and response.headers["x-cache"] == "miss"

    def complete(spans: list[dict]) -> bool:
        names = {(s["service"], s["name"]) for s in spans if s["trace_id"] == trace_id}
        expected = {("genembed-gateway", n) for n in GATEWAY_SPANS} | {("genembed-worker", n) for n in WORKER_SPANS}
        return expected <= names

    spans = [s for s in receiver.wait_for(complete) if s["trace_id"] == trace_id]
    by_name = {s["name"]: s for s in spans}
    server = by_name["POST /v1/embeddings"]
    assert server["parent_id"] == "1" * 16  # the caller's span
    for name in ("validate", "cache.lookup", "queue", "worker.call"):
        assert by_name[name]["parent_id"] == server["span_id"], name
    worker_server = by_name["POST /embed"]
    assert worker_server["parent_id"] == by_name["worker.call"]["span_id"]  # traceparent crossed the wire
    assert by_name["engine"]["parent_id"] == worker_server["span_id"]
    request_id = response.headers["x-request-id"]
    assert worker_server["attributes"]["genembed.request_ids"].string_value == request_id
    assert by_name["engine"]["attributes"]["genembed.sequences"].int_value == 1


def test_in_memory_spans_of_a_miss_and_a_hit(minilm_worker) -> None:
    """In-process gateway with the SDK's in-memory exporter: the span tree, and a cache hit has no worker call."""
    exporter = InMemorySpanExporter()
    tracing.setup("genembed-gateway", exporter=exporter)
    app = create_app(GatewaySettings(workers=[f"{MODEL}={minilm_worker}"]))
    text = f"in memory {uuid.uuid4().hex}"
    with TestClient(app) as client:  # its shutdown runs the app's lifespan end: tracing.shutdown() flushes
        for _ in range(2):
            response = client.post("/v1/embeddings", json={"model": MODEL, "input": [text]})
            assert response.status_code == 200, response.text
    assert not tracing.enabled()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "POST /v1/embeddings"]
    assert len(roots) == 2
    for root, expected in zip(roots, (GATEWAY_SPANS, GATEWAY_SPANS - {"queue", "worker.call"}), strict=True):
        children = {s.name for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
        assert children == expected - {"POST /v1/embeddings"}, (root.attributes, children)
        assert root.attributes["http.response.status_code"] == 200
    lookups = [s for s in spans if s.name == "cache.lookup"]
    assert [s.attributes["genembed.cache.hits"] for s in lookups] == [0, 1]


def test_tracing_off_loads_no_opentelemetry_of_ours() -> None:
    """Off by default: neither process loads the tracing SDK or an exporter, and serving a request imports no
    opentelemetry module at all. (With the otel extra installed, libraries import parts of it themselves:
    FastAPI >= 0.16x the API for its native telemetry, idle without a provider; redis-py its metrics SDK.)"""
    script = """
import sys
from starlette.testclient import TestClient
from common import tracing
from model_server.app import create_app as create_worker
from model_server.settings import WorkerSettings
from service.app import create_app
from service.settings import GatewaySettings
imported = {m for m in sys.modules if m.startswith("opentelemetry")}
create_worker(WorkerSettings(model="minilm-l6"))
with TestClient(create_app(GatewaySettings(workers=["m=http://127.0.0.1:9"]))) as client:
    assert client.post("/v1/embeddings", json={"model": "m", "input": ["x"]}).status_code == 503
    assert not tracing.enabled()
loaded = {m for m in sys.modules if m.startswith("opentelemetry")}
tracing_sdk = sorted(m for m in loaded if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter")))
print(sorted(loaded - imported), tracing_sdk)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []", done.stdout
