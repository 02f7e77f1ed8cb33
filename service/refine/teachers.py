"""The teachers that score a sample of candidates for one query: an LLM judge, a cross-encoder worker, a second
embedding model, or the caller's labels.

A document a teacher could not score is reported with its error and left out of the optimisation (never given
a made-up score). When too many fail the request fails: 504 if they all timed out, 502 otherwise.
Everything the gateway's own models compute goes through the Embedder (cache, batching, admission, usage): the
cross-encoder's pairs and the teacher embedder's vectors. LLM judge scores are cached in the gateway's embedding
cache (Redis when configured) under their own key prefix, as one-value vectors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgpack
import numpy as np

from common.methods import facts
from common.protocol import ItemError
from service.cache import CachedEmbedding, EmbeddingCache
from service.embedder import Embedder, EmbedOptions
from service.errors import DeadlineExceeded, InvalidRequest, TeacherFailed
from service.refine import llm
from service.refine.api import Teacher, TeacherError
from service.refine.llm import CallError, ChatClient
from service.refine.optimizer import cosines, unit_rows
from service.settings import GatewaySettings

_SCORE_KEY_PREFIX = b"genembed:score:v2:"  # v2: the value layout of CachedEmbedding


@dataclass
class TeacherScores:
    """Scores for the sampled documents, in sample order; None where the teacher failed."""

    scores: list[float | None]
    errors: list[TeacherError] = field(default_factory=list)
    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0  # tokens the gateway's own models took (cached scores count theirs); the judge's: 0


def _score_key(*identity: object) -> bytes:
    return _SCORE_KEY_PREFIX + hashlib.blake2b(msgpack.packb(identity), digest_size=20).digest()


def _text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class ScoreCache:
    """Judge scores in the embedding cache: same backend, TTL and fail-open behaviour, another key space."""

    def __init__(self, cache: EmbeddingCache) -> None:
        self._cache = cache

    async def get(self, keys: list[bytes]) -> list[float | None]:
        """The cached score per key (None: missing)."""
        return [float(hit.vector[0]) if hit is not None else None for hit in await self._cache.get_many(keys)]

    async def put(self, scores: dict[bytes, float]) -> None:
        if scores:
            entries = {k: CachedEmbedding(np.array([s], np.float32), 0, False) for k, s in scores.items()}
            await self._cache.put_many(entries)


class Teachers:
    """Scores a sample with the teacher a request names; one per app (refine-query and rerank share it and its
    judge client), closed with the app."""

    def __init__(self, settings: GatewaySettings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        self.cache = ScoreCache(embedder.cache)
        key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else None
        self.chat = ChatClient(settings.judge_url, key, settings.teacher_max_retries) if settings.judge_url else None

    async def aclose(self) -> None:
        if self.chat is not None:
            await self.chat.aclose()

    def chat_model(self, requested: str | None, purpose: str) -> tuple[ChatClient, str]:
        """The judge client and the model to ask; a 400 naming the missing setting when there is none."""
        if self.chat is None:
            raise InvalidRequest(f"{purpose} needs an LLM: set GENEMBED_JUDGE_URL on the gateway", param="teacher")
        model = requested or self.settings.judge_model
        if not model:
            raise InvalidRequest(f"{purpose} needs a model name: send one or set GENEMBED_JUDGE_MODEL", param="model")
        return self.chat, model

    async def score(
        self,
        teacher: Teacher,
        query: str,
        instruction: str | None,
        ids: list[str],
        texts: list[str | None],
        seed: int,
        request_id: str,
        budget_s: float,
        max_error_fraction: float | None = None,
    ) -> TeacherScores:
        """Scores for the documents `ids` (with their `texts`) within `budget_s` seconds; raises TeacherFailed /
        DeadlineExceeded when more than `max_error_fraction` (default: the setting) of them failed."""
        if teacher.type == "labels":
            labels = teacher.labels or {}
            return TeacherScores([float(labels.get(i, 0.0)) for i in ids])
        missing = next((i for i, t in zip(ids, texts, strict=True) if t is None), None)
        if missing is not None:
            raise InvalidRequest(f"document {missing!r} has no text, which the {teacher.type} teacher needs")
        documents = [t for t in texts if t is not None]
        if teacher.type == "llm":
            result = await self._llm(teacher, query, instruction, ids, documents, seed, budget_s)
        elif teacher.type == "cross_encoder":
            result = await self._cross_encoder(teacher, query, ids, documents, request_id, budget_s)
        else:
            result = await self._embedder(teacher, query, documents, request_id)
        allowed = self.settings.teacher_max_error_fraction if max_error_fraction is None else max_error_fraction
        self._check_failures(teacher, result, len(ids), allowed)
        return result

    async def _llm(
        self,
        teacher: Teacher,
        query: str,
        instruction: str | None,
        ids: list[str],
        documents: list[str],
        seed: int,
        budget_s: float,
    ) -> TeacherScores:
        chat, model = self.chat_model(teacher.model, "the llm teacher")
        task = (instruction if teacher.instruction is None else teacher.instruction) or None
        keys = [_score_key(model, llm.JUDGE_PROMPT_VERSION, query, task, _text_digest(d)) for d in documents]
        scores = await self.cache.get(keys)
        todo = [i for i, s in enumerate(scores) if s is None]
        result = TeacherScores(scores, cache_hits=len(documents) - len(todo), calls=len(todo))
        outcomes = await llm.judge(
            chat,
            model,
            query,
            task,
            [documents[i] for i in todo],
            teacher.max_concurrency or self.settings.teacher_max_concurrency,
            teacher.timeout_s or self.settings.teacher_timeout_s,
            seed,
            budget_s,
        )
        fresh: dict[bytes, float] = {}
        for i, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, CallError):
                result.errors.append(TeacherError(id=ids[i], code=outcome.code, message=outcome.message))
            else:  # float32, as the cache keeps it: a cached answer equals the fresh one
                result.scores[i] = float(np.float32(outcome))
                fresh[keys[i]] = result.scores[i]
        await self.cache.put(fresh)
        return result

    async def _cross_encoder(
        self, teacher: Teacher, query: str, ids: list[str], documents: list[str], request_id: str, budget_s: float
    ) -> TeacherScores:
        model = teacher.model or ""
        info = self.embedder.model_info(model)
        if not facts(info.method).scores_pairs:
            raise InvalidRequest(f"model {model!r} is a {info.method} model, not a cross_encoder", param="teacher")
        scored = await self.embedder.score_pairs(model, query, documents, request_id, budget_s)
        result = TeacherScores(
            [None if isinstance(s, ItemError) else s for s in scored.scores],
            calls=len(documents) - scored.cache_hits,
            cache_hits=scored.cache_hits,
            prompt_tokens=scored.prompt_tokens,
        )
        for i, score in enumerate(scored.scores):
            if isinstance(score, ItemError):
                result.errors.append(TeacherError(id=ids[i], code=score.code, message=score.message))
        return result

    async def _embedder(self, teacher: Teacher, query: str, documents: list[str], request_id: str) -> TeacherScores:
        model = teacher.model or ""
        q = await self.embedder.embed(model, [query], EmbedOptions(input_type="query"), request_id)
        d = await self.embedder.embed(model, list(documents), EmbedOptions(input_type="document"), request_id)
        scores = cosines(unit_rows(d.vectors), q.vectors[0])
        hits = (q.cache == "hit") + (d.cache == "hit")
        tokens = q.prompt_tokens + d.prompt_tokens
        return TeacherScores([float(s) for s in scores], calls=2 - hits, cache_hits=hits, prompt_tokens=tokens)

    @staticmethod
    def _check_failures(teacher: Teacher, result: TeacherScores, sampled: int, allowed: float) -> None:
        failed = len(result.errors)
        if not failed or (failed <= allowed * sampled and sampled - failed >= 2):
            return
        first = result.errors[0]
        message = (
            f"the {teacher.type} teacher failed on {failed} of {sampled} sampled documents "
            f"(more than {allowed:.0%} allowed); "
            f"first: document {first.id!r}: {first.code}: {first.message}"
        )
        if all(e.code == "timeout" for e in result.errors):
            raise DeadlineExceeded(message, code="teacher_timeout")
        raise TeacherFailed(message)
