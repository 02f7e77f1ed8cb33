"""`/v1/files` and `/v1/batches` in OpenAI's shapes, so the official client's files.* and batches.* work unchanged.

Files hold batch input (purpose "batch": a JSONL of /v1/embeddings requests, uploaded as multipart form data) and
batch results (purpose "batch_output"). The routes only store and read: the BatchRunner does the work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from service.batches.models import (
    ENDPOINT,
    WINDOWS_S,
    Batch,
    BatchList,
    CreateBatch,
    FileDeleted,
    FileList,
    FileObject,
    StoredBatch,
    new_id,
)
from service.batches.runner import BatchRunner
from service.batches.store import BatchStore
from service.errors import Conflict, InvalidRequest
from service.openai_api import error_responses

_UPLOAD_CHUNK = 1 << 20
_CONTENT = {200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}, "description": "the bytes"}}


def _owner(request: Request) -> str | None:
    """The API key's name (None while auth is off): files and batches belong to it."""
    return getattr(request.state, "api_key", None)


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_UPLOAD_CHUNK):
        yield chunk


def batch_router(store: BatchStore, runner: BatchRunner) -> APIRouter:
    router = APIRouter(tags=["batches"])

    @router.post(
        "/v1/files",
        response_model=FileObject,
        summary="Upload a batch input file (JSONL of /v1/embeddings requests)",
        responses=error_responses(400, 401, 413, 429),
    )
    async def upload_file(
        request: Request,
        file: Annotated[UploadFile, File(description="JSONL: one request per line")],
        purpose: Annotated[str, Form(description='"batch"')],
    ) -> FileObject:
        if purpose != "batch":
            raise InvalidRequest(f"purpose {purpose!r} is not supported here; only 'batch'", param="purpose")
        return await store.add_file(_owner(request), file.filename or "upload.jsonl", "batch", _chunks(file))

    @router.get("/v1/files", response_model=FileList, summary="List files", responses=error_responses(400, 401, 429))
    async def list_files(
        request: Request,
        purpose: str | None = None,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        order: Literal["asc", "desc"] = "desc",
    ) -> FileList:
        return await store.list_files(_owner(request), purpose, after, limit, newest_first=order == "desc")

    @router.get(
        "/v1/files/{file_id}", response_model=FileObject, summary="A file", responses=error_responses(401, 404, 429)
    )
    async def retrieve_file(request: Request, file_id: str) -> FileObject:
        return (await store.get_file(file_id, _owner(request))).file

    @router.get(
        "/v1/files/{file_id}/content",
        response_class=StreamingResponse,
        summary="A file's content (streamed)",
        responses=_CONTENT | error_responses(401, 404, 429),
    )
    async def file_content(request: Request, file_id: str) -> StreamingResponse:
        stored = await store.get_file(file_id, _owner(request))
        return StreamingResponse(store.content(stored), media_type="application/octet-stream")

    @router.delete(
        "/v1/files/{file_id}",
        response_model=FileDeleted,
        summary="Delete a file",
        responses=error_responses(401, 404, 429),
    )
    async def delete_file(request: Request, file_id: str) -> FileDeleted:
        await store.delete_file(file_id, _owner(request))
        return FileDeleted(id=file_id)

    @router.post(
        "/v1/batches",
        response_model=Batch,
        summary="Create a batch from an uploaded input file",
        responses=error_responses(400, 401, 404, 429),
    )
    async def create_batch(request: Request, body: CreateBatch) -> Batch:
        if body.endpoint != ENDPOINT:
            raise InvalidRequest(f"endpoint {body.endpoint!r} is not supported; only {ENDPOINT}", param="endpoint")
        window = WINDOWS_S.get(body.completion_window)
        if window is None:
            raise InvalidRequest(
                f"completion_window {body.completion_window!r} is not supported; only {', '.join(WINDOWS_S)}",
                param="completion_window",
            )
        owner = _owner(request)
        stored = await store.get_file(body.input_file_id, owner)
        if stored.file.purpose != "batch":
            raise InvalidRequest(
                f"file {body.input_file_id} has purpose {stored.file.purpose!r}, not 'batch'", param="input_file_id"
            )
        now = int(time.time())
        batch = Batch(
            id=new_id("batch_"),
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + window,
            metadata=body.metadata,
        )
        await store.create_batch(StoredBatch(batch=batch, owner=owner))
        runner.wake()
        return batch

    @router.get(
        "/v1/batches", response_model=BatchList, summary="List batches", responses=error_responses(400, 401, 429)
    )
    async def list_batches(
        request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> BatchList:
        return await store.list_batches(_owner(request), after, limit)

    @router.get(
        "/v1/batches/{batch_id}", response_model=Batch, summary="A batch", responses=error_responses(401, 404, 429)
    )
    async def retrieve_batch(request: Request, batch_id: str) -> Batch:
        return (await store.get_batch(batch_id, _owner(request)))[0].batch

    @router.post(
        "/v1/batches/{batch_id}/cancel",
        response_model=Batch,
        summary="Cancel a batch: it stops within seconds; what was done is in its output file",
        responses=error_responses(401, 404, 409, 429),
    )
    async def cancel_batch(request: Request, batch_id: str) -> Batch:
        def cancel(stored: StoredBatch) -> None:
            batch = stored.batch
            if batch.status in ("cancelling", "cancelled"):
                return
            if batch.status not in ("validating", "in_progress"):
                raise Conflict(f"Cannot cancel a batch with status {batch.status!r}.")
            batch.status, batch.cancelling_at = "cancelling", int(time.time())

        return await store.update_batch(batch_id, _owner(request), cancel)

    return router
