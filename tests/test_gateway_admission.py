"""Admission under concurrent load (issue 17): an idle or lightly loaded model never refuses, configured bounds
refuse the excess with 429 + Retry-After, a request still queued at its deadline gets 503 (never a hang), a
worker's own 429 reaches the client, and a step range is granted fewer steps before anyone is refused."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import httpx
import pytest

from service.admission import CostModel, Work, step_cap
from tests.gateway_fixtures import gateway_process
from tests.procs import worker_process

GIRCSE, MINILM = "smollm2-gircse", "minilm-l6"


def _assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["type"] == ("rate_limit_error" if status == 429 else "server_error")
    assert int(response.headers["retry-after"]) >= 1
    return error


# -- the cost model on its own ---------------------------------------------------------------------


def _period(calls: int, items: int, tokens_each: int, steps_each: int) -> tuple[Work, float]:
    """A busy period costing 0.05 s a call, 1 ms a token and 4 ms a step."""
    work = Work(calls, items, items * tokens_each, items * steps_each)
    return work, 0.05 * calls + 0.001 * work.tokens + 0.004 * work.steps


def _observe(model: CostModel, periods: list[tuple[Work, float]]) -> None:
    now = 0.0
    for work, seconds in periods:
        model.call_started(now)
        now += seconds
        model.call_finished(now, work)


def test_a_lone_warm_up_call_gives_no_estimate():
    model = CostModel()
    _observe(model, [_period(1, 1, 12, 5)])
    assert model.seconds(Work(8, 256, 256 * 12, 256 * 5)) is None


def test_the_fit_separates_call_overhead_from_token_and_step_cost():
    model = CostModel()
    shapes = [(1, 1, 12, 5), (1, 32, 20, 5), (2, 64, 8, 0), (1, 16, 40, 20), (3, 96, 12, 10), (1, 8, 30, 1)]
    _observe(model, [_period(*shape) for shape in shapes * 3])
    per_call, per_token, per_step = model.coefficients
    assert per_call == pytest.approx(0.05, rel=0.05)
    assert per_token == pytest.approx(0.001, rel=0.05)
    assert per_step == pytest.approx(0.004, rel=0.05)
    # A burst of 256 single queries at K = 5 in 8 calls: about 8 * 0.05 + 256 * (12 ms + 20 ms), not minutes.
    assert model.seconds(Work(8, 256, 256 * 12, 256 * 5)) == pytest.approx(0.4 + 256 * 0.032, rel=0.05)


def test_a_workers_calibration_is_a_prior_and_the_larger_estimate_counts():
    model = CostModel()
    burst = Work(8, 256, 256 * 12, 256 * 5)
    # Calibration: calls one at a time, 1, 8 and 32 inputs at K = 5 and 32 at K = 0 (as the worker times them).
    model.seed(
        [
            [w.calls, w.items, w.tokens, w.steps, s]
            for w, s in (_period(1, n, 12, k) for n, k in ((1, 5), (8, 5), (32, 5), (32, 0)))
        ]
    )
    assert model.seconds(burst) == pytest.approx(0.4 + 256 * 0.032, rel=0.05)
    # An own fit that puts everything on calls (steady single queries) would call the burst cheap: it does not win.
    _observe(model, [(Work(1, n, 12 * n, 5 * n), 0.5) for n in (4, 6, 8, 6, 4)])
    assert model.coefficients[2] == pytest.approx(0, abs=1e-4)  # its per-step cost
    assert model.seconds(burst) == pytest.approx(0.4 + 256 * 0.032, rel=0.05)


def test_failed_calls_are_not_measured():
    model = CostModel()
    _observe(model, [_period(1, 32, 20, 5)] * 3)
    before = model.coefficients
    model.call_started(100.0)
    model.call_finished(160.0, None)  # a minute of a failed call says nothing about the cost
    _observe(model, [_period(1, 32, 20, 5)])
    assert model.coefficients == pytest.approx(before, rel=1e-6)


def test_step_ranges_shed_as_the_queue_fills():
    # 21 s allowed (0.7 of 30): full range up to 10.5 s of work ahead, then linearly down to the floor at 21 s.
    caps = [step_cap(wait, 21.0, 1, 10) for wait in (None, 0.0, 10.5, 12.0, 15.75, 20.0, 21.0, 40.0)]
    assert caps == [10, 10, 10, 8, 5, 1, 1, 1]


# -- gateways over real workers -------------------------------------------------------------------


async def test_an_idle_server_absorbs_bursts_after_a_light_warm_up(served):
    queries = [{"model": GIRCSE, "input": f"burst query {i} about admission", "refinement_steps": 5} for i in range(64)]
    batches = [
        {"model": MINILM, "input": [f"batch {b} document {i} about indexing" for i in range(128)]} for b in range(4)
    ]
    async with httpx.AsyncClient(base_url=served, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        for model, burst in ((GIRCSE, queries), (MINILM, batches)):
            # the one-input warm-up that used to make every later burst look like minutes of work
            assert (await client.post("/v1/embeddings", json={"model": model, "input": "warm up"})).status_code == 200
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json=body) for body in burst))
            statuses = Counter(r.status_code for r in responses)
            assert statuses == {200: len(burst)}, [r.text for r in responses if r.status_code != 200]


async def test_a_low_queue_bound_refuses_the_excess_with_429(minilm_worker, tmp_path):
    env = {
        "GENEMBED_MAX_QUEUED_ITEMS": "40",
        "GENEMBED_BATCH_MAX_ITEMS": "4",
        "GENEMBED_MAX_CONCURRENT_CALLS": "1",
        "GENEMBED_CACHE_MAX_MB": "0",
    }
    with gateway_process(tmp_path, {MINILM: minilm_worker}, env) as (url, _):
        bodies = [{"model": MINILM, "input": [f"request {r} sentence {i}" for i in range(16)]} for r in range(12)]
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=20)) as client:
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))
        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        # The bound holds 40 inputs: the first request (idle) and one more are taken whatever else happens.
        assert 2 <= statuses[200] <= 3, statuses
        for response in responses:
            if response.status_code == 429:
                error = _assert_openai_error(response, 429, "overloaded")
                assert "model 'minilm-l6' is overloaded" in error["message"] and "the bound is 40" in error["message"]
        metrics = httpx.get(f"{url}/metrics").text
        assert f'genembed_gateway_rejections_total{{reason="overloaded"}} {statuses[429]}.0' in metrics
        # Drained, it serves again.
        assert httpx.post(f"{url}/v1/embeddings", json=bodies[0], timeout=60).status_code == 200


async def test_a_request_still_queued_at_its_deadline_gets_503(minilm_worker, tmp_path):
    # An estimate that turns out wrong (a noisy neighbour, a slower worker) is what leaves accepted inputs queued
    # at their deadline; a share far above 1 makes admission take work it expects to miss the deadline.
    env = {
        "GENEMBED_ADMISSION_DEADLINE_SHARE": "1000",
        "GENEMBED_REQUEST_TIMEOUT_S": "1",
        "GENEMBED_BATCH_MAX_ITEMS": "8",
        "GENEMBED_MAX_CONCURRENT_CALLS": "1",
        "GENEMBED_CACHE_MAX_MB": "0",
    }
    long_text = "lorem ipsum dolor sit amet " * 40
    with gateway_process(tmp_path, {MINILM: minilm_worker}, env) as (url, _):
        bodies = [{"model": MINILM, "input": [f"{r}.{i} {long_text}" for i in range(64)]} for r in range(4)]
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            responses = await asyncio.wait_for(
                asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies)), timeout=20
            )
        statuses = Counter(r.status_code for r in responses)
        assert statuses[503] >= 1 and set(statuses) <= {200, 503, 504}, statuses
        for response in responses:
            if response.status_code == 503:
                error = _assert_openai_error(response, 503, "queue_timeout")
                assert "still queued when its 1 s deadline passed" in error["message"]
        # Nothing is left behind: the gateway's queue is empty again.
        metrics = httpx.get(f"{url}/metrics").text
        assert re.search(r'genembed_gateway_queued_items\{model="minilm-l6"\} 0\.0', metrics), metrics


def test_a_workers_own_429_reaches_the_client(tmp_path):
    env = {"GENEMBED_WORKER_MAX_WAITING_SEQS": "2"}
    with (
        worker_process(MINILM, tmp_path, env=env) as (worker, _),
        gateway_process(tmp_path, {MINILM: worker}) as (url, _),
    ):
        body = {"model": MINILM, "input": [f"sentence {i}" for i in range(8)]}
        response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
        error = _assert_openai_error(response, 429, "overloaded")
        assert "the worker for model 'minilm-l6' is at capacity" in error["message"]
        assert response.headers["retry-after"] == "1"


async def test_a_step_range_is_shed_before_requests_are(gircse_worker, tmp_path):
    # Token-id inputs make the work units exact: 10 tokens + K steps x 16 each. The blocker holds
    # 2 x (10 + 20 x 16) = 660 units; with a bound of 760, a 1..10 range fits at K = 5 (90 units) but not at 6.
    env = {
        "GENEMBED_MAX_QUEUED_WORK": "760",
        "GENEMBED_BATCH_MAX_ITEMS": "1",
        "GENEMBED_MAX_CONCURRENT_CALLS": "1",
        "GENEMBED_CACHE_MAX_MB": "0",
    }
    ids = [[100 + 7 * j + i for i in range(10)] for j in range(4)]
    with gateway_process(tmp_path, {GIRCSE: gircse_worker}, env) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            idle = await client.post(
                "/v1/embeddings", json={"model": GIRCSE, "input": ids[3], "refinement_steps": {"min": 1, "max": 10}}
            )
            assert [d["refinement_steps"] for d in idle.json()["data"]] == [10]  # idle: the most it allows
            blocker = asyncio.create_task(
                client.post("/v1/embeddings", json={"model": GIRCSE, "input": ids[:2], "refinement_steps": 20})
            )
            await asyncio.sleep(0.3)
            # Both arrive while the blocker is pending; whichever comes first, the range fits at K = 5 and K = 10 not.
            ranged, fixed = await asyncio.gather(
                client.post(
                    "/v1/embeddings",
                    json={"model": GIRCSE, "input": [ids[2]], "refinement_steps": {"min": 1, "max": 10}},
                ),
                client.post("/v1/embeddings", json={"model": GIRCSE, "input": [ids[2]], "refinement_steps": 10}),
            )
            assert (await blocker).status_code == 200
        assert ranged.status_code == 200, ranged.text
        assert [d["refinement_steps"] for d in ranged.json()["data"]] == [5]
        _assert_openai_error(fixed, 429, "overloaded")  # the same input at a fixed K = 10 is refused
        metrics = httpx.get(f"{url}/metrics").text
        assert 'genembed_gateway_steps_shed_total{model="smollm2-gircse"} 5.0' in metrics
        bad = httpx.post(
            f"{url}/v1/embeddings", json={"model": GIRCSE, "input": "x", "refinement_steps": {"min": 3, "max": 30}}
        )
        assert bad.status_code == 400 and "0..20" in bad.json()["error"]["message"]
