"""Per-key rate limits (requests and prompt tokens per minute) and usage accounting, per gateway process.

Each limit is a token bucket holding a minute's allowance, refilled continuously: a key may burst its
whole minute, then goes at the steady rate. Requests are counted when admitted. Tokens are the prompt
tokens the request's embeddings used (what `usage.prompt_tokens` reports, cache hits included), known
only once it is answered: they are charged afterwards and may take the bucket below zero, and a key
whose token bucket is below one token is refused until it refills. So one large request is never cut
off halfway and the next ones wait until the minute's average is back under the limit; an estimate
charged up front would have to be corrected anyway. Concurrent requests admitted together may
overshoot by their own size.

With several gateway replicas each enforces its limits on its own share of the traffic: configure
limits divided by the replica count (or route a key to one replica).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass

from fastapi import Depends, Request

from service.auth import ApiKey, ApiKeys
from service.errors import RateLimited
from service.metrics import GatewayMetrics


@dataclass
class _Meter:
    tokens: int = 0


_meter: ContextVar[_Meter | None] = ContextVar("genembed_usage_meter", default=None)


def meter_tokens(tokens: int) -> None:
    """Charge prompt tokens to the key of the request being served (no-op outside an authenticated request)."""
    meter = _meter.get()
    if meter is not None:
        meter.tokens += tokens


class _Bucket:
    """A minute's allowance, refilled continuously; the level may go negative (tokens charged after the fact)."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.rate = per_minute / 60
        self.capacity = float(per_minute)
        self.level = self.capacity
        self.updated = now

    def wait_s(self, now: float, amount: float = 1.0) -> float:
        """Seconds until `amount` is available (0: now)."""
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount


class KeyLimiter:
    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def _bucket(self, buckets: dict[str, _Bucket], key: str, per_minute: int | None, now: float) -> _Bucket | None:
        if per_minute is None:
            return None
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(per_minute, now)
        return bucket

    def admit(self, key: ApiKey) -> None:
        """Count a request for `key`, or raise RateLimited (429) naming when to come back."""
        now = self._clock()
        requests = self._bucket(self._requests, key.name, key.rpm, now)
        tokens = self._bucket(self._tokens, key.name, key.tpm, now)
        checks = [
            (bucket.wait_s(now), kind, per_minute)
            for kind, per_minute, bucket in (("requests", key.rpm, requests), ("tokens", key.tpm, tokens))
            if bucket is not None
        ]
        wait_s, kind, per_minute = max(checks, default=(0.0, "", None))
        if wait_s > 0:
            self.metrics.key_rejections.labels(key.name, kind).inc()
            retry_after = math.ceil(wait_s)
            raise RateLimited(
                f"rate limit reached for API key {key.name!r}: {per_minute} {kind} per minute; "
                f"retry after {retry_after} s",
                retry_after=retry_after,
            )
        if requests is not None:
            requests.take(1)
        self.metrics.key_requests.labels(key.name).inc()

    def charge(self, key: ApiKey, tokens: int) -> None:
        bucket = self._bucket(self._tokens, key.name, key.tpm, self._clock())
        if bucket is not None:
            bucket.take(tokens)
        self.metrics.key_tokens.labels(key.name).inc(tokens)

    def dependency(self, auth: ApiKeys) -> Callable[..., AsyncIterator[None]]:
        """The FastAPI dependency of the authenticated routes: auth, then the key's limits, then its usage."""

        # `= Depends(auth)`, not Annotated: annotations are strings here, and `auth` is not a module global.
        async def authorized(request: Request, key: ApiKey | None = Depends(auth)) -> AsyncIterator[None]:  # noqa: B008
            if key is None:  # auth is off: nothing to limit or account
                yield
                return
            request.state.api_key = key.name
            self.admit(key)
            meter = _Meter()
            _meter.set(meter)  # the request's own context: the embedder's charges land here
            try:
                yield
            finally:
                self.charge(key, meter.tokens)

        return authorized
