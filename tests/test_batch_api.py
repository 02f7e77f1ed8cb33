"""The Batch API through the official `openai` client against real gateways, a real minilm-l6 worker, real Redis
(the cache) and a real S3-compatible server (moto's): the round trip, bad lines, validation, files, cancel, a
gateway killed mid-batch, and two gateways sharing a bucket."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from harness.procs import free_port, genembed, running, worker_process
from service.batches.models import Batch, RequestCounts, StoredBatch, new_id
from service.batches.storage import LocalStore
from service.batches.store import BatchStore
from tests.gateway_fixtures import gateway_process, redis_process
from tests.s3 import gateway_env, moto_s3

MODEL = "minilm-l6"
FAST = {"GENEMBED_BATCH_CHECKPOINT_S": "0.2", "GENEMBED_BATCH_POLL_S": "0.2"}
FINAL = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def worker_and_process(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    """minilm-l6 in fp32: a line's vector and /v1/embeddings' agree to fp32 rounding whatever they were batched with."""
    with worker_process(MODEL, tmp_path_factory.mktemp("batch-worker"), "--dtype", "float32") as running_worker:
        yield running_worker


@pytest.fixture(scope="module")
def worker(worker_and_process) -> str:
    return worker_and_process[0]


@pytest.fixture(scope="module")
def gateway(worker, tmp_path_factory) -> Iterator[str]:
    """A gateway with two API keys, a Redis cache and its batches in a directory."""
    tmp = tmp_path_factory.mktemp("batch-gateway")
    with redis_process(tmp) as (redis_url, _):
        env = {
            **FAST,
            "GENEMBED_BATCH_DIR": str(tmp / "batches"),
            "GENEMBED_API_KEYS": "key-a,key-b",
            "GENEMBED_REDIS_URL": redis_url,
        }
        with gateway_process(tmp, {MODEL: worker}, env) as (url, _):
            yield url


@pytest.fixture(scope="module")
def reference(worker, tmp_path_factory) -> Iterator[str]:
    """Another gateway (its own cache) in front of the same worker: /v1/embeddings computed afresh."""
    with gateway_process(tmp_path_factory.mktemp("reference"), {MODEL: worker}) as (url, _):
        yield url


def client(url: str, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def line(custom_id: str, body: dict, **overrides: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body} | overrides


def upload(api: openai.OpenAI, lines: list[dict] | list[str]) -> str:
    text = "\n".join(item if isinstance(item, str) else json.dumps(item) for item in lines) + "\n"
    return api.files.create(file=("input.jsonl", io.BytesIO(text.encode())), purpose="batch").id


def run(api: openai.OpenAI, lines: list[dict], **extra: object):
    batch = api.batches.create(
        input_file_id=upload(api, lines), endpoint="/v1/embeddings", completion_window="24h", **extra
    )
    assert batch.status == "validating"
    return wait(api, batch.id)


def wait(api: openai.OpenAI, batch_id: str, until=lambda b: b.status in FINAL, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        batch = api.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)


def records(api: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(row) for row in api.files.content(file_id).text.splitlines()]


def vectors(body: dict) -> np.ndarray:
    """A /v1/embeddings answer's vectors, whichever encoding it used."""
    rows = [
        np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str) else d["embedding"]
        for d in body["data"]
    ]
    return np.asarray(rows, dtype=np.float64)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for row in text.splitlines():
        if row.startswith(f"{name}{{") and row.split("{")[1].split("}")[0] == want:
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def texts(prefix: str, count: int, per_line: int = 1) -> list[list[str]]:
    """Distinct inputs (no cache hits between lines or tests)."""
    return [
        [f"{prefix} line {i} input {j}: a sentence about batch {prefix}" for j in range(per_line)] for i in range(count)
    ]


def test_the_openai_client_round_trip_gives_v1_embeddings_vectors(gateway, reference) -> None:
    api = client(gateway)
    bodies = [{"model": MODEL, "input": t[0]} for t in texts("round", 6)]
    bodies += [
        {"model": MODEL, "input": ["three", "inputs in", "one line"], "input_type": "document"},
        {"model": MODEL, "input": "cut and encoded", "dimensions": 64, "encoding_format": "base64"},
    ]
    lines = [line(f"req-{i}", body) for i, body in enumerate(bodies)]
    batch = run(api, lines, metadata={"corpus": "round-trip"})

    assert batch.status == "completed", batch
    assert batch.request_counts.total == batch.request_counts.completed == len(lines)
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.metadata == {"corpus": "round-trip"}
    assert batch.in_progress_at <= batch.finalizing_at <= batch.completed_at <= batch.expires_at
    output = records(api, batch.output_file_id)
    assert sorted(r["custom_id"] for r in output) == sorted(item["custom_id"] for item in lines)
    for record in output:
        body = bodies[int(record["custom_id"].removeprefix("req-"))]
        assert record["error"] is None and record["id"].startswith("batch_req_")
        assert record["response"]["status_code"] == 200 and record["response"]["request_id"]
        got = vectors(record["response"]["body"])
        expected = vectors(httpx.post(f"{reference}/v1/embeddings", json=body, timeout=60).json())
        assert got.shape == expected.shape
        cosines = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        assert cosines.min() >= 0.99999, (record["custom_id"], cosines)
    out_file = api.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output"
    assert out_file.bytes == len(api.files.content(batch.output_file_id).content)
    assert batch.id in [b.id for b in api.batches.list(limit=100).data]


