"""The worker process over HTTP: the contract, per-item errors, truncation, metrics."""

from __future__ import annotations

import asyncio
import struct
import time

import httpx
import msgpack
import numpy as np
import pytest

from common import protocol
from common.protocol import EmbedItem, EmbedRequest, EmbedResponse, ModelInfo


def _embed(url: str, *items: EmbedItem) -> EmbedResponse:
    r = httpx.post(f"{url}/embed", content=EmbedRequest(items=list(items)).encode(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == protocol.CONTENT_TYPE
    return EmbedResponse.decode(r.content)


def test_info_health_ready(gircse_worker):
    info = ModelInfo(**httpx.get(f"{gircse_worker}/info").json())
    assert (info.id, info.method, info.dimension) == ("smollm2-gircse", "gircse", 576)
    assert (info.min_refinement_steps, info.max_refinement_steps, info.default_refinement_steps) == (0, 20, 5)
    assert info.dtype == "float32" and len(info.revision) == 12
    assert httpx.get(f"{gircse_worker}/health").status_code == 200
    assert httpx.get(f"{gircse_worker}/ready").status_code == 200


def test_each_bad_item_fails_alone(gircse_worker):
    long_text = "word " * 700
    response = _embed(
        gircse_worker,
        EmbedItem(text="fine", steps=1),
        EmbedItem(text="x", steps=21),
        EmbedItem(text=""),
        EmbedItem(text=long_text, truncate=False),
        EmbedItem(token_ids=[5, 49152]),
        EmbedItem(token_ids=[]),
        EmbedItem(text="also fine", steps=0),
    )
    codes = [r.error.code if r.error else None for r in response.results]
    assert codes == [
        None,
        protocol.STEPS_OUT_OF_RANGE,
        protocol.EMPTY_INPUT,
        protocol.INPUT_TOO_LONG,
        protocol.TOKEN_OUT_OF_VOCAB,
        protocol.EMPTY_INPUT,
        None,
    ]
    assert "0..20" in response.results[1].error.message
    assert "512" in response.results[3].error.message
    assert response.vectors.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(response.vectors, axis=1), 1, rtol=1e-5)
    # the worker keeps serving
    assert _embed(gircse_worker, EmbedItem(text="still here", steps=1)).results[0].error is None


def test_truncation_cuts_the_body_not_the_template(gircse_worker):
    long_text = "word " * 700
    query, document = _embed(
        gircse_worker, EmbedItem(text=long_text, steps=1), EmbedItem(text=long_text, input_type="document", steps=1)
    ).results
    assert query.truncated and query.prompt_tokens == 512
    assert document.truncated and document.prompt_tokens == 512
    # the template's instruction survives: a different instruction gives a different vector
    a, b = _embed(
        gircse_worker,
        EmbedItem(text=long_text, steps=1, instruction="Find news"),
        EmbedItem(text=long_text, steps=1, instruction="Find recipes"),
    ).vectors
    assert float(a @ b) < 0.99999


def test_token_ids_input_matches_text(gircse_worker):
    from transformers import AutoTokenizer

    from tests.models import default_backbone_dir

    ids = AutoTokenizer.from_pretrained(default_backbone_dir())("a cat", add_special_tokens=False)["input_ids"]
    by_text, by_ids = _embed(
        gircse_worker,
        EmbedItem(text="a cat", input_type="document", steps=2),
        EmbedItem(token_ids=ids, input_type="document", steps=2),
    ).vectors
    np.testing.assert_allclose(by_text, by_ids, atol=1e-6)


def test_pooled_rejects_steps(minilm_worker):
    result = _embed(minilm_worker, EmbedItem(text="x", steps=1)).results[0]
    assert result.error.code == protocol.STEPS_OUT_OF_RANGE and "0..0" in result.error.message
    assert _embed(minilm_worker, EmbedItem(text="x")).results[0].error is None


def test_malformed_body_is_400(gircse_worker):
    r = httpx.post(f"{gircse_worker}/embed", content=b"\x00not msgpack")
    assert r.status_code == 400 and "malformed" in r.json()["detail"]


def test_metrics_exposed(gircse_worker):
    _embed(gircse_worker, EmbedItem(text="count me", steps=3))
    text = httpx.get(f"{gircse_worker}/metrics").text
    for name in (
        "genembed_worker_forward_seconds_bucket",
        "genembed_worker_batch_sequences_bucket",
        "genembed_worker_batch_tokens_bucket",
        "genembed_worker_refinement_steps_total",
        "genembed_worker_forward_errors_total",
        "genembed_worker_expected_drain_seconds",
        "genembed_worker_queued_sequences",
        "genembed_worker_cost_coefficient_seconds",
        "genembed_worker_cost_correction",
        "genembed_worker_admission_decisions_total",
        "genembed_worker_deadline_dropped_sequences_total",
        "genembed_worker_finish_error_seconds_bucket",
    ):
        assert name in text
    steps = [line for line in text.splitlines() if line.startswith("genembed_worker_refinement_steps_total")]
    assert float(steps[0].split()[-1]) >= 3
    startup = {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("genembed_worker_startup_seconds{")
    }
    assert set(startup) == {"load", "warmup"} and all(seconds > 0 for seconds in startup.values())


def test_unloadable_model_exits_with_the_reason(tmp_path):

    from harness.procs import free_port, genembed_exits

    spec = tmp_path / "broken.toml"
    spec.write_text(
        'id = "broken"\nbackbone = "pkg://genembed_no_such_pkg/w.gguf"\n'
        'backbone_install_hint = "pip install --no-deps genembed-no-such-pkg"\n'
    )
    done = genembed_exits("worker", "--model", str(spec), "--port", str(free_port()), timeout=60)
    assert done.returncode == 1
    assert "pip install --no-deps genembed-no-such-pkg" in done.stderr


def test_cross_encoder_worker_serves_pairs(tmp_path):
    from harness.procs import worker_process

    with worker_process("minilm-l6-cross-encoder", tmp_path) as (url, _):
        response = _embed(url, EmbedItem(text="a query", text_pair="a document"), EmbedItem(text="no pair"))
    assert response.results[0].error is None and response.vectors.shape == (1, 1)
    assert response.results[1].error.code == protocol.EMPTY_INPUT


# The fields of the first wire version: a gateway or worker one version behind knows only these.
V1_ITEM = {"text", "text_pair", "token_ids", "input_type", "instruction", "steps", "truncate", "seed", "samples"}
V1_RESULT = {"prompt_tokens", "steps", "truncated", "error"}


def test_a_plain_call_stays_in_the_first_wire_version(gircse_worker):
    """Rolling upgrades: requests that use no newer feature carry only first-version fields both ways."""
    plain = EmbedRequest(items=[EmbedItem(text="fine", steps=2)])
    assert set(msgpack.unpackb(plain.encode())["items"][0]) == V1_ITEM
    r = httpx.post(f"{gircse_worker}/embed", content=plain.encode(), timeout=60)
    (n,) = struct.unpack_from("<I", r.content)
    assert set(msgpack.unpackb(r.content[4 : 4 + n])["results"][0]) == V1_RESULT
    newer = EmbedRequest(items=[EmbedItem(text="fine", steps=2, trajectory=True)])
    assert set(msgpack.unpackb(newer.encode())["items"][0]) == V1_ITEM | {"trajectory"}
    # an item with a field this worker does not know is a 400 that names it
    unknown = msgpack.packb({"request_id": None, "items": [{"text": "fine", "from_the_future": 1}]})
    r = httpx.post(f"{gircse_worker}/embed", content=unknown, timeout=60)
    assert r.status_code == 400 and "from_the_future" in r.text


def _post(url: str, request: EmbedRequest, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/embed", content=request.encode(), timeout=timeout)


def _steps_run(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(
        next(line for line in text.splitlines() if line.startswith("genembed_worker_refinement_steps_total")).split()[
            -1
        ]
    )


def _assert_backlog_headers(r: httpx.Response) -> None:
    assert float(r.headers[protocol.DRAIN_HEADER]) >= 0
    assert int(r.headers[protocol.QUEUED_HEADER]) >= 0


def test_every_answer_and_load_carry_the_backlog(gircse_worker):
    r = _post(gircse_worker, EmbedRequest(items=[EmbedItem(text="fine", steps=1)], deadline_s=30))
    assert r.status_code == 200
    _assert_backlog_headers(r)
    malformed = httpx.post(f"{gircse_worker}/embed", content=b"\x00not msgpack")
    assert malformed.status_code == 400
    _assert_backlog_headers(malformed)
    load = httpx.get(f"{gircse_worker}/load")
    assert load.status_code == 200
    _assert_backlog_headers(load)
    body = load.json()
    assert set(body) == {"drain_s", "queued_seqs", "running_seqs", "waiting"}
    assert set(body["waiting"]) == {"online", "batch"}
    assert body["queued_seqs"] == body["running_seqs"] + body["waiting"]["online"] + body["waiting"]["batch"]


def test_a_call_that_cannot_fit_even_alone_is_refused_at_once(gircse_worker):
    before = _steps_run(gircse_worker)
    items = [EmbedItem(text=f"a sentence of several words, number {i}", steps=20) for i in range(64)]
    r = _post(gircse_worker, EmbedRequest(items=items, deadline_s=0.5))
    assert r.status_code == 400, r.text
    assert r.json()["code"] == protocol.EXCEEDS_DEADLINE
    assert "64 inputs" in r.json()["detail"] and "fewer inputs per request" in r.json()["detail"]
    _assert_backlog_headers(r)
    assert _steps_run(gircse_worker) == before, "no compute was spent on it"


def test_a_call_whose_deadline_passed_is_504(gircse_worker):
    r = _post(gircse_worker, EmbedRequest(items=[EmbedItem(text="late", steps=1)], deadline_s=0))
    assert r.status_code == 504 and r.json()["code"] == protocol.DEADLINE_PASSED


def test_a_step_range_is_granted_and_reported(gircse_worker):
    idle = _embed(gircse_worker, EmbedItem(text="ranged", steps=4, min_steps=1))
    assert idle.results[0].steps == 4, "an idle worker grants the whole range"
    bad = _embed(gircse_worker, EmbedItem(text="x", steps=2, min_steps=3), EmbedItem(text="y", steps=30, min_steps=1))
    assert [r.error.code for r in bad.results] == [protocol.STEPS_OUT_OF_RANGE] * 2
    assert "min=3 is larger than max=2" in bad.results[0].error.message
    assert "0..20" in bad.results[1].error.message


@pytest.mark.solo  # admitted at the speed measured, answered at the speed it gets
def test_a_heavy_burst_gets_200s_and_429s_and_no_late_answers(gircse_worker):
    """Many concurrent calls of 16 inputs against one worker: it accepts what it expects to finish within the
    deadline and refuses the rest at once with a Retry-After; nothing accepted is answered late or with a 504.
    A batch call sent in the same burst is not refused: it waits and is answered."""
    deadline_s = 20.0

    async def call(client: httpx.AsyncClient, i: int, priority: str = "online") -> tuple[int, float, httpx.Response]:
        items = [
            EmbedItem(text=f"burst call {i}, input {j}: a sentence of about ten words", steps=5) for j in range(16)
        ]
        request = EmbedRequest(items=items, deadline_s=deadline_s if priority == "online" else None, priority=priority)
        started = time.monotonic()
        r = await client.post(f"{gircse_worker}/embed", content=request.encode(), timeout=300)
        return r.status_code, time.monotonic() - started, r

    async def burst() -> list[tuple[int, float, httpx.Response]]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(call(client, -1, "batch"), *(call(client, i) for i in range(40)))

    (batch_status, _, _), *online = asyncio.run(burst())
    statuses = [status for status, _, _ in online]
    assert batch_status == 200
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1 and set(statuses) == {200, 429}, statuses
    for status, elapsed, r in online:
        _assert_backlog_headers(r)
        if status == 200:
            assert elapsed <= deadline_s, f"an accepted call was answered after {elapsed:.1f} s"
        else:
            assert r.json()["code"] == protocol.OVERLOADED and int(r.headers["retry-after"]) >= 1
