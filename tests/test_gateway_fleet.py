"""Several workers per model: worker entries, DNS re-resolution (an injected resolver in front of a real worker),
two real workers behind one gateway (traffic spreads, a SIGKILLed one costs only retries, it comes back), and
routing by the workers' reported backlog against scripted stand-in workers over real HTTP (the only way to make a
worker report a chosen drain time): the earliest expected finish wins, a 429 sends the call to the next worker,
the smallest Retry-After reaches the caller, a 400 exceeds_deadline is final, and batch calls wait out refusals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.protocol import (
    CONTENT_TYPE,
    DRAIN_HEADER,
    EXCEEDS_DEADLINE,
    QUEUED_HEADER,
    EmbedItem,
    EmbedRequest,
    EmbedResponse,
    ItemResult,
    ModelInfo,
)
from harness.procs import app_in_thread, genembed, running, worker_process
from service.coalescer import Coalescer, WorkItem
from service.errors import InvalidRequest, Overloaded
from service.loop_lag import LoopLag
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings
from service.workers import WorkerGroup, resolve_addresses
from tests.gateway_fixtures import gateway_process
from tests.load import MODEL, apoll, body, items_done, poll, post_all, sample, texts


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


# -- routing against stand-in workers --------------------------------------------------------------------------

INFO = ModelInfo(
    id="stand-in", method="pooled", dimension=2, min_refinement_steps=0, max_refinement_steps=0,
    default_refinement_steps=0, max_input_tokens=64, vocab_size=100, dtype="float32", device="cpu", revision="r1",
)  # fmt: skip


@dataclasses.dataclass
class StandIn:
    """A worker that answers /embed as scripted, after `hold` seconds: `refusals` 429s first (Retry-After
    `retry_after`), or always `status` with `code`; every answer and GET /load report `drain_s`. It records the
    calls it got."""

    hold: float = 0.0
    drain_s: float = 0.0
    queued: int = 0
    refusals: int = 0
    retry_after: int = 1
    status: int = 200
    code: str | None = None
    calls: list[EmbedRequest] = dataclasses.field(default_factory=list)

    def backlog(self) -> dict[str, str]:
        return {DRAIN_HEADER: str(self.drain_s), QUEUED_HEADER: str(self.queued)}

    async def embed(self, request: Request) -> Response:
        call = EmbedRequest.decode(await request.body())
        self.calls.append(call)
        await asyncio.sleep(self.hold)
        if self.refusals > 0 or self.status == 429:
            self.refusals -= 1
            headers = {**self.backlog(), "Retry-After": str(self.retry_after)}
            return JSONResponse({"detail": "busy", "code": "overloaded"}, 429, headers=headers)
        if self.status != 200:
            return JSONResponse({"detail": f"scripted {self.status}", "code": self.code}, self.status, self.backlog())
        results = [ItemResult(prompt_tokens=1) for _ in call.items]
        vectors = np.ones((len(call.items), INFO.dimension), np.float32)
        body = EmbedResponse(INFO.dimension, results, vectors).encode()
        return Response(body, media_type=CONTENT_TYPE, headers=self.backlog())

    def app(self) -> Starlette:
        async def ready(_: Request) -> Response:
            return JSONResponse({"status": "ready"})

        async def info(_: Request) -> Response:
            return JSONResponse(INFO.to_json())

        async def load(_: Request) -> Response:
            waiting = {"online": self.queued, "batch": 0}
            return JSONResponse(
                {"drain_s": self.drain_s, "queued_seqs": self.queued, "running_seqs": 0, "waiting": waiting}
            )

        routes = [Route("/ready", ready), Route("/info", info), Route("/load", load)]
        return Starlette(routes=[*routes, Route("/embed", self.embed, methods=["POST"])])


@contextlib.asynccontextmanager
async def stand_in_group(*workers: StandIn, **settings: object) -> AsyncIterator[tuple[WorkerGroup, GatewayMetrics]]:
    """A WorkerGroup over the stand-ins (in their order), probed and with their /load read."""
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(app_in_thread(w.app())) for w in workers]
        config = GatewaySettings(workers=[f"{MODEL}={url}" for url in urls], **settings)
        metrics = GatewayMetrics()
        group = WorkerGroup(MODEL, config.worker_urls()[MODEL], config, metrics)
        try:
            await group.probe()
            await group.poll_load()
            assert group.ready_count == len(workers)
            yield group, metrics
        finally:
            await group.aclose()


def request(n: int = 2) -> EmbedRequest:
    return EmbedRequest([EmbedItem(text=f"input {i}", steps=0) for i in range(n)], "req-1")


def retries(metrics: GatewayMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "genembed_gateway_worker_retries_total", {"model": MODEL, "reason": reason}
    )


async def test_calls_go_to_the_worker_expected_to_finish_first():
    busy, light = StandIn(drain_s=6.0, queued=12, hold=1.0), StandIn(drain_s=0.5, queued=1, hold=1.0)
    async with stand_in_group(busy, light) as (group, _):
        deadline = asyncio.get_running_loop().time() + 10
        await group.embed(request(), deadline)
        assert (len(busy.calls), len(light.calls)) == (0, 1)  # /load said 6 s against 0.5 s
        sent = light.calls[0]
        assert 0 < sent.deadline_s <= 10 and sent.priority == "online"
        # What this gateway sends counts until the next report: at the light one's 0.5 s per sequence, twelve
        # sequences in flight there (six calls of two) make it finish later than the busy one.
        await asyncio.gather(*(group.embed(request(2), deadline) for _ in range(8)))
        assert len(light.calls) >= 1 + 6 and len(busy.calls) >= 1
        # A report moves the traffic: now the light one holds 30 s of work and the busy one none.
        light.drain_s, light.queued, busy.drain_s = 30.0, 60, 0.0
        await group.poll_load()
        before = len(busy.calls)
        await group.embed(request(), deadline)
        assert len(busy.calls) == before + 1


async def test_a_refusal_sends_the_call_to_the_next_worker_and_the_smallest_retry_after_wins():
    refusing, taking = StandIn(status=429, retry_after=7), StandIn(drain_s=1.0, queued=2)
    async with stand_in_group(refusing, taking) as (group, metrics):
        deadline = asyncio.get_running_loop().time() + 10
        response = await group.embed(request(3), deadline)  # tried on the refusing one first: it reports less
        assert len(response.results) == 3
        assert (len(refusing.calls), len(taking.calls)) == (1, 1)
        assert retries(metrics, "refused") == 1
        assert taking.calls[0].deadline_s < refusing.calls[0].deadline_s  # the time left when each try left

    slow, soon = StandIn(status=429, retry_after=7), StandIn(status=429, retry_after=3, drain_s=1.0)
    async with stand_in_group(slow, soon) as (group, _):
        with pytest.raises(Overloaded) as refused:
            await group.embed(request(), asyncio.get_running_loop().time() + 10)
        assert refused.value.retry_after == 3
        assert refused.value.message == (
            f"model '{MODEL}' is overloaded: 2 workers refused the request; retry after 3 s (the first: busy)"
        )
        assert len(slow.calls) == len(soon.calls) == 1  # each worker once


async def test_a_call_that_can_never_fit_its_deadline_is_not_tried_elsewhere():
    first, second = StandIn(status=400, code=EXCEEDS_DEADLINE), StandIn(drain_s=1.0, queued=1)
    async with stand_in_group(first, second) as (group, _):
        with pytest.raises(InvalidRequest) as rejected:
            await group.embed(request(), asyncio.get_running_loop().time() + 10)
        assert rejected.value.code == EXCEEDS_DEADLINE and rejected.value.message == "scripted 400"
        assert (len(first.calls), len(second.calls)) == (1, 0)


async def test_batch_calls_wait_out_refusals_and_online_calls_do_not():
    worker = StandIn(refusals=2, retry_after=1)
    async with stand_in_group(worker, worker_probe_interval_s=0.2) as (group, metrics):
        settings = GatewaySettings(workers=[f"{MODEL}=http://unused:1"])
        coalescer = Coalescer(MODEL, group, settings, metrics, LoopLag(metrics))
        work = [WorkItem(f"k{i}".encode(), EmbedItem(text=f"batch {i}", steps=0)) for i in range(3)]
        done = await coalescer.embed(work, None, "batch-1", "batch")
        assert len(done.outcomes) == 3 and all(o.vector is not None for o in done.outcomes)
        assert len(worker.calls) == 3  # two refusals waited out, then answered
        assert all(c.priority == "batch" and c.deadline_s is None for c in worker.calls)
        assert done.queue_s >= 2  # it waited the two Retry-Afters in the gateway

        worker.refusals = 1
        with pytest.raises(Overloaded):
            await coalescer.embed(work, asyncio.get_running_loop().time() + 10, "online-1")
        assert worker.calls[-1].priority == "online"
        await coalescer.aclose()


async def test_batch_work_in_flight_leaves_the_gateways_bounds_to_online_requests():
    worker = StandIn(hold=1.0)
    async with stand_in_group(worker) as (group, metrics):
        settings = GatewaySettings(workers=[f"{MODEL}=http://unused:1"], max_queued_items=8, max_worker_calls=1)
        coalescer = Coalescer(MODEL, group, settings, metrics, LoopLag(metrics))

        def work(tag: str, n: int) -> list[WorkItem]:
            return [WorkItem(f"{tag}{i}".encode(), EmbedItem(text=f"{tag} {i}", steps=0)) for i in range(n)]

        batch = asyncio.create_task(coalescer.embed(work("batch", 8), None, "batch-1", "batch"))
        await apoll(lambda: len(worker.calls) == 1, 10, "the batch call reached the worker")
        deadline = asyncio.get_running_loop().time() + 10
        # Eight batch inputs in one call are in flight: an online request still finds both bounds free...
        first, second = await asyncio.gather(
            coalescer.embed(work("online", 4), deadline, "online-1"),
            coalescer.embed(work("other", 4), deadline, "online-2"),
            return_exceptions=True,
        )
        # ...and the online bound (one call) holds among online requests.
        assert len(first.outcomes) == 4
        assert isinstance(second, Overloaded) and "1 worker calls are in flight, the bound is 1" in second.message
        assert len((await batch).outcomes) == 8
        await coalescer.aclose()


async def test_a_gateway_behind_its_event_loop_refuses_new_online_work_until_it_catches_up():
    """The wait before a handler runs counts against no deadline: past `max_loop_lag_s` of it, online requests get a
    quick 429 (batch work is never refused for load); once the loop is on time again, they are served."""
    worker = StandIn()
    async with stand_in_group(worker) as (group, metrics):
        settings = GatewaySettings(workers=[f"{MODEL}=http://unused:1"], max_loop_lag_s=0.3)
        lag = LoopLag(metrics)
        coalescer = Coalescer(MODEL, group, settings, metrics, lag)
        lag.start()
        await asyncio.sleep(0.25)  # a few samples on time
        assert lag.seconds() < 0.3

        def work(tag: str) -> list[WorkItem]:
            return [WorkItem(tag.encode(), EmbedItem(text=tag, steps=0))]

        time.sleep(0.6)  # the loop is held, as by a burst of handlers on a starved CPU
        assert lag.seconds() >= 0.5  # the pending sample is that overdue
        with pytest.raises(Overloaded, match="behind its requests"):
            await coalescer.embed(work("late"), asyncio.get_running_loop().time() + 10, "online-1")
        assert len(worker.calls) == 0
        await asyncio.sleep(0.01)  # the overdue sample lands first
        assert metrics.registry.get_sample_value("genembed_gateway_event_loop_lag_seconds") >= 0.5
        batch = await coalescer.embed(work("batch"), None, "batch-1", "batch")
        assert batch.outcomes[0].vector is not None
        await asyncio.sleep(0.3)  # on time again
        done = await coalescer.embed(work("on time"), asyncio.get_running_loop().time() + 10, "online-2")
        assert done.outcomes[0].vector is not None
        await coalescer.aclose()
        await lag.aclose()
