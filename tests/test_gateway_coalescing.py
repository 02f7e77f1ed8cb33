"""One worker call per request: identical inputs in flight are computed once across requests, a large request
is one call (admitted or refused whole by the worker), every caller gets its own results in order, and a caller
that leaves stops costing work."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import numpy as np
import pytest

from common.protocol import EmbedItem, EmbedRequest, EmbedResponse
from tests.gateway_fixtures import gateway_process

pytestmark = pytest.mark.slow

TOPICS = [
    "volcanic eruptions in Iceland",
    "the rules of cricket",
    "baking sourdough bread",
    "black holes and general relativity",
    "the French revolution",
    "training a puppy to sit",
    "electric cars and battery chemistry",
    "jazz improvisation techniques",
]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def worker_vectors(worker: str, texts: list[str], **item: object) -> np.ndarray:
    request = EmbedRequest(items=[EmbedItem(text=t, **item) for t in texts])
    response = httpx.post(f"{worker}/embed", content=request.encode(), timeout=120)
    return EmbedResponse.decode(response.content).vectors


def assert_same_inputs(vectors: np.ndarray, reference: np.ndarray) -> None:
    """Row i is the embedding of input i: closest to its own reference row, and nearly equal to it."""
    similarity = vectors @ reference.T
    assert list(similarity.argmax(axis=1)) == list(range(len(vectors)))
    assert similarity.diagonal().min() > 0.99


@pytest.fixture(scope="module")
def gircse_gateway(gircse_worker, tmp_path_factory):
    with gateway_process(tmp_path_factory.mktemp("gircse-gw"), {"smollm2-gircse": gircse_worker}) as (url, _):
        yield url


async def test_concurrent_callers_get_their_own_results_and_shared_inputs_are_computed_once(
    minilm_gateway, minilm_worker
):
    texts = [f"{topic}, variant {i}" for i in range(3) for topic in TOPICS]  # 24 distinct inputs
    reference = worker_vectors(minilm_worker, texts)
    before = httpx.get(f"{minilm_gateway}/metrics").text
    requests = [[texts[i], texts[(i + 5) % 24], texts[(i + 11) % 24]] for i in range(24)]
    async with httpx.AsyncClient(base_url=minilm_gateway, timeout=60) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/embeddings", json={"model": "minilm-l6", "input": r}) for r in requests)
        )
    for request, response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        vectors = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        assert_same_inputs(vectors, reference[[texts.index(t) for t in request]])
    after = httpx.get(f"{minilm_gateway}/metrics").text
    calls = metric(after, "genembed_gateway_batch_items_count") - metric(before, "genembed_gateway_batch_items_count")
    computed = metric(after, "genembed_gateway_batch_items_sum") - metric(before, "genembed_gateway_batch_items_sum")
    assert computed <= 24  # 72 inputs asked for, 24 distinct: in flight for another request or cached
    assert 1 <= calls <= len(requests)  # at most one call per request, never one per input


def test_a_large_request_is_one_call_and_stays_in_order(minilm_gateway, minilm_worker):
    texts = [f"{topic} (note {i})" for i in range(13) for topic in TOPICS][:100]
    reference = worker_vectors(minilm_worker, texts)
    before = httpx.get(f"{minilm_gateway}/metrics").text
    response = httpx.post(
        f"{minilm_gateway}/v1/embeddings", json={"model": "minilm-l6", "input": texts, "encoding_format": "float"}
    )
    assert response.status_code == 200
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(100))
    assert_same_inputs(np.array([d["embedding"] for d in data], dtype=np.float32), reference)
    after = httpx.get(f"{minilm_gateway}/metrics").text
    calls = metric(after, "genembed_gateway_batch_items_count") - metric(before, "genembed_gateway_batch_items_count")
    computed = metric(after, "genembed_gateway_batch_items_sum") - metric(before, "genembed_gateway_batch_items_sum")
    assert (calls, computed) == (1, 100)  # the worker admits the request whole, or refuses it whole
    assert response.json()["usage"]["prompt_tokens"] > 100


async def test_identical_inputs_in_flight_are_computed_once(gircse_gateway, gircse_worker):
    text = f"deduplicated at {time.time()}"
    before = metric(httpx.get(f"{gircse_worker}/metrics").text, "genembed_worker_items_total", outcome="ok")
    body = {"model": "smollm2-gircse", "input": text, "refinement_steps": 4, "encoding_format": "base64"}
    async with httpx.AsyncClient(base_url=gircse_gateway, timeout=60) as client:
        responses = await asyncio.gather(*(client.post("/v1/embeddings", json=body) for _ in range(12)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["data"][0]["embedding"] for r in responses}) == 1
    after = metric(httpx.get(f"{gircse_worker}/metrics").text, "genembed_worker_items_total", outcome="ok")
    assert after - before == 1


def test_a_client_that_disconnects_stops_costing_work(gircse_gateway, gircse_worker):
    def steps() -> float:
        return metric(httpx.get(f"{gircse_worker}/metrics").text, "genembed_worker_refinement_steps_total")

    start = steps()
    body = {
        "model": "smollm2-gircse",
        "input": [f"abandoned {i} {time.time()}" for i in range(8)],
        "refinement_steps": 20,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gircse_gateway}/v1/embeddings", json=body, timeout=httpx.Timeout(60, read=0.5))
    time.sleep(1.5)
    settled = steps()
    time.sleep(1.0)
    assert steps() == settled  # nothing runs for the caller that left
    assert settled - start < 8 * 20  # and it did not all run
    metrics = httpx.get(f"{gircse_gateway}/metrics").text
    assert metric(metrics, "genembed_gateway_rejections_total", reason="client_disconnected") == 1
    assert metric(metrics, "genembed_gateway_worker_call_seconds_count", outcome="cancelled") >= 1
