"""POST /v1/refine-query and /v1/corpora end to end: a real gateway in front of real workers, its own Redis, and a
real OpenAI-compatible judge (llama-cpp-python's server with SmolLM2) on 127.0.0.1."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import httpx
import msgpack
import numpy as np
import pytest
import redis

from harness.llama import JUDGE_MODEL, llama_server
from harness.procs import api_error, worker_process
from tests.gateway_fixtures import gateway_process, redis_process

pytestmark = pytest.mark.slow

FINANCE = ["Stock markets fell sharply today.", "The central bank raised interest rates.", "Inflation rose again."]
OTHER = [
    "The cat sat on the mat.",
    "Dogs are loyal companions.",
    "A kitten played with yarn.",
    "The football match ended in a draw.",
    "Cats purr when they are content.",
    "Tomatoes grow well in warm weather.",
    "The orchestra played a symphony.",
]
DOCS = [{"id": f"o{i}", "text": t} for i, t in enumerate(OTHER)] + [
    {"id": f"f{i}", "text": t} for i, t in enumerate(FINANCE)
]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with redis_process(tmp_path_factory.mktemp("refine-redis")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def judge_url(tmp_path_factory) -> Iterator[str]:
    with llama_server(tmp_path_factory.mktemp("llama")) as (url, _):
        yield url


def refine_env(redis_url: str | None, judge_url: str) -> dict[str, str]:
    env = {"GENEMBED_JUDGE_URL": judge_url, "GENEMBED_JUDGE_MODEL": JUDGE_MODEL, "GENEMBED_TEACHER_TIMEOUT_S": "30"}
    return {**env, "GENEMBED_REDIS_URL": redis_url} if redis_url else env


@pytest.fixture(scope="module")
def gateway(minilm_worker, gircse_worker, redis_url, judge_url, tmp_path_factory) -> Iterator[httpx.Client]:
    workers = {"minilm-l6": minilm_worker, "smollm2-gircse": gircse_worker}
    with (
        gateway_process(tmp_path_factory.mktemp("refine-gw"), workers, env=refine_env(redis_url, judge_url)) as (
            url,
            _,
        ),
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield client


def refine(client: httpx.Client, **body) -> dict:
    body = {"model": "minilm-l6", "query": "finance and the economy", "documents": DOCS, **body}
    response = client.post("/v1/refine-query", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def ranks(result: dict, key: str = "rank") -> dict[str, int]:
    return {d["id"]: d[key] for d in result["data"]}


def test_labels_teacher_moves_the_positives_up(gateway):
    labels = {"o0": 1, "o2": 1, "o4": 1}  # the cats, for a query about finance: the teacher knows the task
    opt = {"lr": 5e-3, "teacher_temperature": 0.1, "student_temperature": 0.1}
    sampling = {"total": 10, "from_top": 10}
    result = refine(
        gateway,
        teacher={"type": "labels", "labels": labels},
        optimization=opt,
        sampling=sampling,
        return_trajectory=True,
    )
    d = result["diagnostics"]
    assert d["refined"] and d["steps"] == 100 and d["loss_after"] < d["loss_before"]
    assert len(d["loss_trajectory"]) == 101 and d["loss_trajectory"][0] == d["loss_before"]
    assert d["teacher"] == {
        "type": "labels",
        "sampled": 10,
        "scored": 10,
        "spread": 1.0,
        "calls": 0,
        "cache_hits": 0,
        "errors": [],
    }
    assert 0 < d["cosine_to_original"] < 1
    assert set(d["timings_ms"]) == {"hyde", "embed", "initial_ranking", "teacher", "optimize", "final_ranking", "total"}
    after, before = ranks(result), ranks(result, "original_rank")
    assert {i for i, r in after.items() if r <= 3} == set(labels)
    assert all(before[i] > 3 for i in labels)
    assert all(doc["teacher_score"] == labels.get(doc["id"], 0) for doc in result["data"])
    vector = np.array(result["embedding"])
    assert vector.shape == (384,) and np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)

    # Same inputs, same result; the base64 form is the same vector.
    again = refine(
        gateway,
        teacher={"type": "labels", "labels": labels},
        optimization=opt,
        sampling=sampling,
        encoding_format="base64",
    )
    assert np.array_equal(np.frombuffer(base64.b64decode(again["embedding"]), "<f4"), vector.astype(np.float32))
    assert again["data"] == result["data"]


def test_a_flat_teacher_skips_refinement(gateway):
    result = refine(
        gateway, teacher={"type": "labels", "labels": {}}, return_embedding=False, return_teacher_scores=False
    )
    d = result["diagnostics"]
    assert not d["refined"] and d["steps"] == 0 and "min_teacher_spread" in d["skipped_reason"]
    assert d["teacher"]["spread"] == 0 and "embedding" not in result
    assert not any("teacher_score" in doc for doc in result["data"])
    assert all(doc["rank"] == doc["original_rank"] and doc["score"] == doc["original_score"] for doc in result["data"])


def test_embedder_teacher_for_a_generative_student(gateway):
    body = dict(model="smollm2-gircse", refinement_steps=1, teacher={"type": "embedder", "model": "minilm-l6"})
    result = refine(gateway, **body, top_k=4)
    d = result["diagnostics"]
    assert d["refined"] and len(result["data"]) == 4 and len(result["embedding"]) == 576
    assert d["teacher"]["scored"] == 10 and -1 <= d["teacher"]["spread"] <= 2
    assert all(-1 <= doc["teacher_score"] <= 1 for doc in result["data"])
    assert result["usage"]["prompt_tokens"] > 0
    assert refine(gateway, **body)["diagnostics"]["teacher"]["cache_hits"] == 2  # the teacher's vectors were cached


def test_llm_teacher_against_llama_cpp(gateway):
    result = refine(
        gateway, teacher={"type": "llm"}, sampling={"total": 6, "from_top": 3}, optimization={"min_teacher_spread": 0}
    )
    teacher = result["diagnostics"]["teacher"]
    assert teacher["model"] == JUDGE_MODEL and teacher["errors"] == [] and teacher["scored"] == 6
    assert teacher["calls"] + teacher["cache_hits"] == 6
    scores = [doc["teacher_score"] for doc in result["data"] if "teacher_score" in doc]
    assert len(scores) == 6 and all(0 <= s <= 1 for s in scores)
    repeat = refine(
        gateway, teacher={"type": "llm"}, sampling={"total": 6, "from_top": 3}, optimization={"min_teacher_spread": 0}
    )
    assert repeat["diagnostics"]["teacher"]["cache_hits"] == 6 and repeat["data"] == result["data"]


def test_hyde_passage_from_llama_cpp(gateway):
    labels = {"f0": 1, "f1": 1}
    result = refine(gateway, teacher={"type": "labels", "labels": labels}, hyde={"mode": "start", "max_tokens": 48})
    d = result["diagnostics"]
    assert d["hyde_passage"] and d["timings_ms"]["hyde"] > 0
    plain = refine(gateway, teacher={"type": "labels", "labels": labels})
    assert ranks(plain, "original_rank") == ranks(result, "original_rank")  # start: the query still ranks first
    replaced = refine(gateway, teacher={"type": "labels", "labels": labels}, hyde={"mode": "replace", "max_tokens": 48})
    assert replaced["diagnostics"]["hyde_passage"] == d["hyde_passage"]  # seeded
    assert [doc["original_score"] for doc in replaced["data"]] != [doc["original_score"] for doc in plain["data"]]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"teacher": {"type": "oracle"}}, 400, "teacher"),
        ({"teacher": {"type": "labels"}}, 400, "teacher"),
        ({"teacher": {"type": "labels", "labels": {"nope": 1}}}, 400, None),
        ({"teacher": {"type": "embedder", "model": "missing"}}, 404, "model"),
        ({"teacher": {"type": "cross_encoder", "model": "minilm-l6"}}, 400, "teacher"),
        ({"teacher": {"type": "labels", "labels": {}}, "corpus_id": "x"}, 400, None),
        ({"teacher": {"type": "labels", "labels": {}}, "sampling": {"total": 5, "from_top": 6}}, 400, "sampling"),
        ({"teacher": {"type": "labels", "labels": {}}, "refinement_steps": 3}, 400, "refinement_steps"),
        ({"teacher": {"type": "labels", "labels": {}}, "model": "missing"}, 404, "model"),
        (
            {"teacher": {"type": "labels", "labels": {}}, "documents": [{"id": "a", "embedding": [0.5]}]},
            400,
            "documents",
        ),
    ],
)
def test_bad_requests_in_openai_shape(gateway, body, status, param):
    body = {"model": "minilm-l6", "query": "q", "documents": DOCS, **body}
    assert api_error(gateway.post("/v1/refine-query", json=body), status)["param"] == param


def test_corpus_round_trip_through_redis(gateway, redis_url):
    first, rest = DOCS[:6], DOCS[6:]
    created = gateway.post("/v1/corpora", json={"id": "news", "model": "minilm-l6", "documents": first})
    assert created.status_code == 201, created.text
    card = created.json()
    assert (card["documents"], card["dimension"], card["refinement_steps"]) == (6, 384, 0)
    again = gateway.post("/v1/corpora", json={"id": "news", "model": "minilm-l6"})
    assert api_error(again, 409)["code"] == "corpus_exists"

    added = gateway.post("/v1/corpora/news/documents", json={"documents": rest})
    assert added.status_code == 200 and added.json()["documents"] == len(DOCS)
    dup = gateway.post("/v1/corpora/news/documents", json={"documents": rest[:1]})
    assert api_error(dup, 409)["code"] == "document_exists"
    assert gateway.get("/v1/corpora/news").json()["documents"] == len(DOCS)

    # In Redis: metadata, the id set, and chunks whose vectors are raw float32 bytes.
    r = redis.Redis.from_url(redis_url)
    chunks = sorted(r.keys(b"genembed:corpus:v1:news:chunk:*"))
    assert len(chunks) == 2 and all(r.ttl(k) == -1 for k in chunks)
    ids, _, raw = msgpack.unpackb(r.get(chunks[0]))
    assert isinstance(raw, bytes) and len(raw) == len(ids) * 384 * 4

    labels = {"f0": 1, "f1": 1, "f2": 1}
    opt = {"lr": 5e-3, "teacher_temperature": 0.1, "student_temperature": 0.1}
    result = refine(
        gateway,
        documents=None,
        corpus_id="news",
        teacher={"type": "labels", "labels": labels},
        optimization=opt,
        sampling={"total": 10},
    )
    assert result["corpus_id"] == "news" and [d["rank"] for d in result["data"]] == list(range(1, 11))
    assert {d["id"] for d in result["data"][:3]} == set(labels)
    inline = refine(gateway, teacher={"type": "labels", "labels": labels}, optimization=opt, sampling={"total": 10})
    assert [d["id"] for d in result["data"]] == [d["id"] for d in inline["data"]]

    # A corpus made by another revision of the model cannot be compared with the worker's vectors.
    key = b"genembed:corpus:v1:news"
    meta = msgpack.unpackb(r.get(key))
    r.set(key, msgpack.packb({**meta, "revision": "0ld"}))
    stale = gateway.post(
        "/v1/refine-query",
        json={"model": "minilm-l6", "query": "q", "corpus_id": "news", "teacher": {"type": "labels", "labels": {}}},
    )
    body = api_error(stale, 409)
    assert body["code"] == "corpus_revision_mismatch" and "0ld" in body["message"]
    assert api_error(gateway.post("/v1/corpora/news/documents", json={"documents": [{"id": "z", "text": "z"}]}), 409)
    wrong_model = {
        "model": "smollm2-gircse",
        "query": "q",
        "corpus_id": "news",
        "teacher": {"type": "labels", "labels": {}},
    }
    assert api_error(gateway.post("/v1/refine-query", json=wrong_model), 400)["param"] == "model"

    assert gateway.delete("/v1/corpora/news").json() == {"id": "news", "object": "corpus.deleted", "deleted": True}
    assert api_error(gateway.get("/v1/corpora/news"), 404)["code"] == "corpus_not_found"
    assert api_error(gateway.delete("/v1/corpora/news"), 404)
    assert not r.keys(b"genembed:corpus:v1:news*")


def test_large_upload_is_stored_in_engine_sized_batches(minilm_worker, redis_url, judge_url, tmp_path):
    env = {**refine_env(redis_url, judge_url), "GENEMBED_CORPUS_BATCH_SIZE": "16"}
    documents = [{"id": f"d{i}", "text": f"document number {i} about topic {i % 7}"} for i in range(50)]
    with gateway_process(tmp_path, {"minilm-l6": minilm_worker}, env=env) as (url, _):
        created = httpx.post(f"{url}/v1/corpora", json={"id": "big", "model": "minilm-l6", "documents": documents})
        assert created.status_code == 201 and created.json()["documents"] == 50
        r = redis.Redis.from_url(redis_url)
        assert len(r.keys(b"genembed:corpus:v1:big:chunk:*")) == 4  # 16 + 16 + 16 + 2
        httpx.delete(f"{url}/v1/corpora/big")


def test_a_stopped_judge_is_a_clear_502_within_the_deadline(minilm_worker, tmp_path):
    with llama_server(tmp_path) as (judge, server):
        # The live judge answers four documents one after another: a busy machine needs more than a few seconds. A
        # stopped one refuses connections at once, whatever the timeout.
        env = {**refine_env(None, judge), "GENEMBED_TEACHER_TIMEOUT_S": "30"}
        with gateway_process(tmp_path, {"minilm-l6": minilm_worker}, env=env) as (url, _):
            body = {"model": "minilm-l6", "query": "finance", "documents": DOCS[:4], "teacher": {"type": "llm"}}
            assert httpx.post(f"{url}/v1/refine-query", json=body, timeout=60).status_code == 200
            server.terminate()
            server.wait(10)
            body["query"] = "another query"  # not in the score cache
            started = time.monotonic()
            response = httpx.post(f"{url}/v1/refine-query", json=body, timeout=60)
            assert time.monotonic() - started < 5
            failure = api_error(response, 502)
            assert failure["code"] == "teacher_failed" and "unreachable" in failure["message"]


def test_cross_encoder_teacher(minilm_worker, tmp_path):
    with (
        worker_process("minilm-l6-cross-encoder", tmp_path) as (cross_encoder, _),
        gateway_process(tmp_path, {"minilm-l6": minilm_worker, "ce": cross_encoder}) as (url, _),
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        body = {"teacher": {"type": "cross_encoder", "model": "ce"}, "optimization": {"min_teacher_spread": 0}}
        result = refine(client, **body)
        teacher = result["diagnostics"]["teacher"]
        assert (teacher["scored"], teacher["calls"], teacher["cache_hits"], teacher["errors"]) == (10, 10, 0, [])
        assert all(np.isfinite(d["teacher_score"]) for d in result["data"])
        again = refine(client, **body)
        assert again["diagnostics"]["teacher"]["cache_hits"] == 10 and again["data"] == result["data"]
