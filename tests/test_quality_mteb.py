"""The mteb encoder against a live gateway and worker, on the offline Lee tasks, through mteb's own evaluators:
mteb's scores must equal the same metrics computed here from /v1/embeddings vectors. Nothing is downloaded.
Then the requests it sends (input types, batches, auto, retries), recorded by a scripted gateway."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator

import httpx
import mteb
import numpy as np
import pytest
from datasets import Dataset
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from mteb.types import PromptType
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from evaluation.lee import lee_known_items, lee_sts
from evaluation.mteb_model import GenembedEncoder
from evaluation.tasks import LeeKnownItemRetrieval, LeeSTS
from harness.procs import app_in_thread

pytestmark = pytest.mark.slow

ARTICLES = 12  # LeeSTS: 66 pairs
QUERIES = 30  # known items among 30 documents


def embed(url: str, texts: list[str], input_type: str) -> np.ndarray:
    response = httpx.post(
        f"{url}/v1/embeddings", json={"model": "minilm-l6", "input": texts, "input_type": input_type}, timeout=120
    )
    assert response.status_code == 200, response.text
    vectors = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def evaluate(model: GenembedEncoder, task: mteb.AbsTask) -> dict:
    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False)
    (task_result,) = result.task_results
    return task_result.scores["test"][0]


def test_known_item_retrieval_matches_a_direct_computation(minilm_gateway):
    model = GenembedEncoder("minilm-l6", base_url=minilm_gateway, refinement_steps=0, batch_size=8)
    scores = evaluate(model, LeeKnownItemRetrieval(limit=QUERIES))
    queries, documents = lee_known_items()
    similarity = (
        embed(minilm_gateway, queries[:QUERIES], "query") @ embed(minilm_gateway, documents[:QUERIES], "document").T
    )
    ranks = (similarity > np.diag(similarity)[:, None]).sum(axis=1) + 1
    assert scores["mrr_at_10"] == pytest.approx(np.mean([1 / r if r <= 10 else 0 for r in ranks]), abs=1e-4)
    assert scores["ndcg_at_10"] == pytest.approx(
        np.mean([1 / math.log2(r + 1) if r <= 10 else 0 for r in ranks]), abs=1e-4
    )
    assert scores["main_score"] == scores["ndcg_at_10"] > 0.5  # MiniLM finds most articles from their first line
    model.close()


def test_sts_matches_a_direct_computation(minilm_gateway):
    model = GenembedEncoder("minilm-l6", base_url=minilm_gateway)
    scores = evaluate(model, LeeSTS(limit=ARTICLES))
    texts, ratings = lee_sts()
    first, second = np.triu_indices(len(texts), 1)
    keep = second < ARTICLES
    vectors = embed(minilm_gateway, texts[:ARTICLES], "document")  # symmetric: documents, the encoder's default
    cosines = np.sum(vectors[first[keep]] * vectors[second[keep]], axis=1)
    assert keep.sum() == ARTICLES * (ARTICLES - 1) // 2
    assert scores["cosine_spearman"] == pytest.approx(spearmanr(cosines, ratings[keep]).statistic, abs=1e-6)
    model.close()


def test_refinement_steps_reach_the_gateway(minilm_gateway):
    model = GenembedEncoder("minilm-l6", base_url=minilm_gateway, refinement_steps=3)  # minilm accepts only 0
    with pytest.raises(RuntimeError, match="refinement_steps=3 is outside"):
        model.embed(["a sentence"], "query")
    model.close()
    with pytest.raises(httpx.HTTPStatusError):
        GenembedEncoder("no-such-model", base_url=minilm_gateway)


# -- the request the encoder sends, against a scripted gateway (the auto contract before a worker implements it) --


class ScriptedGateway:
    """Answers /v1/models/{id} and /v1/embeddings like the gateway; records every embeddings body; answers the
    first embeddings request 429 with Retry-After; reports `refinement_steps` per item when the request is auto."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models/{model}")
        async def card(model: str) -> dict:
            return {"id": model, "revision": "r1", "dimension": 2, "max_input_tokens": 64}

        @app.post("/v1/embeddings")
        async def embeddings(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if len(self.bodies) == 1:
                return JSONResponse({"error": {"message": "busy"}}, status_code=429, headers={"retry-after": "0"})
            data = [
                {
                    "index": i,
                    "embedding": base64.b64encode(np.array([len(text), i], "<f4").tobytes()).decode(),
                    **({"refinement_steps": len(text) % 3} if body.get("refinement_steps") == "auto" else {}),
                }
                for i, text in enumerate(body["input"])
            ]
            return {"object": "list", "data": data[::-1], "model": body["model"]}  # out of order on purpose

        return app


@pytest.fixture
def scripted() -> Iterator[tuple[str, ScriptedGateway]]:
    script = ScriptedGateway()
    with app_in_thread(script.app()) as url:
        yield url, script


def test_prompt_types_batches_auto_and_retries(scripted):
    url, script = scripted
    model = GenembedEncoder(
        "m", base_url=url, api_key="k", refinement_steps="auto", refinement_tolerance=0.01, batch_size=2, concurrency=1
    )
    task = LeeSTS(limit=3).metadata
    texts = ["a", "bb", "ccc"]
    loader = DataLoader(Dataset.from_dict({"text": texts}), batch_size=8)
    where = {"task_metadata": task, "hf_split": "test", "hf_subset": "default"}
    queries = model.encode(loader, **where, prompt_type=PromptType.query)
    symmetric = model.encode(loader, **where)
    assert queries.tolist() == [[1, 0], [2, 1], [3, 0]] == symmetric.tolist()  # re-ordered by index, per batch
    first, *sent = script.bodies  # the first was answered 429 and sent again
    assert first == sent[0]
    assert [(b["input"], b["input_type"]) for b in sent] == [
        (["a", "bb"], "query"),
        (["ccc"], "query"),
        (["a", "bb"], "document"),
        (["ccc"], "document"),
    ]
    assert all(b["refinement_steps"] == "auto" and b["refinement_tolerance"] == 0.01 for b in sent)
    assert sorted(model.steps_ran) == sorted([1, 2, 0] * 2)
    assert model.mteb_model_meta.name == "genembed/m" and model.mteb_model_meta.revision == "r1-kauto"
    model.close()
