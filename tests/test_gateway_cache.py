"""The embedding cache: a real redis-server (hit, slow, killed, back) and the in-memory LRU."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from common.protocol import EmbedItem, ModelInfo
from harness.procs import free_port
from service.cache import CachedEmbedding, MemoryCache, cache_key
from tests.gateway_fixtures import gateway_process, redis_process


def embed(url: str, value: str | list[str], **extra: object) -> httpx.Response:
    body = {"model": "minilm-l6", "input": value, "encoding_format": "base64", **extra}
    response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response


def wait_for_hit(url: str, text: str, timeout: float = 10) -> None:
    """Caching has resumed once a repeated request is a hit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        embed(url, text)
        if embed(url, text).headers["x-cache"] == "hit":
            return
        time.sleep(0.2)
    raise AssertionError("caching did not resume")


def log_count(tmp_path: Path, phrase: str) -> int:
    return sum(p.read_text().count(phrase) for p in tmp_path.glob("gateway-*.log"))


@pytest.mark.slow
def test_redis_hit_outage_and_recovery(minilm_worker, tmp_path):
    port = free_port()
    env = {
        "GENEMBED_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "GENEMBED_REDIS_RETRY_S": "0.5",
        "GENEMBED_CACHE_TTL_S": "600",
    }
    with (
        redis_process(tmp_path, port) as (_, redis_proc),
        gateway_process(tmp_path, {"minilm-l6": minilm_worker}, env) as (url, _),
    ):
        first = embed(url, "the tide comes in twice a day")
        second = embed(url, "the tide comes in twice a day")
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert first.json()["data"] == second.json()["data"]  # the same float32 bytes
        assert first.json()["usage"] == second.json()["usage"]
        assert embed(url, "the tide comes in twice a day", dimensions=8).headers["x-cache"] == "hit"
        assert embed(url, ["the tide comes in twice a day", "a new sentence"]).headers["x-cache"] == "partial"
        client = redis.Redis(port=port)
        keys = client.keys("genembed:emb:*")
        assert len(keys) == 2 and 0 < client.ttl(keys[0]) <= 600

        os.kill(redis_proc.pid, signal.SIGSTOP)  # slow: accepts, answers nothing
        try:
            started = time.monotonic()
            assert embed(url, "while redis stalls").headers["x-cache"] == "miss"
            assert time.monotonic() - started < 2
        finally:
            os.kill(redis_proc.pid, signal.SIGCONT)
        wait_for_hit(url, "after the stall")
        assert log_count(tmp_path, "unavailable") == log_count(tmp_path, "caching resumed") == 1

        redis_proc.kill()
        redis_proc.wait()
        for i in range(5):
            assert embed(url, f"while redis is down {i}").headers["x-cache"] == "miss"
        assert embed(url, "while redis is down 0").headers["x-cache"] == "miss"
        metrics = httpx.get(f"{url}/metrics").text
        assert "genembed_gateway_cache_available 0.0" in metrics
        assert 'genembed_gateway_cache_errors_total{op="get"}' in metrics
        assert log_count(tmp_path, "unavailable") == 2  # one line for the whole outage

        with redis_process(tmp_path, port):
            wait_for_hit(url, "redis is back")
            assert log_count(tmp_path, "caching resumed") == 2
            assert "genembed_gateway_cache_available 1.0" in httpx.get(f"{url}/metrics").text


def entry(value: float, dim: int = 4) -> CachedEmbedding:
    return CachedEmbedding(np.full(dim, value, np.float32), prompt_tokens=3, truncated=False)


async def test_memory_cache_is_an_lru_bounded_by_bytes():
    one = entry(1).nbytes
    cache = MemoryCache(max_bytes=3 * one, ttl_s=0)
    await cache.put_many({b"a": entry(1), b"b": entry(2), b"c": entry(3)})
    assert [e.vector[0] if e else None for e in await cache.get_many([b"a"])] == [1]  # a is now most recent
    await cache.put_many({b"d": entry(4)})  # evicts b, the least recently used
    found = await cache.get_many([b"a", b"b", b"c", b"d"])
    assert [e.vector[0] if e else None for e in found] == [1, None, 3, 4]
    assert cache.nbytes == 3 * one
    await cache.put_many({b"huge": entry(5, dim=1000)})  # larger than the whole cache: not stored
    assert await cache.get_many([b"huge"]) == [None] and cache.nbytes == 3 * one


async def test_memory_cache_entries_expire():
    cache = MemoryCache(max_bytes=1 << 20, ttl_s=0.05)
    await cache.put_many({b"a": entry(1)})
    assert (await cache.get_many([b"a"]))[0] is not None
    await asyncio.sleep(0.1)
    assert await cache.get_many([b"a"]) == [None] and cache.nbytes == 0


def test_cached_value_round_trips():
    value = CachedEmbedding(np.random.default_rng(0).standard_normal(576).astype(np.float32), 17, True)
    back = CachedEmbedding.decode(value.encode())
    np.testing.assert_array_equal(back.vector, value.vector)
    assert (back.prompt_tokens, back.truncated) == (17, True)


def test_the_key_names_everything_that_changes_the_vector():
    info = ModelInfo("m", "gircse", 576, 0, 20, 5, 512, 49152, "float32", "cpu", "rev1")
    base = EmbedItem(text="hello", steps=5)
    variants = [
        (info, base),
        (ModelInfo(**{**info.__dict__, "revision": "rev2"}), base),
        (ModelInfo(**{**info.__dict__, "id": "other"}), base),
        (info, EmbedItem(text="hello", steps=4)),
        (info, EmbedItem(text="hello", steps=5, input_type="document")),
        (info, EmbedItem(text="hello", steps=5, instruction="")),
        (info, EmbedItem(text="hello ", steps=5)),
        (info, EmbedItem(token_ids=[1, 2], steps=5)),
    ]
    keys = {cache_key(i, item) for i, item in variants}
    assert len(keys) == len(variants)
    assert cache_key(info, EmbedItem(text="hello", steps=5, truncate=False)) == cache_key(info, base)
