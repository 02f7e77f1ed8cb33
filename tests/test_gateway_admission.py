"""Admission where the work runs (issue 22), through real gateways and workers: the gateway's own bounds (inputs
and calls in flight per model) refuse at once with 429 + Retry-After and leave nothing behind."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from tests.gateway_fixtures import gateway_process
from tests.load import sample

GIRCSE, MINILM = "smollm2-gircse", "minilm-l6"


def _assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["type"] == {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1
    return error


@pytest.mark.parametrize(
    ("env", "bound"),
    [
        ({"GENEMBED_MAX_QUEUED_ITEMS": "40"}, "inputs are in flight, the bound is 40"),
        ({"GENEMBED_MAX_WORKER_CALLS": "2"}, "worker calls are in flight, the bound is 2"),
    ],
    ids=["inputs", "calls"],
)
async def test_the_gateways_own_bounds_refuse_the_excess_with_429(minilm_worker, tmp_path, env, bound):
    with gateway_process(tmp_path, {MINILM: minilm_worker}, {**env, "GENEMBED_CACHE_MAX_MB": "0"}) as (url, _):
        bodies = [{"model": MINILM, "input": [f"request {r} sentence {i}" for i in range(16)]} for r in range(12)]
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=20)) as client:
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))
        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        assert statuses[200] >= 2, statuses  # two requests fit either bound whatever else happens
        for response in responses:
            if response.status_code == 429:
                error = _assert_openai_error(response, 429, "overloaded")
                assert "model 'minilm-l6' is overloaded" in error["message"] and bound in error["message"]
        assert sample(url, "genembed_gateway_rejections_total", reason="overloaded") == statuses[429]
        # Nothing is left behind, and drained, it serves again.
        assert sample(url, "genembed_gateway_queued_items", model=MINILM) == 0
        assert httpx.post(f"{url}/v1/embeddings", json=bodies[0], timeout=60).status_code == 200
