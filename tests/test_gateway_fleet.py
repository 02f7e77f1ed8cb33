"""Several workers per model: worker entries, DNS re-resolution (an injected resolver in front of a real worker),
and two real workers behind one gateway: traffic spreads, a SIGKILLed one costs only retries, it comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections import Counter
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client import generate_latest

from model_server.protocol import EmbedItem, EmbedRequest
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings
from service.workers import WorkerGroup, resolve_addresses
from tests.gateway_fixtures import gateway_process
from tests.load import MODEL, apoll, body, items_done, poll, post_all, sample, texts
from tests.procs import genembed, running, worker_process


def test_worker_entries_group_by_model():
    s = GatewaySettings(workers=["a=http://x:1", "b=http://y:1", "a=http://z:2/", "a=dns+http://workers:8001"])
    assert s.worker_urls() == {"a": ["http://x:1", "http://z:2", "dns+http://workers:8001"], "b": ["http://y:1"]}


async def test_the_system_resolver_gives_every_address():
    assert "127.0.0.1" in await resolve_addresses("localhost", 80)


@pytest.mark.slow
async def test_dns_names_are_re_resolved(minilm_worker):
    """Addresses that appear join after a probe (one with no worker behind it never gets work); an address that
    vanishes leaves rotation at once but its call in flight finishes; a failed lookup keeps the members."""
    port = urlsplit(minilm_worker).port
    one, two = f"http://127.0.0.1:{port}", f"http://127.0.0.2:{port}"  # the worker listens on 127.0.0.1 only
    answer: list[str] | OSError = ["127.0.0.1"]
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, p: int) -> list[str]:
        asked.append((host, p))
        if isinstance(answer, OSError):
            raise answer
        return list(answer)

    settings = GatewaySettings(workers=[f"{MODEL}=dns+http://workers.test:{port}"], request_timeout_s=120)
    metrics = GatewayMetrics()
    group = WorkerGroup(MODEL, settings.worker_urls()[MODEL], settings, metrics, resolver)
    try:
        assert group.members == {} and not group.ready
        await group.resolve()
        assert asked == [("workers.test", port)]
        assert list(group.members) == [one] and group.ready_count == 1

        answer = ["127.0.0.1", "127.0.0.2"]
        await group.resolve()
        assert set(group.members) == {one, two}
        assert group.ready_count == 1 and not group.members[two].ready  # probed: nothing answers there
        request = EmbedRequest([EmbedItem(text=t, input_type="document", steps=0) for t in texts("dns", 4)])
        deadline = asyncio.get_running_loop().time() + 120
        for _ in range(4):
            assert len((await group.embed(request, deadline)).results) == 4  # all on the ready one

        # The ready address vanishes while a call is in flight there: no new work, the call still completes.
        first = group.members[one]
        big = EmbedRequest([EmbedItem(text=t, input_type="document", steps=0) for t in texts("drain", 64, 60)])
        call = asyncio.create_task(group.embed(big, deadline))
        await apoll(lambda: first.outstanding > 0, 10, "the call reached the worker")
        answer = ["127.0.0.2"]
        await group.resolve()
        assert list(group.members) == [two] and not group.ready
        assert not call.done()
        assert len((await call).results) == 64
        series = f'worker="{one}"'  # its metrics go once its last call has ended and the client is closed
        await apoll(lambda: series not in generate_latest(metrics.registry).decode(), 10, "the old member closed")

        answer = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        await group.resolve()
        assert list(group.members) == [two]  # a lookup failure changes nothing
        answer = ["127.0.0.1"]
        await group.resolve()
        assert list(group.members) == [one] and group.ready  # a new client for the address that came back
    finally:
        await group.aclose()


@pytest.mark.slow
async def test_two_workers_share_the_load_and_survive_a_kill(minilm_worker, tmp_path):
    env = {"GENEMBED_CACHE_MAX_MB": "0", "GENEMBED_WORKER_PROBE_INTERVAL_S": "0.5", "GENEMBED_REQUEST_TIMEOUT_S": "60"}
    with worker_process(MODEL, tmp_path) as (doomed, doomed_proc):
        stays = minilm_worker
        with gateway_process(tmp_path, {MODEL: [doomed, stays]}, env) as (url, _):
            card = httpx.get(f"{url}/v1/models/{MODEL}").json()
            assert (card["workers"], card["workers_ready"]) == (2, 2)

            # Traffic spreads: both workers answer inputs, and the gateway routed calls to each.
            before = {w: items_done(w) for w in (doomed, stays)}
            responses = await post_all(url, [body(f"spread {r}", 8) for r in range(24)], concurrency=6)
            assert Counter(r.status_code for r in responses) == {200: 24}
            for worker in (doomed, stays):
                assert items_done(worker) > before[worker], f"{worker} got no work"
                assert sample(url, "genembed_gateway_worker_calls_total", worker=worker, outcome="ok") > 0

            # One is SIGKILLed while it has calls in flight: those are retried on the other; nothing fails.
            load = asyncio.create_task(post_all(url, [body(f"kill {r}", 16) for r in range(36)], concurrency=6))
            await apoll(
                lambda: sample(url, "genembed_gateway_worker_outstanding_items", worker=doomed) > 0,
                30,
                "a call in flight on the doomed worker",
            )
            os.kill(doomed_proc.pid, signal.SIGKILL)
            responses = await load
            assert Counter(r.status_code for r in responses) == {200: 36}, [r.text[:200] for r in responses]
            assert all(len(r.json()["data"]) == 16 for r in responses)
            assert sample(url, "genembed_gateway_worker_retries_total", model=MODEL) >= 1
            card = httpx.get(f"{url}/v1/models/{MODEL}").json()
            assert (card["ready"], card["workers"], card["workers_ready"]) == (True, 2, 1)
            assert httpx.get(f"{url}/ready").status_code == 200  # one worker per model is enough
            assert sample(url, "genembed_gateway_workers_ready", model=MODEL) == 1

            # It comes back on the same address: the probe takes it back and it gets work again.
            port = str(urlsplit(doomed).port)
            cmd = genembed("worker", "--model", MODEL, "--port", port)
            with running(cmd, f"{doomed}/ready", log_path=tmp_path / "worker-back.log"):
                poll(
                    lambda: httpx.get(f"{url}/v1/models/{MODEL}").json()["workers_ready"] == 2,
                    30,
                    "the gateway took the worker back",
                )
                before = items_done(doomed)
                responses = await post_all(url, [body(f"back {r}", 8) for r in range(24)], concurrency=6)
                assert Counter(r.status_code for r in responses) == {200: 24}
                assert items_done(doomed) > before, "the worker that came back got no work"
