"""POST /v1/rerank end to end: a real gateway in front of a real minilm-l6 worker, a real cross-encoder worker and
a real OpenAI-compatible judge (llama-cpp-python's server with SmolLM2). Each teacher's ordering is checked
against the same scores computed another way (the worker's /embed, /v1/embeddings cosines, the judge's own
chat completions)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from common.protocol import EmbedItem, EmbedRequest, EmbedResponse
from harness.llama import JUDGE_MODEL, llama_server
from harness.procs import api_error, worker_process
from service.refine.llm import judge_payload, yes_no_score
from tests.gateway_fixtures import gateway_process

pytestmark = pytest.mark.slow

QUERY = "interest rates and the stock market"
DOCS = [
    "The cat sat on the mat.",
    "The central bank raised interest rates to fight inflation.",
    "Tomatoes grow well in warm weather.",
    "Stock markets fell sharply after the rate decision.",
    "The orchestra played a symphony.",
]
MAX_DOCUMENTS = 8


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> Iterator[str]:
    with worker_process("minilm-l6-cross-encoder", tmp_path_factory.mktemp("rerank-ce")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Iterator[str]:
    with llama_server(tmp_path_factory.mktemp("rerank-llama")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def gateway(minilm_worker, cross_encoder, judge, tmp_path_factory) -> Iterator[httpx.Client]:
    env = {
        "GENEMBED_JUDGE_URL": judge,
        "GENEMBED_JUDGE_MODEL": JUDGE_MODEL,
        "GENEMBED_TEACHER_TIMEOUT_S": "60",
        "GENEMBED_RERANK_MAX_DOCUMENTS": str(MAX_DOCUMENTS),
    }
    workers = {"minilm-l6": minilm_worker, "ce": cross_encoder}
    with (
        gateway_process(tmp_path_factory.mktemp("rerank-gw"), workers, env=env) as (url, _),
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        yield client


def rerank(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, **body})
    assert response.status_code == 200, response.text
    return response.json()


def expected_order(scores: list[float] | np.ndarray) -> list[int]:
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")]


def test_cross_encoder_orders_by_the_workers_own_pair_scores(gateway, cross_encoder):
    mixed = [d if i % 2 else {"text": d} for i, d in enumerate(DOCS)]  # strings and {"text"} objects
    result = rerank(gateway, model="ce", documents=mixed)
    direct = EmbedResponse.decode(
        httpx.post(
            f"{cross_encoder}/embed",
            content=EmbedRequest([EmbedItem(text=QUERY, text_pair=d, steps=0) for d in DOCS]).encode(),
            timeout=120,
        ).content
    )
    logits = direct.vectors[:, -1]
    assert [r["index"] for r in result["results"]] == expected_order(logits)
    assert [r["relevance_score"] for r in result["results"]] == pytest.approx(
        [float(logits[r["index"]]) for r in result["results"]], abs=1e-5
    )
    tokens = sum(r.prompt_tokens for r in direct.results)
    assert result["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert result["model"] == "ce" and result["id"]
    again = rerank(gateway, model="ce", documents=mixed)  # served from the score cache, tokens included
    assert again["results"] == result["results"] and again["usage"] == result["usage"]


def test_embedder_orders_by_cosine_of_query_and_document_vectors(gateway):
    result = rerank(gateway, model="minilm-l6")

    def embed(texts: list[str], input_type: str) -> np.ndarray:
        body = {"model": "minilm-l6", "input": texts, "input_type": input_type}
        response = gateway.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        return np.array([d["embedding"] for d in response.json()["data"]])

    query, documents = embed([QUERY], "query")[0], embed(DOCS, "document")
    cosines = documents @ query / np.linalg.norm(documents, axis=1) / np.linalg.norm(query)
    assert [r["index"] for r in result["results"]] == expected_order(cosines)
    assert [r["relevance_score"] for r in result["results"]] == pytest.approx(
        [cosines[r["index"]] for r in result["results"]], abs=1e-5
    )
    assert {r["index"] for r in result["results"][:2]} == {1, 3}  # a real model: the two finance sentences lead
    assert result["usage"]["prompt_tokens"] > 0


def test_llm_judge_scores_like_the_judge_itself(gateway, judge):
    docs = DOCS[:4]
    result = rerank(gateway, model=JUDGE_MODEL, documents=docs)  # the judge model's name selects the judge
    direct = []
    for doc in docs:
        payload = judge_payload(JUDGE_MODEL, QUERY, doc, None, seed=0)  # the paper's call, rerank's seed
        response = httpx.post(f"{judge}/chat/completions", json=payload, timeout=120)
        direct.append(yes_no_score(response.json()))
    scores = [r["relevance_score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert scores == pytest.approx([direct[r["index"]] for r in result["results"]], abs=1e-4)
    assert result["usage"]["prompt_tokens"] == 0  # the judge's tokens are its server's, not the gateway's
    explicit = rerank(gateway, model=JUDGE_MODEL, documents=docs, teacher="llm")
    assert explicit["results"] == result["results"]


def test_top_n_and_return_documents(gateway):
    full = rerank(gateway, model="minilm-l6")["results"]
    top = rerank(gateway, model="minilm-l6", top_n=2, return_documents=True)["results"]
    assert [r["index"] for r in top] == [r["index"] for r in full[:2]]
    assert [r["document"]["text"] for r in top] == [DOCS[r["index"]] for r in top]
    assert all("document" not in r for r in full)
    assert len(rerank(gateway, model="minilm-l6", top_n=50)["results"]) == len(DOCS)  # more than there are: all


def test_metrics_count_requests_and_documents(gateway):
    def counted(name: str) -> float:
        text = gateway.get("/metrics").text
        line = next((x for x in text.splitlines() if x.startswith(f'{name}_total{{teacher="embedder"}}')), None)
        return float(line.split()[-1]) if line else 0.0

    before = counted("genembed_gateway_rerank_requests"), counted("genembed_gateway_rerank_documents")
    rerank(gateway, model="minilm-l6", documents=DOCS[:3])
    after = counted("genembed_gateway_rerank_requests"), counted("genembed_gateway_rerank_documents")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "missing"}, 404, "model"),
        ({"model": "minilm-l6", "documents": []}, 400, "documents"),
        ({"model": "minilm-l6", "documents": ["ok", ""]}, 400, "documents"),
        ({"model": "minilm-l6", "documents": [{"title": "no text"}]}, 400, "documents"),
        ({"model": "minilm-l6", "documents": ["d"] * (MAX_DOCUMENTS + 1)}, 400, "documents"),
        ({"model": "minilm-l6", "top_n": 0}, 400, "top_n"),
        ({"model": "minilm-l6", "top_n": "three"}, 400, "top_n"),
        ({"model": "minilm-l6", "query": ""}, 400, "query"),
        ({"model": "minilm-l6", "teacher": "oracle"}, 400, "teacher"),
        ({"model": "ce", "teacher": "embedder"}, 400, "teacher"),
        ({"model": "minilm-l6", "teacher": "cross_encoder"}, 400, "teacher"),
        ({"model": "minilm-l6", "rank_fields": ["text"]}, 400, "rank_fields"),
        ({"model": "minilm-l6", "instruction": "find finance news"}, 400, "instruction"),
    ],
)
def test_bad_requests_in_openai_shape(gateway, body, status, param):
    response = gateway.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, **body})
    assert api_error(response, status)["param"] == param


def test_auth_and_a_gateway_without_a_judge(minilm_worker, tmp_path):
    env = {"GENEMBED_API_KEYS": "sesame"}
    with gateway_process(tmp_path, {"minilm-l6": minilm_worker}, env=env) as (url, _):
        body = {"model": JUDGE_MODEL, "query": QUERY, "documents": DOCS}
        assert api_error(httpx.post(f"{url}/v1/rerank", json=body), 401)["code"] == "invalid_api_key"
        headers = {"authorization": "Bearer sesame"}
        assert api_error(httpx.post(f"{url}/v1/rerank", json=body, headers=headers), 404)["param"] == "model"
        unset = api_error(httpx.post(f"{url}/v1/rerank", json={**body, "teacher": "llm"}, headers=headers), 400)
        assert unset["param"] == "teacher" and "GENEMBED_JUDGE_URL" in unset["message"]
