"""POST /v1/refine-query without HTTP: embed, rank, sample, ask the teacher, optimise, re-rank.

Embeddings go through the gateway's Embedder (cache, coalescing, admission); only the teacher and the (tiny)
optimisation are new work. Ranking is cosine similarity throughout, as in the paper.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.embedder import Embedder, EmbedOptions
from service.errors import DeadlineExceeded, InvalidRequest, PayloadTooLarge, TeacherFailed
from service.refine import llm
from service.refine.api import (
    Diagnostics,
    RankedDocument,
    RefineRequest,
    RefineResponse,
    TeacherReport,
    Timings,
    Usage,
)
from service.refine.corpora import Corpora
from service.refine.llm import CallError
from service.refine.optimizer import refine, sample_indices
from service.refine.teachers import Teachers
from service.settings import GatewaySettings

_CORPUS_TOP_K = 10
_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RefineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "genembed_gateway_refine_requests",
            "refine-query requests answered, by teacher and whether the query was refined",
            ["teacher", "outcome"],
            registry=registry,
        )
        self.phase_seconds = Histogram(
            "genembed_gateway_refine_phase_seconds",
            "Time per refine-query phase",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=registry,
        )
        self.teacher_documents = Counter(
            "genembed_gateway_teacher_documents",
            "Sampled documents by teacher and result (scored / error)",
            ["teacher", "result"],
            registry=registry,
        )


@dataclass
class _Candidates:
    ids: list[str]
    texts: list[str | None]
    vectors: np.ndarray  # (n, d) float32
    prompt_tokens: int


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def _scores(vectors: np.ndarray, inverse_norms: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosines of every candidate to `query`, in float32 (a corpus can be large)."""
    return (vectors @ _unit(query)) * inverse_norms


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each candidate (ties keep candidate order)."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


