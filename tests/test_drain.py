"""Graceful drain on SIGTERM, for the gateway, the worker and `genembed serve`: readiness goes false first, new
requests get 503 with Retry-After, every accepted request is answered (past the grace: 503, never a dropped
connection), then the process exits."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import httpx
import pytest

from common.protocol import REQUEST_CONTENT_TYPE, EmbedItem, EmbedRequest, EmbedResponse
from harness.procs import alive, children, free_port, genembed, running, worker_process
from tests.gateway_fixtures import gateway_process
from tests.load import MODEL, apoll, body, post_all, sample, texts

pytestmark = pytest.mark.slow

# Enough work that the requests are still running seconds after SIGTERM, even on a fast machine.
IN_FLIGHT, INPUTS, WORDS = 4, 32, 80
ENV = {
    "GENEMBED_CACHE_MAX_MB": "0",
    "GENEMBED_REQUEST_TIMEOUT_S": "300",
    "GENEMBED_DRAIN_GRACE_S": "300",
    "GENEMBED_WORKER_DRAIN_GRACE_S": "300",
}


async def start_load(url: str, tag: str, words: int = WORDS) -> asyncio.Task:
    """IN_FLIGHT big requests, returned once the gateway has accepted all of them."""
    load = asyncio.create_task(post_all(url, [body(f"{tag} {r}", INPUTS, words) for r in range(IN_FLIGHT)], IN_FLIGHT))
    # The gauge counts the /metrics request that reads it too.
    await apoll(
        lambda: sample(url, "genembed_gateway_in_flight_requests") >= IN_FLIGHT + 1, 60, "every request accepted"
    )
    return load


def assert_all_answered(responses: list[httpx.Response]) -> None:
    assert Counter(r.status_code for r in responses) == {200: IN_FLIGHT}, [r.text[:200] for r in responses]
    assert all(len(r.json()["data"]) == INPUTS for r in responses)


def assert_shutting_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "shutting_down")


async def test_gateway_sigterm_finishes_accepted_requests_and_refuses_new_ones(minilm_worker, tmp_path):
    with gateway_process(tmp_path, {MODEL: minilm_worker}, ENV) as (url, proc):
        load = await start_load(url, "gateway drain")
        proc.send_signal(signal.SIGTERM)
        await apoll(lambda: httpx.get(f"{url}/ready").status_code == 503, 10, "/ready answers 503")
        assert httpx.get(f"{url}/ready").json()["status"] == "draining"
        assert not load.done()
        assert_shutting_down(httpx.post(f"{url}/v1/embeddings", json=body("too late", 1), timeout=30))
        assert httpx.get(f"{url}/health").status_code == 200  # alive: a liveness probe must not kill it
        assert_all_answered(await load)
        assert await asyncio.to_thread(proc.wait, 60) == -signal.SIGTERM  # it exits, as a SIGTERM asks


async def test_a_request_still_running_after_the_grace_gets_503(minilm_worker, tmp_path):
    env = {**ENV, "GENEMBED_DRAIN_GRACE_S": "0.05"}
    with gateway_process(tmp_path, {MODEL: minilm_worker}, env) as (url, proc):
        # Longer inputs and a short grace: on a CPU with native bf16 the usual load finished inside a 1 s grace, and
        # on an AMX Xeon these inside 0.5 s (~0.25 s of MiniLM work).
        load = await start_load(url, "past the grace", words=180)
        proc.send_signal(signal.SIGTERM)
        responses = await load
        assert all(r.status_code in (200, 503) for r in responses)
        late = [r for r in responses if r.status_code == 503]
        assert late, "every request finished within 0.05 s: the load is too small to test the grace"
        for response in late:
            assert_shutting_down(response)
            assert "drain grace 0.05 s" in response.json()["error"]["message"]
        assert await asyncio.to_thread(proc.wait, 60) == -signal.SIGTERM


def embed_call(tag: str, n: int, words: int = WORDS) -> bytes:
    return EmbedRequest([EmbedItem(text=t, input_type="document", steps=0) for t in texts(tag, n, words)]).encode()


async def embed_direct(worker: str, bodies: list[bytes]) -> list[httpx.Response]:
    """POST each body to the worker's /embed at once."""
    headers = {"content-type": REQUEST_CONTENT_TYPE}
    async with httpx.AsyncClient(base_url=worker, timeout=300, limits=httpx.Limits(max_connections=50)) as client:
        return await asyncio.gather(*(client.post("/embed", content=b, headers=headers) for b in bodies))


async def test_worker_sigterm_finishes_its_calls_and_refuses_new_ones(tmp_path):
    env = {**ENV, "GENEMBED_WORKER_PROBE_INTERVAL_S": "0.5"}
    with (
        worker_process(MODEL, tmp_path, env=ENV) as (worker, worker_proc),
        gateway_process(tmp_path, {MODEL: worker}, env) as (url, _),
    ):
        calls = [embed_call(f"direct {r}", INPUTS) for r in range(IN_FLIGHT)]
        direct = asyncio.create_task(embed_direct(worker, calls))
        via_gateway = asyncio.create_task(post_all(url, [body("via the gateway", 32, WORDS)], 1))  # one call
        await apoll(
            lambda: sample(worker, "genembed_worker_in_flight_requests") == IN_FLIGHT + 1, 60, "every call accepted"
        )
        worker_proc.send_signal(signal.SIGTERM)
        await apoll(lambda: httpx.get(f"{worker}/ready").status_code == 503, 10, "the worker's /ready answers 503")
        assert not direct.done()
        late = httpx.post(
            f"{worker}/embed", content=embed_call("too late", 1), headers={"content-type": REQUEST_CONTENT_TYPE}
        )
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        # The gateway takes the draining worker out of rotation, without aborting the call it has there.
        await apoll(lambda: httpx.get(f"{url}/ready").status_code == 503, 10, "the gateway stops routing there")
        for response in await direct:
            assert response.status_code == 200, response.text
            results = EmbedResponse.decode(response.content).results
            assert len(results) == INPUTS and not any(r.error for r in results)
        [answer] = await via_gateway
        assert answer.status_code == 200 and len(answer.json()["data"]) == 32, answer.text
        assert await asyncio.to_thread(worker_proc.wait, 60) == -signal.SIGTERM


async def test_serve_sigterm_drains_the_gateway_before_its_workers(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = genembed("serve", "--model", MODEL, "--port", str(port))
    with running(cmd, f"{url}/ready", env=ENV, log_path=tmp_path / "serve.log") as proc:
        workers = children(proc.pid)
        load = await start_load(url, "serve drain")
        proc.send_signal(signal.SIGTERM)  # the serve process only, as `docker stop` or `kill` would
        await apoll(lambda: httpx.get(f"{url}/ready").status_code == 503, 10, "/ready answers 503")
        assert all(alive(pid) for pid in workers)  # still computing what the gateway accepted
        assert_shutting_down(httpx.post(f"{url}/v1/embeddings", json=body("too late", 1), timeout=30))
        assert_all_answered(await load)
        assert await asyncio.to_thread(proc.wait, 60) == 128 + signal.SIGTERM
        assert not any(alive(pid) for pid in workers)