def test_a_bad_line_goes_to_the_error_file_and_the_rest_complete(gateway) -> None:
    api = client(gateway)
    good = [line(f"ok-{i}", {"model": MODEL, "input": t[0]}) for i, t in enumerate(texts("bad-line", 3))]
    bad = [
        line("no-such-model", {"model": "no-such-model", "input": "x"}),
        line("steps-on-pooled", {"model": MODEL, "input": "x", "refinement_steps": 2}),
    ]
    batch = run(api, [good[0], *bad, *good[1:]])

    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 2)
    assert sorted(r["custom_id"] for r in records(api, batch.output_file_id)) == ["ok-0", "ok-1", "ok-2"]
    errors = {r["custom_id"]: r for r in records(api, batch.error_file_id)}
    assert set(errors) == {"no-such-model", "steps-on-pooled"}
    assert errors["no-such-model"]["response"]["status_code"] == 404
    assert errors["no-such-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["steps-on-pooled"]["response"]["status_code"] == 400
    assert errors["steps-on-pooled"]["response"]["body"]["error"]["param"] == "refinement_steps"
    assert metric(gateway, "genembed_gateway_batch_lines_total", model="unknown", outcome="failed") >= 1


def test_faulty_input_lines_fail_the_batch_with_openai_errors(gateway) -> None:
    api = client(gateway)
    body = {"model": MODEL, "input": "fine"}
    lines = [
        json.dumps(line("a", body)),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/embeddings", "body": body}),
        json.dumps(line("a", body)),
        json.dumps(line("b", body, method="GET")),
        json.dumps(line("c", body, url="/v1/chat/completions")),
        json.dumps(line("d", {"model": MODEL, "input": "x", "temperature": 1})),
        json.dumps(line("e", {"model": MODEL, "input": []})),
    ]
    batch = run(api, lines)

    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    found = [(e.line, e.code, e.param) for e in batch.errors.data]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_method", "method"),
        (6, "invalid_url", "url"),
        (7, "invalid_request", "body.temperature"),
        (8, "invalid_request", "body.input"),
    ]
    empty = api.batches.create(input_file_id=upload(api, []), endpoint="/v1/embeddings", completion_window="24h")
    assert [e.code for e in wait(api, empty.id).errors.data] == ["empty_file"]


