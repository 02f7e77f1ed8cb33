"""The batch storage contract, against a directory and a real S3-compatible server (moto's, on 127.0.0.1).

Both implementations must give the same answers: versions that change with the content, compare-and-swap that
refuses a stale writer (what a batch's lease and checkpoints rely on, across gateways too), streamed uploads and
reads of more than one multipart part, listing and deletion.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from service.batches.storage import BlobStore, LocalStore, PreconditionFailed, S3Store
from service.batches.store import lines
from service.settings import GatewaySettings
from tests.s3 import gateway_env, moto_s3

MiB = 1 << 20


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as url:
        yield url


def s3_settings(endpoint: str, prefix: str) -> GatewaySettings:
    """What `GENEMBED_BATCH_S3_*` would set, read as a gateway reads them."""
    return GatewaySettings.model_validate(
        {name.removeprefix("GENEMBED_").lower(): value for name, value in gateway_env(endpoint, prefix).items()}
    )


@pytest.fixture(params=["local", "s3"])
async def stores(request, tmp_path: Path) -> AsyncIterator[tuple[BlobStore, BlobStore]]:
    """Two stores on the same storage (two gateways sharing a volume or a bucket)."""
    if request.param == "local":
        pair: tuple[BlobStore, BlobStore] = (LocalStore(tmp_path), LocalStore(tmp_path))
    else:
        settings = s3_settings(request.getfixturevalue("s3_endpoint"), f"{tmp_path.name}/")
        pair = (S3Store(settings, part_bytes=5 * MiB), S3Store(settings, part_bytes=5 * MiB))
    for store in pair:
        await store.start()
    yield pair
    for store in pair:
        await store.aclose()


async def test_objects_round_trip_with_versions_that_follow_the_content(stores) -> None:
    store, _ = stores
    assert await store.read("a/one.json") is None
    v1 = await store.write("a/one.json", b'{"n": 1}')
    assert await store.read("a/one.json") == (b'{"n": 1}', v1)
    v2 = await store.write("a/one.json", b'{"n": 2}')
    assert v2 != v1
    assert await store.read("a/one.json") == (b'{"n": 2}', v2)


async def test_compare_and_swap_refuses_a_stale_or_absent_version_and_an_existing_object(stores) -> None:
    first, second = stores
    v1 = await first.write("lease.json", b"mine", if_absent=True)
    with pytest.raises(PreconditionFailed):
        await second.write("lease.json", b"theirs", if_absent=True)
    v2 = await second.write("lease.json", b"theirs", if_version=v1)
    with pytest.raises(PreconditionFailed):
        await first.write("lease.json", b"stale", if_version=v1)
    with pytest.raises(PreconditionFailed):
        await first.write("missing.json", b"x", if_version=v1)
    assert await first.read("lease.json") == (b"theirs", v2)


async def test_concurrent_read_modify_write_through_two_stores_loses_no_update(stores) -> None:
    """Two gateways incrementing one counter with compare-and-swap: every increment lands exactly once."""
    await stores[0].write("counter", b"0")

    async def increment(store: BlobStore) -> None:
        while True:
            data, version = await store.read("counter")  # type: ignore[misc]
            try:
                await store.write("counter", str(int(data) + 1).encode(), if_version=version)
                return
            except PreconditionFailed:
                continue

    await asyncio.gather(*(increment(stores[i % 2]) for i in range(20)))
    assert (await stores[1].read("counter"))[0] == b"20"  # type: ignore[index]


async def test_uploads_and_reads_stream_in_chunks_across_multipart_parts(stores) -> None:
    store, other = stores
    chunk = bytes(range(256)) * (4096)  # 1 MiB
    count = 11  # 11 MiB: parts of 5, 5 and 1 MiB in a bucket

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(count):
            yield bytes([i]) + chunk[1:]

    size = await store.upload("files/data/big", chunks())
    assert size == count * MiB
    expected = hashlib.sha256(b"".join(bytes([i]) + chunk[1:] for i in range(count))).hexdigest()
    digest = hashlib.sha256()
    largest = 0
    async for piece in other.stream("files/data/big"):
        digest.update(piece)
        largest = max(largest, len(piece))
    assert digest.hexdigest() == expected
    assert largest < MiB  # read in chunks, never whole


async def test_a_small_upload_is_one_object_and_an_absent_stream_raises_key_error(stores) -> None:
    store, _ = stores

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"a": 1}\n'
        yield b'{"b": 2}'

    assert await store.upload("small", chunks()) == 17
    assert b"".join([c async for c in store.stream("small")]) == b'{"a": 1}\n{"b": 2}'
    with pytest.raises(KeyError):
        [c async for c in store.stream("absent")]


async def test_keys_are_listed_by_prefix_and_deleted(stores) -> None:
    store, other = stores
    for key in ("batches/meta/b2.json", "batches/meta/b1.json", "batches/active/b1", "files/meta/f1.json"):
        await store.write(key, b"{}")
    assert await other.keys("batches/meta/") == ["batches/meta/b1.json", "batches/meta/b2.json"]
    assert await other.keys("batches/") == [
        "batches/active/b1",
        "batches/meta/b1.json",
        "batches/meta/b2.json",
    ]
    await other.delete("batches/active/b1")
    await other.delete("batches/active/never-there")
    assert await store.keys("batches/active/") == []


async def test_local_keys_stay_inside_the_directory(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for key in ("../outside", "a/../../outside", ".locks/x"):
        with pytest.raises(ValueError):
            await store.write(key, b"x")


async def test_lines_split_a_stream_at_any_chunk_boundary() -> None:
    text = b'{"a": 1}\r\n\n{"b": 2}\n{"c": 3}'
    for size in (1, 2, 3, 7, len(text)):

        async def chunks(size: int = size) -> AsyncIterator[bytes]:
            for i in range(0, len(text), size):
                yield text[i : i + size]

        assert [line async for line in lines(chunks())] == [b'{"a": 1}', b"", b'{"b": 2}', b'{"c": 3}']