class Refiner:
    def __init__(self, settings: GatewaySettings, embedder: Embedder, teachers: Teachers, corpora: Corpora) -> None:
        self.settings = settings
        self.embedder = embedder
        self.teachers = teachers
        self.corpora = corpora
        self.metrics = RefineMetrics(embedder.metrics.registry)

    @contextmanager
    def _phase(self, timings: Timings, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            setattr(timings, name, round(elapsed * 1000, 3))
            self.metrics.phase_seconds.labels(name).observe(elapsed)

    async def refine(self, body: RefineRequest, request_id: str) -> RefineResponse:
        try:
            async with asyncio.timeout(self.settings.refine_timeout_s):
                return await self._refine(body, request_id)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the refinement did not finish within {self.settings.refine_timeout_s:g} s (GENEMBED_REFINE_TIMEOUT_S)"
            ) from None

    async def _refine(self, body: RefineRequest, request_id: str) -> RefineResponse:
        started = time.perf_counter()
        deadline = started + self.settings.refine_timeout_s
        timings = Timings()
        info = self.embedder.model_info(body.model)
        options = EmbedOptions(refinement_steps=body.refinement_steps, input_type="query", instruction=body.instruction)

        passage = None
        if body.hyde is not None:
            with self._phase(timings, "hyde"):
                passage = await self._hyde(body)

        with self._phase(timings, "embed"):
            queries = [body.query] if passage is None else [body.query, passage]
            embedded = await self.embedder.embed(body.model, queries, options, request_id)
            query_vector, start_vector = embedded.vectors[0], embedded.vectors[-1]
            candidates = await self._candidates(body, info.dimension, request_id)

        with self._phase(timings, "initial_ranking"):
            inverse_norms = 1 / np.maximum(np.linalg.norm(candidates.vectors, axis=1), 1e-12)
            ranking_vector = start_vector if body.hyde is not None and body.hyde.mode == "replace" else query_vector
            original = _scores(candidates.vectors, inverse_norms, ranking_vector)
            original_ranks = _ranks(original)
            sample = sample_indices(original, body.sampling.total, body.sampling.top, body.sampling.seed)

        teacher = body.teacher
        with self._phase(timings, "teacher"):
            if teacher.labels is not None:
                unknown = set(teacher.labels) - set(candidates.ids)
                if unknown:
                    raise InvalidRequest(f"teacher.labels names unknown document ids: {sorted(unknown)[:5]}")
            result = await self.teachers.score(
                teacher,
                body.query,
                body.instruction,
                [candidates.ids[i] for i in sample],
                [candidates.texts[i] for i in sample],
                body.sampling.seed,
                request_id,
                max(deadline - time.perf_counter(), 0.001),
            )
        scored = [(i, s) for i, s in zip(sample, result.scores, strict=True) if s is not None]
        values = np.array([s for _, s in scored], dtype=np.float64)
        spread = float(values.max() - values.min()) if len(values) else None
        self.metrics.teacher_documents.labels(teacher.type, "scored").inc(len(scored))
        self.metrics.teacher_documents.labels(teacher.type, "error").inc(len(result.errors))

        config = body.optimization.config()
        skipped = None
        if spread is None or spread < body.optimization.min_teacher_spread:
            skipped = (
                f"the teacher's scores spread {spread or 0:.4g} (max − min) over {len(values)} scored documents, less "
                f"than min_teacher_spread={body.optimization.min_teacher_spread:g}: it does not tell them apart, so "
                "the query was not refined"
            )
        refined_vector, losses, loss_after = start_vector, None, None
        if skipped is None:
            with self._phase(timings, "optimize"):
                rows = candidates.vectors[[i for i, _ in scored]]
                outcome = refine(start_vector, rows, values, config)
            refined_vector, losses, loss_after = outcome.vector, outcome.losses, outcome.loss_after

        with self._phase(timings, "final_ranking"):
            final = _scores(candidates.vectors, inverse_norms, refined_vector) if skipped is None else original
            order = np.argsort(-final, kind="stable")
            top_k = body.top_k or (_CORPUS_TOP_K if body.corpus_id is not None else len(order))
            teacher_scores = dict(scored) if body.return_teacher_scores else {}
            data = [
                RankedDocument(
                    id=candidates.ids[i],
                    rank=rank,
                    score=float(final[i]),
                    original_rank=int(original_ranks[i]),
                    original_score=float(original[i]),
                    teacher_score=teacher_scores.get(int(i)),
                )
                for rank, i in enumerate(order[:top_k], start=1)
            ]
        timings.total = round((time.perf_counter() - started) * 1000, 3)
        self.metrics.requests.labels(teacher.type, "skipped" if skipped else "refined").inc()

        unit = _unit(refined_vector)
        diagnostics = Diagnostics(
            refined=skipped is None,
            skipped_reason=skipped,
            steps=config.steps if skipped is None else 0,
            loss_before=None if losses is None else (losses[0] if losses else loss_after),
            loss_after=loss_after,
            cosine_to_original=float(_unit(query_vector).astype(np.float64) @ unit),
            teacher=TeacherReport(
                type=teacher.type,
                model=self._teacher_model(body),
                sampled=len(sample),
                scored=len(scored),
                spread=spread,
                calls=result.calls,
                cache_hits=result.cache_hits,
                errors=result.errors,
            ),
            hyde_passage=passage,
            loss_trajectory=[*losses, loss_after] if body.return_trajectory and losses is not None else None,
            timings_ms=timings,
        )
        embedding: list[float] | str | None = None
        if body.return_embedding:
            as_base64 = body.encoding_format == "base64"
            embedding = base64.b64encode(unit.astype("<f4").tobytes()).decode() if as_base64 else unit.tolist()
        tokens = embedded.prompt_tokens + candidates.prompt_tokens
        return RefineResponse(
            model=body.model,
            corpus_id=body.corpus_id,
            data=data,
            embedding=embedding,
            diagnostics=diagnostics,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def _hyde(self, body: RefineRequest) -> str:
        assert body.hyde is not None
        chat, model = self.teachers.chat_model(body.hyde.model, "hyde")
        passage = await llm.write_passage(
            chat,
            model,
            body.query,
            body.sampling.seed,
            body.hyde.temperature,
            body.hyde.max_tokens,
            self.settings.teacher_timeout_s,
        )
        if isinstance(passage, CallError):
            message = f"HyDE: the LLM wrote no passage: {passage.code}: {passage.message}"
            if passage.code == "timeout":
                raise DeadlineExceeded(message, code="hyde_timeout")
            raise TeacherFailed(message, code="hyde_failed")
        return passage

    async def _candidates(self, body: RefineRequest, dimension: int, request_id: str) -> _Candidates:
        if body.corpus_id is not None:
            corpus = await self.corpora.load(body.corpus_id, body.model)
            if not corpus.ids:
                raise InvalidRequest(f"corpus {body.corpus_id!r} holds no documents", param="corpus_id")
            return _Candidates(corpus.ids, list(corpus.texts), corpus.vectors, 0)
        documents = body.documents or []
        if len(documents) > self.settings.max_inputs:
            raise PayloadTooLarge(
                f"{len(documents)} documents; at most {self.settings.max_inputs} per request (store more as a corpus)",
                param="documents",
            )
        vectors = np.zeros((len(documents), dimension), np.float32)
        for i, d in enumerate(documents):
            if d.embedding is not None:
                if len(d.embedding) != dimension:
                    raise InvalidRequest(
                        f"document {d.id!r}: the embedding has {len(d.embedding)} values; model {body.model!r} "
                        f"makes {dimension}",
                        param="documents",
                    )
                vectors[i] = d.embedding
        todo = [i for i, d in enumerate(documents) if d.embedding is None]
        tokens = 0
        if todo:
            options = EmbedOptions(refinement_steps=body.refinement_steps, input_type="document")
            texts: list[str | list[int]] = [documents[i].text or "" for i in todo]
            embedded = await self.embedder.embed(body.model, texts, options, request_id)
            vectors[todo] = embedded.vectors
            tokens = embedded.prompt_tokens
        return _Candidates([d.id for d in documents], [d.text for d in documents], vectors, tokens)

    def _teacher_model(self, body: RefineRequest) -> str | None:
        if body.teacher.type == "llm":
            return body.teacher.model or self.settings.judge_model
        return body.teacher.model