def test_what_the_api_refuses_it_refuses_in_openai_errors(gateway) -> None:
    api = client(gateway)
    file_id = upload(api, [line("x", {"model": MODEL, "input": "x"})])
    with pytest.raises(openai.BadRequestError, match="purpose"):
        api.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        api.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError, match="file-missing"):
        api.batches.create(input_file_id="file-missing", endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_missing")
    with pytest.raises(openai.AuthenticationError):
        client(gateway, key="wrong").files.list()
    done = run(api, [line("x", {"model": MODEL, "input": "x"})])
    with pytest.raises(openai.ConflictError, match="completed"):
        api.batches.cancel(done.id)


def test_files_are_listed_retrieved_and_deleted_per_key(gateway) -> None:
    api, other = client(gateway), client(gateway, "key-b")
    ids = [upload(api, [line(f"f{i}", {"model": MODEL, "input": "x"})]) for i in range(3)]
    theirs = upload(other, [line("g", {"model": MODEL, "input": "x"})])

    page = api.files.list(limit=2)
    assert [f.id for f in page.data] == [ids[2], ids[1]] and page.has_more
    rest = api.files.list(limit=2, after=ids[1])
    assert rest.data[0].id == ids[0]
    assert theirs not in [f.id for f in api.files.list().data]
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(theirs)
    with pytest.raises(openai.NotFoundError):
        api.batches.create(input_file_id=theirs, endpoint="/v1/embeddings", completion_window="24h")

    retrieved = api.files.retrieve(ids[0])
    assert (retrieved.purpose, retrieved.filename, retrieved.status) == ("batch", "input.jsonl", "processed")
    assert retrieved.bytes == len(api.files.content(ids[0]).content)
    assert json.loads(api.files.content(ids[0]).text)["custom_id"] == "f0"
    deleted = api.files.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        api.files.content(ids[0])


def test_the_cache_answers_lines_it_has_seen(gateway) -> None:
    api = client(gateway)
    lines = [line(f"c{i}", {"model": MODEL, "input": t[0]}) for i, t in enumerate(texts("cached", 4))]
    first = run(api, lines)
    again = run(api, lines)
    assert first.usage.input_tokens == again.usage.input_tokens > 0
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert again.usage.input_tokens_details.cached_tokens == again.usage.input_tokens


def test_cancel_stops_a_running_batch_and_keeps_what_was_done(gateway) -> None:
    api = client(gateway)
    lines = [line(f"l{i}", {"model": MODEL, "input": t}) for i, t in enumerate(texts("cancel", 400, per_line=16))]
    batch = api.batches.create(input_file_id=upload(api, lines), endpoint="/v1/embeddings", completion_window="24h")
    wait(api, batch.id, lambda b: b.request_counts.completed > 0)

    cancelling = api.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    cancelled = wait(api, batch.id, timeout=30)
    assert cancelled.status == "cancelled" and cancelled.cancelling_at <= cancelled.cancelled_at
    assert 0 < cancelled.request_counts.completed < len(lines)
    output = [r["custom_id"] for r in records(api, cancelled.output_file_id)]
    assert len(output) == len(set(output)) == cancelled.request_counts.completed
    lines_done = metric(gateway, "genembed_gateway_batch_lines_total", model=MODEL, outcome="completed")
    time.sleep(1.0)  # nothing of the batch runs any more
    assert metric(gateway, "genembed_gateway_batch_lines_total", model=MODEL, outcome="completed") == lines_done
    assert metric(gateway, "genembed_gateway_batch_lines_in_flight", model=MODEL) == 0


def test_a_batch_resumes_after_a_gateway_kill_without_redoing_lines(worker, tmp_path: Path) -> None:
    store = tmp_path / "batches"
    env = {**FAST, "GENEMBED_BATCH_DIR": str(store), "GENEMBED_BATCH_LEASE_S": "2", "GENEMBED_BATCH_MAX_IN_FLIGHT": "2"}
    lines = [line(f"l{i}", {"model": MODEL, "input": t}) for i, t in enumerate(texts("resume", 200, per_line=4))]
    with gateway_process(tmp_path, {MODEL: worker}, env) as (url, proc):
        api = client(url)
        batch = api.batches.create(input_file_id=upload(api, lines), endpoint="/v1/embeddings", completion_window="24h")
        record = store / "batches" / "meta" / f"{batch.id}.json"
        deadline = time.monotonic() + 120
        while json.loads(record.read_text())["progress"]["lines_done"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    written = json.loads(record.read_text())["progress"]["lines_done"]
    assert 5 <= written < len(lines)

    with gateway_process(tmp_path, {MODEL: worker}, env) as (url, _):
        api = client(url)
        done = wait(api, batch.id)
        assert done.status == "completed"
        assert done.request_counts.completed == len(lines)
        output = [r["custom_id"] for r in records(api, done.output_file_id)]
        assert sorted(output) == sorted(item["custom_id"] for item in lines)  # each line exactly once
        # The second gateway ran only the lines the first had not written.
        assert (
            metric(url, "genembed_gateway_batch_lines_total", model=MODEL, outcome="completed") == len(lines) - written
        )


def test_two_gateways_share_batches_in_s3_and_one_runs_each(worker, tmp_path: Path) -> None:
    with moto_s3() as endpoint:
        env = {**FAST, **gateway_env(endpoint, "shared/")}
        with (
            gateway_process(tmp_path, {MODEL: worker}, env) as (first, _),
            gateway_process(tmp_path, {MODEL: worker}, env) as (second, _),
        ):
            lines = [line(f"s{i}", {"model": MODEL, "input": t[0]}) for i, t in enumerate(texts("s3", 40))]
            batch = client(first).batches.create(
                input_file_id=upload(client(first), lines), endpoint="/v1/embeddings", completion_window="24h"
            )
            done = wait(client(second), batch.id)
            assert done.status == "completed" and done.request_counts.completed == len(lines)
            output = [r["custom_id"] for r in records(client(second), done.output_file_id)]
            assert sorted(output) == sorted(item["custom_id"] for item in lines)
            ran = [
                metric(u, "genembed_gateway_batch_lines_total", model=MODEL, outcome="completed")
                for u in (first, second)
            ]
            assert sum(ran) == len(lines)  # the lease: no line ran on both


def test_a_batch_waits_out_a_worker_restart(tmp_path: Path) -> None:
    """The worker dies mid-batch and comes back on its address: no line fails, none is answered twice."""
    port = free_port()
    command = genembed("worker", "--model", MODEL, "--port", str(port), "--dtype", "float32")
    worker = f"http://127.0.0.1:{port}"
    store = tmp_path / "batches"
    env = {**FAST, "GENEMBED_BATCH_DIR": str(store), "GENEMBED_BATCH_MAX_IN_FLIGHT": "2"}
    lines = [line(f"w{i}", {"model": MODEL, "input": t}) for i, t in enumerate(texts("worker-restart", 60, per_line=4))]
    with (
        running(command, f"{worker}/ready", log_path=tmp_path / "worker-1.log") as first,
        gateway_process(tmp_path, {MODEL: worker}, env) as (url, _),
    ):
        api = client(url)
        batch = api.batches.create(input_file_id=upload(api, lines), endpoint="/v1/embeddings", completion_window="24h")
        wait(api, batch.id, lambda b: b.request_counts.completed >= 5)
        first.kill()
        first.wait()
        with running(command, f"{worker}/ready", log_path=tmp_path / "worker-2.log"):
            done = wait(api, batch.id)
            output = sorted(r["custom_id"] for r in records(api, done.output_file_id))
    assert done.status == "completed" and done.error_file_id is None
    assert (done.request_counts.completed, done.request_counts.failed) == (len(lines), 0)
    assert output == sorted(item["custom_id"] for item in lines)


def test_a_batch_past_its_window_expires_with_its_lines_in_the_error_file(worker, tmp_path: Path) -> None:
    """A batch found after its completion window (here: written so by hand) is not run: every line not yet answered
    goes to the error file as `batch_expired`, as OpenAI writes it."""
    store = BatchStore(LocalStore(tmp_path / "batches"))
    lines = [line(f"e{i}", {"model": MODEL, "input": t[0]}) for i, t in enumerate(texts("expired", 5))]

    async def content() -> AsyncIterator[bytes]:
        yield "".join(json.dumps(item) + "\n" for item in lines).encode()

    async def a_day_old_batch() -> str:
        file = await store.add_file(None, "old.jsonl", "batch", content())
        now = int(time.time())
        batch = Batch(
            id=new_id("batch_"),
            endpoint="/v1/embeddings",
            input_file_id=file.id,
            completion_window="24h",
            status="in_progress",
            created_at=now - 25 * 3600,
            in_progress_at=now - 25 * 3600,
            expires_at=now - 3600,
            request_counts=RequestCounts(total=len(lines)),
        )
        await store.create_batch(StoredBatch(batch=batch, owner=None))
        return batch.id

    batch_id = asyncio.run(a_day_old_batch())
    with gateway_process(tmp_path, {MODEL: worker}, {**FAST, "GENEMBED_BATCH_DIR": str(tmp_path / "batches")}) as (
        url,
        _,
    ):
        api = client(url)
        done = wait(api, batch_id)
        errors = records(api, done.error_file_id)
    assert done.status == "expired" and done.expired_at is not None and done.output_file_id is None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, len(lines))
    assert [e["custom_id"] for e in errors] == [item["custom_id"] for item in lines]
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)


