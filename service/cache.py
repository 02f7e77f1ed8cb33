"""The embedding cache: Redis when GENEMBED_REDIS_URL is set, an in-memory LRU otherwise.

The key names everything that determines a vector (model id, worker revision, K, the `auto` tolerance,
whether the trajectory is kept, input type, instruction, o1 seed and samples, exact text or token ids);
the value is the full float32 vector (and trajectory) with its token count and the steps that ran,
so `dimensions`, encoding and usage are applied after a hit exactly as after a computation.
The cache is an optimisation, never a dependency: a Redis that fails or is slow is bypassed
(uncached service, one log line per outage) and retried every `redis_retry_s` until it answers.
Credentials are the exception at start: a Redis that refuses them will not change its mind, so the gateway
does not start (`check_redis`); refused later (a rotated password), it is an outage like any other.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgpack
import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError

from common.protocol import EmbedItem, ModelInfo
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings

log = logging.getLogger(__name__)

_VALUE_HEADER = struct.Struct("<IBHH")  # prompt tokens, truncated, steps run, trajectory rows
_KEY_PREFIX = b"genembed:emb:v2:"
_START_CHECK_TIMEOUT_S = 5.0  # the start check waits longer than a request would: Redis may be starting too
T = TypeVar("T")


@dataclass(frozen=True)
class CachedEmbedding:
    vector: np.ndarray  # float32, the worker's full dimension
    prompt_tokens: int
    truncated: bool
    steps: int = 0  # steps that ran (fewer than the budget when `auto` stopped early)
    trajectory: np.ndarray | None = None  # [steps, D] float32, when the input asked for it

    def encode(self) -> bytes:
        rows = np.zeros((0, len(self.vector)), "<f4") if self.trajectory is None else self.trajectory.astype("<f4")
        header = _VALUE_HEADER.pack(self.prompt_tokens, self.truncated, self.steps, len(rows))
        return header + self.vector.astype("<f4").tobytes() + rows.tobytes()

    @classmethod
    def decode(cls, value: bytes) -> CachedEmbedding:
        tokens, truncated, steps, rows = _VALUE_HEADER.unpack_from(value)
        values = np.frombuffer(value, "<f4", offset=_VALUE_HEADER.size).reshape(rows + 1, -1)
        return cls(values[0], tokens, bool(truncated), steps, values[1:] if rows else None)

    def copy(self) -> CachedEmbedding:
        """Own arrays: a worker's vector is a view that would keep its whole response body alive."""
        trajectory = None if self.trajectory is None else self.trajectory.copy()
        return CachedEmbedding(self.vector.copy(), self.prompt_tokens, self.truncated, self.steps, trajectory)

    @property
    def nbytes(self) -> int:
        return _VALUE_HEADER.size + self.vector.nbytes + (0 if self.trajectory is None else self.trajectory.nbytes)


def cache_key(info: ModelInfo, item: EmbedItem) -> bytes:
    """Also the coalescer's identity of an input: equal keys are computed once. `item.steps` is resolved."""
    body = item.text if item.text is not None else item.token_ids
    identity = msgpack.packb(
        [
            info.id,
            info.revision,
            item.steps,
            item.tolerance,
            item.trajectory,
            item.input_type,
            item.instruction,
            item.seed,
            item.samples,
            body,
            # A cross-encoder's pair: its document, too (appended only then, so other keys stay as they were).
            *([item.text_pair] if item.text_pair is not None else []),
        ]
    )
    return _KEY_PREFIX + hashlib.blake2b(identity, digest_size=20).digest()


class EmbeddingCache(Protocol):
    async def get_many(self, keys: list[bytes]) -> list[CachedEmbedding | None]: ...

    async def put_many(self, entries: dict[bytes, CachedEmbedding]) -> None: ...

    async def aclose(self) -> None: ...


