"""POST /v1/rerank: Cohere/Jina-shaped reranking, served by the teachers of the refine path (docs/rerank.md).

One endpoint for every scorer the gateway already knows: a `cross_encoder` worker (the pair's relevance logit),
an embedding model (cosine of the query's and each document's vector) or the LLM judge (P(yes)). The teachers'
code does the scoring, batching and caching; this module only resolves which teacher a request means, checks
the limits and shapes the answer. Unlike refine-query, a rerank must score every document: one the teacher
could not score fails the request (502, or 504 when it timed out).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field

from common.methods import facts
from service.disconnect import unless_disconnected
from service.embedder import Embedder
from service.errors import DeadlineExceeded, InvalidRequest, ModelNotFound
from service.openai_api import Usage, error_responses
from service.refine.api import Teacher
from service.refine.teachers import Teachers
from service.settings import GatewaySettings

RerankTeacher = Literal["cross_encoder", "embedder", "llm"]
_JUDGE_SEED = 0  # the paper's call leaves the temperature to the server: the seed pins its sampling


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RerankText(_Strict):
    text: str = Field(min_length=1)


class RerankRequest(_Strict):
    model: str = Field(
        description="a cross_encoder or embedding model served by this gateway, or the judge model "
        '(GENEMBED_JUDGE_MODEL; any model of the judge\'s server with `teacher: "llm"`)'
    )
    query: str = Field(min_length=1)
    documents: list[Annotated[str, Field(min_length=1)] | RerankText] = Field(
        min_length=1, description='strings or {"text": ...} objects'
    )
    top_n: int | None = Field(default=None, gt=0, description="return only the best N (default: all)")
    return_documents: bool = Field(default=False, description="echo each document's text in its result")
    teacher: RerankTeacher | None = Field(
        default=None,
        description="who scores; default: the served model's kind (cross_encoder or embedder), else the judge",
    )
    instruction: str | None = Field(default=None, description="llm: the search task, shown to the judge")

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request")
    relevance_score: float = Field(description="cross_encoder: raw logit; embedder: cosine; llm: P(yes) in [0, 1]")
    document: RerankText | None = None


class RerankResponse(BaseModel):
    id: str = Field(description="the request id (x-request-id)")
    results: list[RerankResult]
    model: str
    usage: Usage = Field(description="tokens the gateway's models took (cache hits count); the judge's are not ours")


class Reranker:
    def __init__(self, settings: GatewaySettings, embedder: Embedder, teachers: Teachers) -> None:
        self.settings = settings
        self.embedder = embedder
        self.teachers = teachers
        registry: CollectorRegistry = embedder.metrics.registry
        self.requests = Counter(
            "genembed_gateway_rerank_requests", "Rerank requests answered, by teacher", ["teacher"], registry=registry
        )
        self.documents = Counter(
            "genembed_gateway_rerank_documents", "Documents reranked, by teacher", ["teacher"], registry=registry
        )

    def teacher(self, body: RerankRequest) -> Teacher:
        """A served model decides by its method; a model no worker serves is the judge if it is the judge's."""
        if body.teacher == "llm":
            return Teacher(type="llm", model=body.model)
        try:
            info = self.embedder.model_info(body.model)
        except ModelNotFound:
            if body.teacher is None and self.settings.judge_url and body.model == self.settings.judge_model:
                return Teacher(type="llm", model=body.model)
            raise
        if body.instruction is not None:  # the cross-encoder and embedder teachers take none
            raise InvalidRequest("instruction is only for the llm teacher", param="instruction")
        scores_pairs = facts(info.method).scores_pairs
        kind = body.teacher or ("cross_encoder" if scores_pairs else "embedder")
        if kind == "embedder" and scores_pairs:
            message = f"model {body.model!r} is a {info.method}: it scores pairs, not vectors"
            raise InvalidRequest(message, param="teacher")
        return Teacher(type=kind, model=body.model)

    async def rerank(self, body: RerankRequest, teacher: Teacher, request_id: str) -> RerankResponse:
        texts = body.texts()
        if len(texts) > self.settings.rerank_max_documents:
            raise InvalidRequest(
                f"{len(texts)} documents; at most {self.settings.rerank_max_documents} per request "
                "(GENEMBED_RERANK_MAX_DOCUMENTS)",
                param="documents",
            )
        budget = self.settings.rerank_timeout_s
        try:
            async with asyncio.timeout(budget):
                scored = await self.teachers.score(
                    teacher,
                    body.query,
                    body.instruction,
                    [str(i) for i in range(len(texts))],
                    texts,
                    _JUDGE_SEED,
                    request_id,
                    budget,
                    max_error_fraction=0.0,
                )
        except TimeoutError:
            raise DeadlineExceeded(
                f"the documents were not scored within {budget:g} s (GENEMBED_RERANK_TIMEOUT_S)"
            ) from None
        scores = [s for s in scored.scores if s is not None]  # all of them: max_error_fraction=0 raised otherwise
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]  # stable: ties keep request order
        self.requests.labels(teacher.type).inc()
        self.documents.labels(teacher.type).inc(len(texts))
        return RerankResponse(
            id=request_id,
            results=[
                RerankResult(
                    index=i,
                    relevance_score=scores[i],
                    document=RerankText(text=texts[i]) if body.return_documents else None,
                )
                for i in order
            ],
            model=body.model,
            usage=Usage(prompt_tokens=scored.prompt_tokens, total_tokens=scored.prompt_tokens),
        )


def rerank_router(settings: GatewaySettings, embedder: Embedder, teachers: Teachers) -> APIRouter:
    """The route, scoring with the app's shared teachers."""
    reranker = Reranker(settings, embedder, teachers)
    router = APIRouter(tags=["rerank"])

    @router.post(
        "/v1/rerank",
        response_model=RerankResponse,
        response_model_exclude_none=True,
        summary="Order documents by relevance to a query (Cohere/Jina shape)",
        responses=error_responses(400, 401, 404, 413, 429, 502, 503, 504),
    )
    async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
        teacher = reranker.teacher(body)
        request.state.model = body.model  # known by now: the duration histogram's label stays bounded
        return await unless_disconnected(request, reranker.rerank(body, teacher, request.state.request_id))

    return router
