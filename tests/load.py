"""Concurrent /v1/embeddings load and Prometheus samples, for the fleet, supervision and drain tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "minilm-l6"
_WORDS = "solar panel turbine river mountain engine protein market theory signal forest harbor circuit".split()


def texts(tag: str, n: int, words: int = 40) -> list[str]:
    """`n` distinct inputs of about `words` words (distinct, so no cache or coalescing answers them)."""
    return [f"{tag} {i}: " + " ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(words)) for i in range(n)]


def body(tag: str, n: int, words: int = 40) -> dict[str, object]:
    return {"model": MODEL, "input": texts(tag, n, words)}


def sample(url: str, name: str, **labels: str) -> float:
    """The sum of the `name` samples at `url`/metrics whose labels include `labels` (0 when there are none)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def items_done(worker_url: str) -> float:
    """Inputs a worker has answered (its warm-up included)."""
    return sample(worker_url, "genembed_worker_items_total", outcome="ok")


async def post_all(url: str, bodies: list[dict[str, object]], concurrency: int) -> list[httpx.Response]:
    """POST every body to /v1/embeddings, `concurrency` at a time; responses in order."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(b: dict[str, object]) -> httpx.Response:
            async with gate:
                return await client.post("/v1/embeddings", json=b)

        return await asyncio.gather(*(one(b) for b in bodies))


def poll(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Wait until `check()` holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


async def apoll(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """`poll` inside an event loop (the checks are quick blocking calls; the load runs between them)."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(interval)
