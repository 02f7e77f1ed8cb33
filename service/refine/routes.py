"""The HTTP routes of test-time query refinement and stored corpora, mounted by `service.app.create_app`.

Errors are the gateway's ApiErrors (rendered in OpenAI's shape by the app's handlers); bodies are validated by
pydantic, whose errors the app turns into 400s naming the field.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request

from service.embedder import Embedder
from service.refine.api import CorpusAdd, CorpusCard, CorpusCreate, CorpusDeleted, RefineRequest, RefineResponse
from service.refine.corpora import Corpora
from service.refine.pipeline import Refiner
from service.refine.teachers import Teachers
from service.settings import GatewaySettings


def refine_router(settings: GatewaySettings, embedder: Embedder) -> APIRouter:
    """The routes, with a lifespan that closes the judge client and the corpus store (merged into the app's)."""
    teachers = Teachers(settings, embedder)
    corpora = Corpora(settings, embedder)
    refiner = Refiner(settings, embedder, teachers, corpora)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await teachers.aclose()
        await corpora.aclose()

    router = APIRouter(lifespan=lifespan, tags=["refinement"])

    @router.post(
        "/v1/refine-query",
        response_model=RefineResponse,
        response_model_exclude_none=True,
        summary="Refine a query embedding with a teacher's feedback and re-rank (arXiv 2605.12487)",
    )
    async def refine_query(body: RefineRequest, request: Request) -> RefineResponse:
        request.state.model = body.model
        return await refiner.refine(body, request.state.request_id)

    @router.post("/v1/corpora", response_model=CorpusCard, status_code=201, summary="Embed and store a corpus")
    async def create_corpus(body: CorpusCreate, request: Request) -> CorpusCard:
        request.state.model = body.model
        return await corpora.create(body, request.state.request_id)

    @router.post("/v1/corpora/{corpus_id}/documents", response_model=CorpusCard, summary="Add documents")
    async def add_documents(corpus_id: str, body: CorpusAdd, request: Request) -> CorpusCard:
        return await corpora.add(corpus_id, body, request.state.request_id)

    @router.get("/v1/corpora/{corpus_id}", response_model=CorpusCard)
    async def get_corpus(corpus_id: str) -> CorpusCard:
        return (await corpora.meta(corpus_id)).card()

    @router.delete("/v1/corpora/{corpus_id}", response_model=CorpusDeleted)
    async def delete_corpus(corpus_id: str) -> CorpusDeleted:
        return await corpora.delete(corpus_id)

    return router
