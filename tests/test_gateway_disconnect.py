"""Every long route stops working for a client that left: /v1/rerank and /v1/refine-query against a judge that
never answers (the teacher would wait 20 s per call), abandoned by their callers after half a second, leave the
gateway at once (499, counted as `client_disconnected`) instead of holding the request until the judge times out.
/v1/embeddings' own case is tests/test_gateway_coalescing.py's; a client gone before its body arrived is here too."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from harness.procs import app_in_thread
from tests.gateway_fixtures import gateway_process
from tests.test_gateway_coalescing import metric

MODEL = "minilm-l6"


@pytest.fixture(scope="module")
def hanging_judge() -> Iterator[str]:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> dict:
        await asyncio.sleep(60)
        return {}

    with app_in_thread(app, force_exit=True) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def gateway(minilm_worker, hanging_judge, tmp_path_factory) -> Iterator[str]:
    env = {"GENEMBED_JUDGE_URL": hanging_judge, "GENEMBED_JUDGE_MODEL": "judge"}
    with gateway_process(tmp_path_factory.mktemp("disconnect-gw"), {MODEL: minilm_worker}, env) as (url, _):
        yield url


DOCUMENTS = ["Solar panels turn light into electricity.", "A recipe for bread.", "Photovoltaic cells."]
BODIES = {
    "/v1/rerank": {"model": MODEL, "query": "how do solar panels work?", "documents": DOCUMENTS, "teacher": "llm"},
    "/v1/refine-query": {
        "model": MODEL,
        "query": "how do solar panels work?",
        "documents": [{"id": str(i), "text": t} for i, t in enumerate(DOCUMENTS)],
        "teacher": {"type": "llm"},
        "sampling": {"total": 3},
    },
}


@pytest.mark.parametrize("route", list(BODIES))
def test_a_client_that_leaves_stops_the_route(gateway, route):
    def gone() -> float:
        text = httpx.get(f"{gateway}/metrics").text
        return metric(text, "genembed_gateway_rejections_total", reason="client_disconnected")

    before = gone()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway}{route}", json=BODIES[route], timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 5  # far below the judge's 20 s call timeout
    while gone() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone() == before + 1
    in_flight = metric(httpx.get(f"{gateway}/metrics").text, "genembed_gateway_in_flight_requests")
    assert in_flight == 1  # the /metrics request itself: the abandoned one has left


def test_a_client_gone_before_its_body_arrived_is_a_499_not_a_500(gateway):
    """What a gateway far behind its requests meets: their callers gave up before it read the bodies."""

    def count(name: str, **labels: str) -> float:
        return metric(httpx.get(f"{gateway}/metrics").text, name, **labels)

    gone = ("genembed_gateway_rejections_total", {"reason": "client_disconnected"})
    failed = ("genembed_gateway_request_seconds_count", {"endpoint": "/v1/embeddings", "status": "500"})
    before_gone, before_failed = count(gone[0], **gone[1]), count(failed[0], **failed[1])
    address = httpx.URL(gateway)
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection((address.host, address.port)) as client:
        client.sendall(head + b'{"model": ')  # 90 bytes of the body never come
    deadline = time.monotonic() + 10
    while count(gone[0], **gone[1]) == before_gone and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count(gone[0], **gone[1]) == before_gone + 1
    assert count(failed[0], **failed[1]) == before_failed