def test_a_gateway_that_shuts_down_releases_its_batches(worker_and_process, tmp_path: Path) -> None:
    """SIGTERM stops a running batch where it is and clears its lease: another gateway takes it over at once,
    not `batch_lease_s` later. The worker is paused from the first line written to the gateway's exit, so the batch
    cannot finish first however fast the machine."""
    worker, worker_proc = worker_and_process
    store = tmp_path / "batches"
    env = {
        **FAST,
        "GENEMBED_BATCH_DIR": str(store),
        "GENEMBED_BATCH_LEASE_S": "600",
        "GENEMBED_BATCH_MAX_IN_FLIGHT": "1",
    }
    lines = [line(f"t{i}", {"model": MODEL, "input": t}) for i, t in enumerate(texts("shutdown", 1000, per_line=8))]
    try:
        with gateway_process(tmp_path, {MODEL: worker}, env) as (url, _):
            api = client(url)
            batch = api.batches.create(
                input_file_id=upload(api, lines), endpoint="/v1/embeddings", completion_window="24h"
            )
            wait(api, batch.id, lambda b: b.request_counts.completed > 0)
            os.killpg(worker_proc.pid, signal.SIGSTOP)
            held = json.loads((store / "batches" / "meta" / f"{batch.id}.json").read_text())["progress"]
            assert held["lease_owner"] and held["lease_until"] > time.time()
    finally:
        os.killpg(worker_proc.pid, signal.SIGCONT)
    record = json.loads((store / "batches" / "meta" / f"{batch.id}.json").read_text())
    assert record["batch"]["status"] == "in_progress"
    assert (record["progress"]["lease_owner"], record["progress"]["lease_until"]) == (None, 0.0)
    assert 0 < record["progress"]["lines_done"] < len(lines)
