"""The HTTP routes of test-time query refinement and stored corpora, mounted by `service.app.create_app`.

Errors are the gateway's ServiceErrors (rendered in OpenAI's shape by the app's handlers); bodies are validated by
pydantic, whose errors the app turns into 400s naming the field.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.disconnect import unless_disconnected
from service.embedder import Embedder
from service.openai_api import error_responses
from service.refine.api import CorpusAdd, CorpusCard, CorpusCreate, CorpusDeleted, RefineRequest, RefineResponse
from service.refine.corpora import Corpora
from service.refine.pipeline import Refiner
from service.refine.teachers import Teachers
from service.settings import GatewaySettings

#: what every authenticated route can answer besides its own errors: a key refused, its limit spent, a drain
_ANY = (401, 429, 503)


def refine_router(settings: GatewaySettings, embedder: Embedder, teachers: Teachers, corpora: Corpora) -> APIRouter:
    """The routes, on the app's shared teachers and corpus store (the app closes both)."""
    refiner = Refiner(settings, embedder, teachers, corpora)
    router = APIRouter(tags=["refinement"])

    @router.post(
        "/v1/refine-query",
        response_model=RefineResponse,
        response_model_exclude_none=True,
        summary="Refine a query embedding with a teacher's feedback and re-rank (arXiv 2605.12487)",
        responses=error_responses(400, 404, 409, 413, 502, 504, *_ANY),
    )
    async def refine_query(body: RefineRequest, request: Request) -> RefineResponse:
        request.state.model = body.model
        return await unless_disconnected(request, refiner.refine(body, request.state.request_id))

    @router.post(
        "/v1/corpora",
        response_model=CorpusCard,
        status_code=201,
        summary="Embed and store a corpus",
        responses=error_responses(400, 404, 409, 413, 504, *_ANY),
    )
    async def create_corpus(body: CorpusCreate, request: Request) -> CorpusCard:
        request.state.model = body.model
        return await unless_disconnected(request, corpora.create(body, request.state.request_id))

    @router.post(
        "/v1/corpora/{corpus_id}/documents",
        response_model=CorpusCard,
        summary="Add documents",
        responses=error_responses(400, 404, 409, 413, 504, *_ANY),
    )
    async def add_documents(corpus_id: str, body: CorpusAdd, request: Request) -> CorpusCard:
        return await unless_disconnected(request, corpora.add(corpus_id, body, request.state.request_id))

    @router.get("/v1/corpora/{corpus_id}", response_model=CorpusCard, responses=error_responses(404, *_ANY))
    async def get_corpus(corpus_id: str) -> CorpusCard:
        return (await corpora.meta(corpus_id)).card()

    @router.delete("/v1/corpora/{corpus_id}", response_model=CorpusDeleted, responses=error_responses(404, *_ANY))
    async def delete_corpus(corpus_id: str) -> CorpusDeleted:
        return await corpora.delete(corpus_id)

    return router