class MemoryCache:
    """LRU bounded by bytes, with a TTL per entry (0: none)."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.nbytes = 0
        self._entries: OrderedDict[bytes, tuple[CachedEmbedding, float]] = OrderedDict()

    async def get_many(self, keys: list[bytes]) -> list[CachedEmbedding | None]:
        now = time.monotonic()
        found: list[CachedEmbedding | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry[1] < now:
                self._drop(key)
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
            found.append(entry[0] if entry else None)
        return found

    async def put_many(self, entries: dict[bytes, CachedEmbedding]) -> None:
        expires = time.monotonic() + self.ttl_s if self.ttl_s else float("inf")
        for key, value in entries.items():
            if value.nbytes > self.max_bytes:
                continue
            self._drop(key)
            value = value.copy()
            self._entries[key] = (value, expires)
            self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[0].nbytes

    async def aclose(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}:{parts.port or 6379}"))


class RedisCache:
    """redis-py asyncio; every operation is bounded by `redis_timeout_s` and fails open."""

    def __init__(self, url: str, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.url = _redacted(url)
        self.ttl_s = settings.cache_ttl_s or None
        self.timeout_s = settings.redis_timeout_s
        self.retry_s = settings.redis_retry_s
        self.metrics = metrics
        self.available = True
        self._outage: str | None = None  # what the current outage was last logged as
        self._retry_at = 0.0
        self._redis = _connect(url, self.timeout_s)

    async def _guarded(self, op: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """Run `call` unless Redis is in an outage; on failure start one and return None. An outage is logged
        when it starts and when it turns into refused credentials (a restarted Redis with a rotated password
        first drops the connections, then refuses the new ones)."""
        now = time.monotonic()
        if not self.available and now < self._retry_at:
            return None
        try:
            result = await asyncio.wait_for(call(), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self.metrics.cache_errors.labels(op).inc()
            self._retry_at = now + self.retry_s
            self.available = False
            self.metrics.cache_available.set(0)
            refused = isinstance(exc, AuthenticationError)
            outage = "refused the gateway's credentials (check GENEMBED_REDIS_PASSWORD)" if refused else "unavailable"
            if outage != self._outage:
                self._outage = outage
                log.warning("redis at %s %s (%r): serving uncached until it answers again", self.url, outage, exc)
            return None
        if not self.available:
            self.available = True
            self._outage = None
            self.metrics.cache_available.set(1)
            log.info("redis at %s answers again: caching resumed", self.url)
        return result

    async def get_many(self, keys: list[bytes]) -> list[CachedEmbedding | None]:
        values = await self._guarded("get", lambda: self._redis.mget(keys))
        if values is None:
            return [None] * len(keys)
        return [CachedEmbedding.decode(v) if v is not None else None for v in values]

    async def put_many(self, entries: dict[bytes, CachedEmbedding]) -> None:
        async def write() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in entries.items():
                    pipe.set(key, value.encode(), ex=self.ttl_s)
                await pipe.execute()

        await self._guarded("put", write)

    async def aclose(self) -> None:
        await self._redis.aclose()


def _connect(url: str, timeout_s: float) -> aioredis.Redis:
    # No client-side retries: a failure is an outage to route around, not to wait out.
    return aioredis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


async def check_redis(settings: GatewaySettings) -> None:
    """At the gateway's start: raises ValueError, naming what to fix, when Redis refuses the credentials; a
    Redis that does not answer yet only gets a warning (the cache serves around it until it does)."""
    if not settings.redis_url:
        return
    url = _redacted(settings.redis_url)
    client = _connect(settings.redis_url, _START_CHECK_TIMEOUT_S)
    try:
        await client.ping()
    except AuthenticationError as exc:
        sent = "a password that" if urlsplit(settings.redis_url).password else "no password, which"
        raise ValueError(
            f"redis at {url} refused the gateway's credentials: {sent} it refused ({exc}); set "
            "GENEMBED_REDIS_PASSWORD to its requirepass"
        ) from exc
    except (RedisError, OSError) as exc:
        log.warning("redis at %s does not answer yet (%r): serving uncached until it does", url, exc)
    finally:
        await client.aclose()


def build_cache(settings: GatewaySettings, metrics: GatewayMetrics) -> EmbeddingCache:
    metrics.cache_available.set(1)
    if settings.redis_url:
        return RedisCache(settings.redis_url, settings, metrics)
    return MemoryCache(int(settings.cache_max_mb * 1024 * 1024), settings.cache_ttl_s)
