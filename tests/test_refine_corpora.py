"""Corpus storage semantics, in memory and in a real Redis: batching, all-or-nothing uploads, revision and id checks.

The embedding side is a stub here (vectors derived from the text); the gateway tests run the real one.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import pytest
import redis

from common.protocol import ModelInfo
from service.embedder import Embeddings, EmbedOptions
from service.errors import Conflict, CorpusNotFound, ServiceError
from service.openai_api import http_error
from service.refine.api import CorpusAdd, CorpusCreate, CorpusDocument
from service.refine.corpora import Corpora
from service.settings import GatewaySettings
from tests.gateway_fixtures import redis_process

DIM = 4


class StubEmbedder:
    def __init__(self) -> None:
        self.revision = "rev-1"
        self.batches: list[int] = []
        self.fail_on_batch: int | None = None

    def model_info(self, model: str) -> ModelInfo:
        return ModelInfo(model, "pooled", DIM, 0, 0, 0, 128, 1000, "float32", "cpu", self.revision)

    async def embed(self, model: str, inputs: list, options: EmbedOptions, request_id: str) -> Embeddings:
        assert options.input_type == "document"
        self.batches.append(len(inputs))
        if self.fail_on_batch == len(self.batches):
            raise ServiceError("the worker failed")
        return Embeddings(np.stack([vector(t) for t in inputs]), len(inputs), "miss", 0.0, 0.0)


def vector(text: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[: DIM * 4], "<u4").astype(np.float32) / 2**32


def docs(*ids: str) -> list[CorpusDocument]:
    return [CorpusDocument(id=i, text=f"text of {i}") for i in ids]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    with redis_process(tmp_path_factory.mktemp("corpora-redis")) as (url, _):
        yield url


@pytest.fixture(params=["memory", "redis"])
def backend(request) -> Iterator[str | None]:
    """None for the in-memory store, else a Redis URL (emptied afterwards)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    yield url
    if url:
        redis.Redis.from_url(url).flushdb()


def with_corpora(url: str | None, body: Callable[[Corpora, StubEmbedder], Awaitable[None]]) -> None:
    """Run `body` in one event loop with a Corpora over the backend (batches of 3 documents)."""

    async def go() -> None:
        settings = GatewaySettings(workers=["m=http://127.0.0.1:9"], redis_url=url, corpus_batch_size=3)
        embedder = StubEmbedder()
        corpora = Corpora(settings, embedder)  # type: ignore[arg-type]
        try:
            await body(corpora, embedder)
        finally:
            await corpora.aclose()

    asyncio.run(go())


def test_round_trip_in_batches(backend):
    async def go(store: Corpora, embedder: StubEmbedder) -> None:
        card = await store.create(CorpusCreate(id="c", model="m", documents=docs(*"abcdefg")), "r")
        assert (card.documents, card.revision, card.dimension, card.refinement_steps) == (7, "rev-1", DIM, 0)
        assert embedder.batches == [3, 3, 1]
        card = await store.add("c", CorpusAdd(documents=docs("h", "i")), "r")
        assert card.documents == 9
        loaded = await store.load("c", "m")
        assert loaded.ids == list("abcdefghi") and loaded.texts[0] == "text of a"
        np.testing.assert_array_equal(loaded.vectors, np.stack([vector(t) for t in loaded.texts]))
        assert (await store.meta("c")).card().documents == 9
        await store.delete("c")
        with pytest.raises(CorpusNotFound):
            await store.meta("c")
        with pytest.raises(CorpusNotFound):
            await store.delete("c")

    with_corpora(backend, go)


def test_conflicts_leave_the_corpus_as_it_was(backend):
    async def go(store: Corpora, embedder: StubEmbedder) -> None:
        await store.create(CorpusCreate(id="c", model="m", documents=docs("a", "b")), "r")
        with pytest.raises(Conflict, match="already exists"):
            await store.create(CorpusCreate(id="c", model="m"), "r")
        with pytest.raises(Conflict, match="already holds 1"):
            await store.add("c", CorpusAdd(documents=docs("x", "a")), "r")
        embedder.revision = "rev-2"
        for attempt in (store.add("c", CorpusAdd(documents=docs("y")), "r"), store.load("c", "m")):
            with pytest.raises(Conflict, match="revision rev-1") as raised:
                await attempt
            assert http_error(raised.value)[0] == 409 and raised.value.code == "corpus_revision_mismatch"
        embedder.revision = "rev-1"
        with pytest.raises(ServiceError, match="holds vectors of model 'm'"):
            await store.load("c", "other")
        assert (await store.load("c", "m")).ids == ["a", "b"]

    with_corpora(backend, go)


def test_a_failed_upload_stores_nothing(backend):
    async def go(store: Corpora, embedder: StubEmbedder) -> None:
        embedder.fail_on_batch = 2
        with pytest.raises(ServiceError, match="the worker failed"):
            await store.create(CorpusCreate(id="c", model="m", documents=docs(*"abcde")), "r")
        with pytest.raises(CorpusNotFound):
            await store.meta("c")
        embedder.batches.clear()
        await store.create(CorpusCreate(id="c", model="m", documents=docs("a")), "r")
        embedder.fail_on_batch = 2
        with pytest.raises(ServiceError):
            await store.add("c", CorpusAdd(documents=docs(*"bcdef")), "r")
        loaded = await store.load("c", "m")
        assert loaded.ids == ["a"] and len(loaded.meta.chunks) == 1

    with_corpora(backend, go)
    if backend:  # no orphaned chunks either
        assert len(redis.Redis.from_url(backend).keys(b"genembed:corpus:v1:c:chunk:*")) == 1
