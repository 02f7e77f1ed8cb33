"""Stored corpora: documents embedded once by a served model, kept with their texts, scored whole by refine-query.

Storage is Redis when GENEMBED_REDIS_URL is set, process memory otherwise. In Redis a corpus is a metadata key,
a set of its document ids, and chunks (one per embedding batch: msgpack of ids, texts and the float32 vectors as
raw bytes). Uploads are embedded batch by batch, each batch stored as it comes, so an upload's vectors are never
all in memory at once; the chunks become part of the corpus only in one final transaction that also checks the
model revision and the ids, so a failed or conflicting upload leaves the corpus as it was. Until then chunks carry
a TTL, so a gateway that dies mid-upload leaves nothing behind for long.

Unlike the embedding cache, this is data, not an optimisation: a Redis failure is a 503, not a silent bypass.
It therefore has a client of its own, with longer timeouts than the cache's fail-fast one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

import msgpack
import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from service.embedder import Embedder, EmbedOptions
from service.errors import Conflict, CorpusNotFound, InvalidRequest, Unavailable
from service.refine.api import CorpusAdd, CorpusCard, CorpusCreate, CorpusDeleted, CorpusDocument
from service.settings import GatewaySettings

T = TypeVar("T")

_KEY = "genembed:corpus:v1:"
_REDIS_TIMEOUT_S = 10.0
_PENDING_CHUNK_TTL_S = 24 * 3600


@dataclass
class CorpusMeta:
    id: str
    model: str  # the name clients send
    served_model: str  # the worker's model id
    revision: str
    dimension: int
    refinement_steps: int
    documents: int = 0
    chunks: list[str] = field(default_factory=list)
    created_at: int = 0
    updated_at: int = 0

    def card(self) -> CorpusCard:
        return CorpusCard(**{k: v for k, v in asdict(self).items() if k != "chunks"})


@dataclass
class Chunk:
    ids: list[str]
    texts: list[str]
    vectors: np.ndarray  # (len(ids), dimension) float32

    def encode(self) -> bytes:
        return msgpack.packb([self.ids, self.texts, np.ascontiguousarray(self.vectors, "<f4").tobytes()])

    @classmethod
    def decode(cls, value: bytes, dimension: int) -> Chunk:
        ids, texts, raw = msgpack.unpackb(value)
        return cls(ids, texts, np.frombuffer(raw, "<f4").reshape(len(ids), dimension))


@dataclass
class LoadedCorpus:
    meta: CorpusMeta
    ids: list[str]
    texts: list[str]
    vectors: np.ndarray  # (documents, dimension) float32


class CorpusStore(Protocol):
    async def create(self, meta: CorpusMeta) -> None:
        """Raises Conflict if the id exists."""

    async def get(self, corpus_id: str) -> CorpusMeta | None: ...

    async def known_ids(self, corpus_id: str, ids: list[str]) -> list[str]:
        """Those of `ids` the corpus already holds."""

    async def put_chunk(self, corpus_id: str, chunk_id: str, chunk: Chunk) -> None:
        """Store a chunk that stays invisible until `commit` names it."""

    async def commit(self, corpus_id: str, chunk_ids: list[str], ids: list[str], revision: str) -> CorpusMeta:
        """Atomically append the chunks; raises CorpusNotFound, or Conflict on another revision or a known id."""

    async def discard(self, corpus_id: str, chunk_ids: list[str]) -> None: ...

    async def load(self, corpus_id: str) -> LoadedCorpus | None: ...

    async def delete(self, corpus_id: str) -> bool: ...

    async def aclose(self) -> None: ...


def _revision_conflict(meta: CorpusMeta, revision: str) -> Conflict:
    return Conflict(
        f"corpus {meta.id!r} was embedded by revision {meta.revision} of model {meta.model!r}, but the worker now "
        f"serves revision {revision}: its vectors are not comparable; delete and re-create the corpus",
        code="corpus_revision_mismatch",
    )


def _duplicates_conflict(corpus_id: str, known: list[str]) -> Conflict:
    shown = ", ".join(repr(i) for i in known[:5])
    return Conflict(
        f"corpus {corpus_id!r} already holds {len(known)} of these document ids ({shown})", code="document_exists"
    )


def _assemble(meta: CorpusMeta, chunks: list[Chunk]) -> LoadedCorpus:
    vectors = np.concatenate([c.vectors for c in chunks]) if chunks else np.zeros((0, meta.dimension), np.float32)
    return LoadedCorpus(meta, [i for c in chunks for i in c.ids], [t for c in chunks for t in c.texts], vectors)


class MemoryCorpusStore:
    """For a single gateway without Redis; lost on restart."""

    def __init__(self) -> None:
        self._metas: dict[str, CorpusMeta] = {}
        self._ids: dict[str, set[str]] = {}
        self._chunks: dict[tuple[str, str], Chunk] = {}

    async def create(self, meta: CorpusMeta) -> None:
        if meta.id in self._metas:
            raise Conflict(f"corpus {meta.id!r} already exists", code="corpus_exists")
        self._metas[meta.id] = meta
        self._ids[meta.id] = set()

    async def get(self, corpus_id: str) -> CorpusMeta | None:
        meta = self._metas.get(corpus_id)
        return None if meta is None else CorpusMeta(**asdict(meta))

    async def known_ids(self, corpus_id: str, ids: list[str]) -> list[str]:
        held = self._ids.get(corpus_id, set())
        return [i for i in ids if i in held]

    async def put_chunk(self, corpus_id: str, chunk_id: str, chunk: Chunk) -> None:
        self._chunks[corpus_id, chunk_id] = chunk

    async def commit(self, corpus_id: str, chunk_ids: list[str], ids: list[str], revision: str) -> CorpusMeta:
        meta = self._metas.get(corpus_id)  # no await until the end: atomic on the event loop
        if meta is None:
            raise CorpusNotFound(f"corpus {corpus_id!r} does not exist")
        if meta.revision != revision:
            raise _revision_conflict(meta, revision)
        known = [i for i in ids if i in self._ids[corpus_id]]
        if known:
            raise _duplicates_conflict(corpus_id, known)
        self._ids[corpus_id].update(ids)
        meta.chunks.extend(chunk_ids)
        meta.documents += len(ids)
        meta.updated_at = int(time.time())
        return CorpusMeta(**asdict(meta))

    async def discard(self, corpus_id: str, chunk_ids: list[str]) -> None:
        for chunk_id in chunk_ids:
            self._chunks.pop((corpus_id, chunk_id), None)

    async def load(self, corpus_id: str) -> LoadedCorpus | None:
        meta = await self.get(corpus_id)
        if meta is None:
            return None
        return _assemble(meta, [self._chunks[corpus_id, c] for c in meta.chunks])

    async def delete(self, corpus_id: str) -> bool:
        meta = self._metas.pop(corpus_id, None)
        if meta is None:
            return False
        del self._ids[corpus_id]
        await self.discard(corpus_id, meta.chunks)
        return True

    async def aclose(self) -> None:
        self._metas.clear()
        self._ids.clear()
        self._chunks.clear()


class RedisCorpusStore:
    def __init__(self, url: str) -> None:
        self._redis = aioredis.from_url(url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S)

    @staticmethod
    def _meta_key(corpus_id: str) -> str:
        return _KEY + corpus_id

    @staticmethod
    def _ids_key(corpus_id: str) -> str:
        return f"{_KEY}{corpus_id}:ids"

    @staticmethod
    def _chunk_key(corpus_id: str, chunk_id: str) -> str:
        return f"{_KEY}{corpus_id}:chunk:{chunk_id}"

    async def _call(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"the corpus store (Redis) is unavailable: {type(exc).__name__}: {exc}",
                code="corpus_store_unavailable",
                retry_after=1,
            ) from exc

    async def create(self, meta: CorpusMeta) -> None:
        created = await self._call(self._redis.set(self._meta_key(meta.id), msgpack.packb(asdict(meta)), nx=True))
        if not created:
            raise Conflict(f"corpus {meta.id!r} already exists", code="corpus_exists")

    async def get(self, corpus_id: str) -> CorpusMeta | None:
        raw = await self._call(self._redis.get(self._meta_key(corpus_id)))
        return None if raw is None else CorpusMeta(**msgpack.unpackb(raw))

    async def known_ids(self, corpus_id: str, ids: list[str]) -> list[str]:
        if not ids:
            return []
        present = await self._call(self._redis.smismember(self._ids_key(corpus_id), ids))
        return [i for i, p in zip(ids, present, strict=True) if p]

    async def put_chunk(self, corpus_id: str, chunk_id: str, chunk: Chunk) -> None:
        key = self._chunk_key(corpus_id, chunk_id)
        await self._call(self._redis.set(key, chunk.encode(), ex=_PENDING_CHUNK_TTL_S))

    async def commit(self, corpus_id: str, chunk_ids: list[str], ids: list[str], revision: str) -> CorpusMeta:
        meta_key, ids_key = self._meta_key(corpus_id), self._ids_key(corpus_id)

        async def transaction() -> CorpusMeta:
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:  # optimistic: retried when a concurrent writer touched the corpus
                    try:
                        await pipe.watch(meta_key, ids_key)
                        raw = await pipe.get(meta_key)
                        if raw is None:
                            raise CorpusNotFound(f"corpus {corpus_id!r} does not exist")
                        meta = CorpusMeta(**msgpack.unpackb(raw))
                        if meta.revision != revision:
                            raise _revision_conflict(meta, revision)
                        present = await pipe.smismember(ids_key, ids)
                        known = [i for i, p in zip(ids, present, strict=True) if p]
                        if known:
                            raise _duplicates_conflict(corpus_id, known)
                        meta.chunks.extend(chunk_ids)
                        meta.documents += len(ids)
                        meta.updated_at = int(time.time())
                        pipe.multi()
                        pipe.set(meta_key, msgpack.packb(asdict(meta)))
                        pipe.sadd(ids_key, *ids)
                        for chunk_id in chunk_ids:
                            pipe.persist(self._chunk_key(corpus_id, chunk_id))
                        await pipe.execute()
                        return meta
                    except WatchError:
                        continue

        return await self._call(transaction())

    async def discard(self, corpus_id: str, chunk_ids: list[str]) -> None:
        if chunk_ids:
            await self._call(self._redis.delete(*(self._chunk_key(corpus_id, c) for c in chunk_ids)))

    async def load(self, corpus_id: str) -> LoadedCorpus | None:
        meta = await self.get(corpus_id)
        if meta is None:
            return None
        keys = [self._chunk_key(corpus_id, c) for c in meta.chunks]
        values = await self._call(self._redis.mget(keys)) if keys else []
        if any(v is None for v in values):  # deleted while we read it
            return None
        return _assemble(meta, [Chunk.decode(v, meta.dimension) for v in values])

    async def delete(self, corpus_id: str) -> bool:
        meta = await self.get(corpus_id)
        if meta is None:
            return False
        keys = [self._meta_key(corpus_id), self._ids_key(corpus_id)]
        keys += [self._chunk_key(corpus_id, c) for c in meta.chunks]
        return bool(await self._call(self._redis.delete(*keys)))

    async def aclose(self) -> None:
        await self._redis.aclose()


class Corpora:
    """The corpus operations behind the routes: embedding in batches, revision checks, the store."""

    def __init__(self, settings: GatewaySettings, embedder: Embedder) -> None:
        self.embedder = embedder
        self.batch_size = settings.corpus_batch_size
        self.store: CorpusStore = RedisCorpusStore(settings.redis_url) if settings.redis_url else MemoryCorpusStore()

    async def aclose(self) -> None:
        await self.store.aclose()

    async def meta(self, corpus_id: str) -> CorpusMeta:
        meta = await self.store.get(corpus_id)
        if meta is None:
            raise CorpusNotFound(f"corpus {corpus_id!r} does not exist", param="corpus_id")
        return meta

    async def create(self, body: CorpusCreate, request_id: str) -> CorpusCard:
        info = self.embedder.model_info(body.model)
        steps = info.default_refinement_steps if body.refinement_steps is None else body.refinement_steps
        now = int(time.time())
        meta = CorpusMeta(
            body.id, body.model, info.id, info.revision, info.dimension, steps, created_at=now, updated_at=now
        )
        await self.store.create(meta)
        if not body.documents:
            return meta.card()
        try:
            return (await self._ingest(meta, body.documents, request_id)).card()
        except BaseException:
            await asyncio.shield(self.store.delete(body.id))  # creation is all or nothing
            raise

    async def add(self, corpus_id: str, body: CorpusAdd, request_id: str) -> CorpusCard:
        meta = await self.meta(corpus_id)
        return (await self._ingest(meta, body.documents, request_id)).card()

    async def delete(self, corpus_id: str) -> CorpusDeleted:
        if not await self.store.delete(corpus_id):
            raise CorpusNotFound(f"corpus {corpus_id!r} does not exist", param="corpus_id")
        return CorpusDeleted(id=corpus_id)

    async def load(self, corpus_id: str, model: str) -> LoadedCorpus:
        """The whole corpus, checked against the model the request names and the revision it now serves."""
        meta = await self.meta(corpus_id)
        if meta.model != model:
            raise InvalidRequest(
                f"corpus {corpus_id!r} holds vectors of model {meta.model!r}, not {model!r}", param="model"
            )
        revision = self.embedder.model_info(model).revision
        if meta.revision != revision:
            raise _revision_conflict(meta, revision)
        loaded = await self.store.load(corpus_id)
        if loaded is None:
            raise CorpusNotFound(f"corpus {corpus_id!r} does not exist", param="corpus_id")
        return loaded

    async def _ingest(self, meta: CorpusMeta, documents: list[CorpusDocument], request_id: str) -> CorpusMeta:
        """Embed `documents` batch by batch into pending chunks, then commit them in one step."""
        revision = self.embedder.model_info(meta.model).revision
        if meta.revision != revision:
            raise _revision_conflict(meta, revision)
        ids = [d.id for d in documents]
        known = await self.store.known_ids(meta.id, ids)
        if known:
            raise _duplicates_conflict(meta.id, known)
        options = EmbedOptions(refinement_steps=meta.refinement_steps, input_type="document")
        chunk_ids: list[str] = []
        try:
            for start in range(0, len(documents), self.batch_size):
                batch = documents[start : start + self.batch_size]
                texts = [d.text for d in batch]
                embedded = await self.embedder.embed(meta.model, list(texts), options, request_id)
                chunk_id = uuid.uuid4().hex
                await self.store.put_chunk(meta.id, chunk_id, Chunk([d.id for d in batch], texts, embedded.vectors))
                chunk_ids.append(chunk_id)
            # The worker may have been replaced by another revision while we embedded: then nothing is stored.
            return await self.store.commit(meta.id, chunk_ids, ids, self.embedder.model_info(meta.model).revision)
        except BaseException:
            await asyncio.shield(self.store.discard(meta.id, chunk_ids))
            raise
