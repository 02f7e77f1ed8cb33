"""Where batch files and batch state live: a small key -> bytes interface with two implementations.

`LocalStore` (a directory; a PersistentVolumeClaim in the chart) serves one gateway, or several on one shared
volume; `S3Store` (any S3-compatible bucket) lets several gateways share batches. Both give what the batch code
needs and nothing more: whole small objects read and written with a compare-and-swap (`if_version` /
`if_absent`: the lease and the checkpoints of a batch rely on it), large objects uploaded and read as streams of
chunks (never whole in memory), deletion and listing by prefix.

A version is opaque: the content's MD5 in a directory, the ETag in a bucket (the same MD5 for a plain put).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

from service.settings import GatewaySettings

_READ_CHUNK = 1 << 16


class PreconditionFailed(Exception):
    """The object is not at the version the write expected (another writer came first)."""


class BlobStore(Protocol):
    async def read(self, key: str) -> tuple[bytes, str] | None:
        """The object and its version, or None if absent."""

    async def write(self, key: str, data: bytes, *, if_version: str | None = None, if_absent: bool = False) -> str:
        """Store `data`; returns the new version. Raises PreconditionFailed if `if_version` is given and the object
        is not at it (or absent), or if `if_absent` and it exists."""

    async def upload(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Store the concatenation of `chunks` without holding it whole; returns its size in bytes."""

    def stream(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes in chunks; raises KeyError if absent (before the first chunk)."""

    async def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    async def keys(self, prefix: str) -> list[str]:
        """Every key starting with `prefix`, sorted."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class LocalStore:
    """Objects as files under `root` (keys are relative paths). Writes go through a temporary file and a rename, so
    a reader or a crash never sees half an object; compare-and-swap holds a file lock, so gateways sharing the
    directory (a ReadWriteMany volume) exclude each other too."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self._locks = self.root / ".locks"
        self._locks.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root or key.startswith("."):
            raise ValueError(f"bad storage key {key!r}")
        return path

    async def read(self, key: str) -> tuple[bytes, str] | None:
        return await asyncio.to_thread(self._read, self._path(key))

    @staticmethod
    def _read(path: Path) -> tuple[bytes, str] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data, _md5(data)

    async def write(self, key: str, data: bytes, *, if_version: str | None = None, if_absent: bool = False) -> str:
        path = self._path(key)
        if if_version is None and not if_absent:
            await asyncio.to_thread(self._replace, path, data)
            return _md5(data)
        lock = FileLock(self._locks / (hashlib.sha256(key.encode()).hexdigest() + ".lock"))
        return await asyncio.to_thread(self._swap, lock, path, data, if_version, if_absent)

    def _swap(self, lock: FileLock, path: Path, data: bytes, if_version: str | None, if_absent: bool) -> str:
        with lock:
            current = self._read(path)
            if (if_absent and current is not None) or (
                if_version is not None and (current is None or current[1] != if_version)
            ):
                raise PreconditionFailed(str(path))
            self._replace(path, data)
        return _md5(data)

    @staticmethod
    def _replace(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def upload(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        path = self._path(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)
                    size += len(chunk)
            await asyncio.to_thread(os.replace, tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return size

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        try:
            handle = await asyncio.to_thread(self._path(key).open, "rb")
        except FileNotFoundError:
            raise KeyError(key) from None
        try:
            while chunk := await asyncio.to_thread(handle.read, _READ_CHUNK):
                yield chunk
        finally:
            handle.close()

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self._path(key).unlink)

    async def keys(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._keys, prefix)

    def _keys(self, prefix: str) -> list[str]:
        top = self.root / prefix.rpartition("/")[0]
        found = []
        for directory, _, files in os.walk(top):
            for name in files:
                if not name.startswith("."):
                    key = (Path(directory) / name).relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        found.append(key)
        return sorted(found)

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class S3Store:
    """Objects in an S3-compatible bucket under `prefix`. Compare-and-swap is S3's conditional write (`If-Match` on
    the ETag, `If-None-Match: *`), which AWS S3, MinIO and moto honour; uploads go in multipart parts of
    `part_bytes` (S3's minimum is 5 MiB, except for the last)."""

    def __init__(self, settings: GatewaySettings, part_bytes: int = 8 << 20) -> None:
        if settings.batch_s3_bucket is None:
            raise ValueError("S3Store needs batch_s3_bucket")
        self.bucket = settings.batch_s3_bucket
        self.prefix = settings.batch_s3_prefix
        self.part_bytes = part_bytes
        self._settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError as exc:  # the optional extra
            raise RuntimeError("GENEMBED_BATCH_S3_BUCKET needs the s3 extra: pip install 'genembed[s3]'") from exc
        s = self._settings
        secret = s.batch_s3_secret_access_key.get_secret_value() if s.batch_s3_secret_access_key else None
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=s.batch_s3_endpoint_url,
                region_name=s.batch_s3_region,
                aws_access_key_id=s.batch_s3_access_key_id,
                aws_secret_access_key=secret,
                config=AioConfig(retries={"max_attempts": 5, "mode": "standard"}),
            )
        )

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self._client.exceptions.NoSuchKey:
            return None
        async with response["Body"] as body:
            data = await body.read()
        return data, response["ETag"].strip('"')

    async def write(self, key: str, data: bytes, *, if_version: str | None = None, if_absent: bool = False) -> str:
        conditions: dict[str, str] = {}
        if if_version is not None:
            conditions["IfMatch"] = f'"{if_version}"'
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        from botocore.exceptions import ClientError

        try:
            response = await self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **conditions)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if conditions and code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                raise PreconditionFailed(key) from exc
            raise
        return response["ETag"].strip('"')

    async def upload(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        buffer = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= self.part_bytes:
                    if upload_id is None:
                        created = await self._client.create_multipart_upload(Bucket=self.bucket, Key=self._key(key))
                        upload_id = created["UploadId"]
                    parts.append(await self._part(key, upload_id, len(parts) + 1, bytes(buffer[: self.part_bytes])))
                    del buffer[: self.part_bytes]
            if upload_id is None:
                await self.write(key, bytes(buffer))
                return size
            if buffer:
                parts.append(await self._part(key, upload_id, len(parts) + 1, bytes(buffer)))
            await self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            if upload_id is not None:
                with contextlib.suppress(Exception):
                    await self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
                    )
            raise
        return size

    async def _part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        response = await self._client.upload_part(
            Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self._client.exceptions.NoSuchKey:
            raise KeyError(key) from None
        async with response["Body"] as body:
            async for chunk in body.iter_chunks(_READ_CHUNK):
                yield chunk

    async def delete(self, key: str) -> None:
        await self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def keys(self, prefix: str) -> list[str]:
        found = []
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            found += [item["Key"].removeprefix(self.prefix) for item in page.get("Contents", [])]
        return sorted(found)

    async def aclose(self) -> None:
        await self._stack.aclose()


def build_store(settings: GatewaySettings) -> BlobStore:
    """The bucket when one is configured, else the directory; `start()` it before use."""
    if settings.batch_s3_bucket is not None:
        return S3Store(settings)
    return LocalStore(settings.batch_dir)
