"""OpenAI's file and batch objects as the API returns them, and what the store keeps beside them."""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
#: statuses a runner still has work in (a batch in any other status is final)
ACTIVE: frozenset[str] = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
FilePurpose = Literal["batch", "batch_output"]
#: the only endpoint and window this gateway runs (OpenAI's window is "24h" only, too)
ENDPOINT = "/v1/embeddings"
WINDOWS_S = {"24h": 24 * 3600}


def new_id(prefix: str) -> str:
    """Sortable by creation time (milliseconds, then random): listing newest first is sorting the keys."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class StoredFile(BaseModel):
    """A file's object, its owner (the API key's name; None without keys) and the storage keys whose
    concatenation is its content: one for an upload, a batch's result parts for an output file."""

    file: FileObject
    owner: str | None
    parts: list[str]


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = Field(default=None, description="1-based line of the input file")


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    """Prompt tokens of the answered lines; `cached_tokens`: those of lines the cache answered whole."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int = 0


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = RequestCounts()
    usage: BatchUsage = BatchUsage()
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class CreateBatch(BaseModel):
    """`POST /v1/batches`' body, as OpenAI's client sends it."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: dict[str, Any] | None = Field(
        default=None, description="accepted for compatibility; result files are kept until deleted"
    )


class Progress(BaseModel):
    """How far a batch got: `lines_done` requests (in file order) have their results in the parts listed; a
    runner that takes the batch over continues at the next one. `lease_owner` runs it until `lease_until`."""

    lines_done: int = 0
    output_parts: list[str] = Field(default_factory=list)
    error_parts: list[str] = Field(default_factory=list)
    output_bytes: int = 0
    error_bytes: int = 0
    lease_owner: str | None = None
    lease_until: float = 0.0


class StoredBatch(BaseModel):
    batch: Batch
    owner: str | None
    progress: Progress = Progress()
