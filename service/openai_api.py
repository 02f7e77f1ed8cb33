"""The OpenAI-compatible surface: request/response models, the error shape, and response rendering.

Errors are exceptions carrying their HTTP status and OpenAI fields, so any layer (coalescer,
worker client, routes) can raise the one the caller must see; `error_response` renders them as
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Literal

import numpy as np
import orjson
from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model_server.protocol import InputType

if TYPE_CHECKING:
    from service.embedder import Embeddings

EncodingFormat = Literal["float", "base64"]


# -- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error the caller sees; subclasses fix status, type and default code. This base is a 500."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.retry_after = retry_after


class InvalidRequest(ApiError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(ApiError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class ModelNotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class PayloadTooLarge(ApiError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class Overloaded(ApiError):
    """Retrying later can succeed; `retry_after` (seconds) becomes the Retry-After header."""

    status, type, code = 429, "rate_limit_error", "overloaded"


class RateLimited(ApiError):
    """The API key's requests or tokens per minute are spent; `retry_after` says when enough is back."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class Unavailable(ApiError):
    status, type, code = 503, "server_error", "worker_unavailable"


class QueueTimeout(ApiError):
    """Accepted, but still queued when the deadline passed: the model is busier than admission estimated."""

    status, type, code = 503, "server_error", "queue_timeout"


class DeadlineExceeded(ApiError):
    status, type, code = 504, "server_error", "deadline_exceeded"


def error_response(exc: ApiError) -> Response:
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return Response(orjson.dumps(body), status_code=exc.status, media_type="application/json", headers=headers)


# -- /v1/embeddings ---------------------------------------------------------------------------------


class StepRange(BaseModel):
    """`refinement_steps: {"min": 1, "max": 10}`: any K in the range; under load the gateway grants fewer than
    `max` (never fewer than `min`) so the request finishes within its deadline instead of being refused."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> StepRange:
        if self.min > self.max:
            raise ValueError(f"refinement_steps min={self.min} is larger than max={self.max}")
        return self


class EmbeddingRequest(BaseModel):
    """OpenAI's fields plus genembed's extensions (`refinement_steps`, `input_type`, `instruction`, `truncate`,
    and for o1 models `seed` and `samples`)."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )
    model: str
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(default=None, gt=0, description="truncate, then re-normalise")
    user: str | None = None
    refinement_steps: int | Literal["auto"] | StepRange | None = Field(
        default=None,
        description="K; the model's default when omitted; 'auto' (gircse): stop once another step changes little; "
        '{"min": a, "max": b}: the most steps in a..b that finish within the deadline under the current load',
    )
    refinement_tolerance: float | None = Field(
        default=None, ge=0, description="with 'auto': stop once 1 - cos(step i, step i-1) is below it (default 1e-3)"
    )
    return_trajectory: bool = Field(default=False, description="also the embedding after each step 1..K")
    input_type: InputType = "query"
    instruction: str | None = Field(default=None, description="overrides the model's default instruction")
    truncate: bool = Field(default=True, description="false: inputs over the model's limit are a 400")
    seed: int | None = Field(default=None, ge=0, description="o1: seed of the sampled thoughts (default 0)")
    samples: int | None = Field(default=None, gt=0, description="o1: thoughts averaged per input (model default)")

    @field_validator("input")
    @classmethod
    def _no_empty_inputs(cls, value: str | list[str] | list[int] | list[list[int]]) -> object:
        inputs = _as_inputs(value)
        if not inputs:
            raise ValueError("input must not be an empty list")
        for i, item in enumerate(inputs):
            if len(item) == 0:
                raise ValueError(f"input[{i}] is empty; empty strings and empty token lists are not embeddable")
        return value

    @model_validator(mode="after")
    def _tolerance_needs_auto(self) -> EmbeddingRequest:
        if self.refinement_tolerance is not None and self.refinement_steps != "auto":
            raise ValueError("refinement_tolerance applies only with refinement_steps 'auto'")
        return self

    def inputs(self) -> list[str | list[int]]:
        """Every input as one text or one token-id list, in request order."""
        return _as_inputs(self.input)


def _as_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]  # type: ignore[list-item]
    return list(value)  # type: ignore[arg-type]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")
    refinement_steps: int | None = Field(
        default=None, description="with 'auto', a range or a trajectory: the steps that ran"
    )
    trajectory: list[list[float] | str] | None = Field(
        default=None, description="with return_trajectory: the embedding after each step 1..K, encoded as `embedding`"
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


def apply_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """OpenAI's `dimensions`: keep the first `dimensions` values and re-normalise (Matryoshka-style)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.where(norms == 0, 1, norms)).astype(np.float32)


def render_embeddings(embeddings: Embeddings, request: EmbeddingRequest, headers: dict[str, str]) -> Response:
    """Serialise with orjson straight from float32 (the shortest repr that round-trips to the same float32).
    `dimensions` applies to trajectories as to the vectors; `refinement_steps` is reported when it can
    differ from what was asked (`auto`, a range) or a trajectory's length depends on it."""

    def encode(vectors: np.ndarray) -> list:
        vectors = apply_dimensions(vectors, request.dimensions)
        if request.encoding_format == "base64":
            return [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        return list(vectors)

    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(encode(embeddings.vectors))]
    if (
        request.refinement_steps == "auto"
        or isinstance(request.refinement_steps, StepRange)
        or request.return_trajectory
    ):
        for item, steps in zip(data, embeddings.steps, strict=True):
            item["refinement_steps"] = steps
    if embeddings.trajectories is not None:
        for item, trajectory in zip(data, embeddings.trajectories, strict=True):
            item["trajectory"] = encode(trajectory)
    prompt_tokens = embeddings.prompt_tokens
    body = {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json", headers=headers
    )


# -- /v1/models -------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    """OpenAI's model object plus what a caller needs to choose K and dimensions."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "genembed"
    ready: bool
    served_model: str | None = Field(default=None, description="the worker's model id (`id` may be an alias)")
    revision: str | None = None
    method: str | None = None
    dimension: int | None = None
    min_refinement_steps: int | None = None
    max_refinement_steps: int | None = None
    default_refinement_steps: int | None = None
    max_input_tokens: int | None = None
    workers: int | None = Field(default=None, description="worker addresses known for this model")
    workers_ready: int | None = Field(default=None, description="of them, the ones taking requests")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
