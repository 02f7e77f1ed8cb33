"""Files and batches on a BlobStore: the keys, ownership, listing, and the batch record's compare-and-swap.

Layout (under the directory or the bucket prefix):

    files/meta/{file_id}.json        StoredFile
    files/data/{file_id}             an uploaded file's bytes
    batches/meta/{batch_id}.json     StoredBatch (the Batch object, its owner, its progress and lease)
    batches/parts/{batch_id}/...     result parts, in order; an output file is their concatenation
    batches/active/{batch_id}        present while the batch still has work: what runners scan

A file or batch belongs to the API key that created it (its name); another key gets the same 404 as for an id that
does not exist.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from service.batches.models import (
    Batch,
    BatchList,
    FileList,
    FileObject,
    FilePurpose,
    StoredBatch,
    StoredFile,
    new_id,
)
from service.batches.storage import BlobStore, PreconditionFailed
from service.errors import NotFound

_FILES = "files/meta/"
_DATA = "files/data/"
_BATCHES = "batches/meta/"
_PARTS = "batches/parts/"
_ACTIVE = "batches/active/"


async def lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The lines of a byte stream, without their line ends (a last line without one included)."""
    rest = b""
    async for chunk in chunks:
        rest += chunk
        *complete, rest = rest.split(b"\n")
        for line in complete:
            yield line.removesuffix(b"\r")
    if rest:
        yield rest.removesuffix(b"\r")


class BatchStore:
    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    # -- files ----------------------------------------------------------------------------------------

    async def add_file(
        self, owner: str | None, filename: str, purpose: FilePurpose, chunks: AsyncIterator[bytes]
    ) -> FileObject:
        file_id = new_id("file-")
        size = await self.blobs.upload(_DATA + file_id, chunks)
        file = FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose)
        await self.put_file(StoredFile(file=file, owner=owner, parts=[_DATA + file_id]))
        return file

    async def put_file(self, stored: StoredFile) -> None:
        await self.blobs.write(f"{_FILES}{stored.file.id}.json", stored.model_dump_json().encode())

    async def get_file(self, file_id: str, owner: str | None) -> StoredFile:
        found = await self.blobs.read(f"{_FILES}{file_id}.json") if "/" not in file_id else None
        stored = StoredFile.model_validate_json(found[0]) if found is not None else None
        if stored is None or stored.owner != owner:
            raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return stored

    async def list_files(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> FileList:
        ids = _ids(await self.blobs.keys(_FILES), _FILES, after, newest_first)
        data: list[FileObject] = []
        for file_id in ids:
            found = await self.blobs.read(f"{_FILES}{file_id}.json")
            if found is None:
                continue
            stored = StoredFile.model_validate_json(found[0])
            if stored.owner == owner and purpose in (None, stored.file.purpose):
                if len(data) == limit:
                    return FileList(data=data, first_id=data[0].id, last_id=data[-1].id, has_more=True)
                data.append(stored.file)
        return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)

    async def content(self, stored: StoredFile) -> AsyncIterator[bytes]:
        for key in stored.parts:
            async for chunk in self.blobs.stream(key):
                yield chunk

    async def delete_file(self, file_id: str, owner: str | None) -> None:
        stored = await self.get_file(file_id, owner)
        await self.blobs.delete(f"{_FILES}{file_id}.json")
        for key in stored.parts:
            await self.blobs.delete(key)

    # -- batches --------------------------------------------------------------------------------------

    async def create_batch(self, stored: StoredBatch) -> None:
        await self.blobs.write(f"{_BATCHES}{stored.batch.id}.json", stored.model_dump_json().encode(), if_absent=True)
        await self.blobs.write(_ACTIVE + stored.batch.id, b"")

    async def read_batch(self, batch_id: str) -> tuple[StoredBatch, str] | None:
        found = await self.blobs.read(f"{_BATCHES}{batch_id}.json") if "/" not in batch_id else None
        return (StoredBatch.model_validate_json(found[0]), found[1]) if found is not None else None

    async def get_batch(self, batch_id: str, owner: str | None) -> tuple[StoredBatch, str]:
        """The record and its version; another owner's is a 404 like a missing one."""
        found = await self.read_batch(batch_id)
        if found is None or found[0].owner != owner:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
        return found

    async def write_batch(self, stored: StoredBatch, version: str) -> str:
        """The record, if it is still at `version`; raises PreconditionFailed otherwise."""
        return await self.blobs.write(
            f"{_BATCHES}{stored.batch.id}.json", stored.model_dump_json().encode(), if_version=version
        )

    async def update_batch(self, batch_id: str, owner: str | None, change: Callable[[StoredBatch], None]) -> Batch:
        """Apply `change` to the stored record, again on the fresh record whenever another writer came first."""
        while True:
            stored, version = await self.get_batch(batch_id, owner)
            change(stored)
            try:
                await self.write_batch(stored, version)
            except PreconditionFailed:
                continue
            return stored.batch

    async def list_batches(self, owner: str | None, after: str | None, limit: int) -> BatchList:
        data: list[Batch] = []
        for batch_id in _ids(await self.blobs.keys(_BATCHES), _BATCHES, after, newest_first=True):
            found = await self.read_batch(batch_id)
            if found is None or found[0].owner != owner:
                continue
            if len(data) == limit:
                return BatchList(data=data, first_id=data[0].id, last_id=data[-1].id, has_more=True)
            data.append(found[0].batch)
        return BatchList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)

    async def active_ids(self) -> list[str]:
        return [key.removeprefix(_ACTIVE) for key in await self.blobs.keys(_ACTIVE)]

    async def retire(self, batch_id: str) -> None:
        """The batch has no work left: runners stop looking at it."""
        await self.blobs.delete(_ACTIVE + batch_id)

    async def write_part(self, batch_id: str, name: str, data: bytes) -> str:
        key = f"{_PARTS}{batch_id}/{name}"
        await self.blobs.write(key, data)
        return key

    async def start(self) -> None:
        await self.blobs.start()

    async def aclose(self) -> None:
        await self.blobs.aclose()


def _ids(keys: list[str], prefix: str, after: str | None, newest_first: bool) -> list[str]:
    """Ids from `{prefix}{id}.json` keys in listing order, those after the cursor `after` only."""
    ids = sorted((k.removeprefix(prefix).removesuffix(".json") for k in keys), reverse=newest_first)
    if after is not None:
        ids = [i for i in ids if (i < after if newest_first else i > after)]
    return ids
