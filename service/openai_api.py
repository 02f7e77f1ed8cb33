"""The OpenAI-compatible surface: request/response models, the error shape, and response rendering.

This is the app's edge for errors: `service.errors` says what went wrong, and `HTTP_ERRORS` is the one place
that says how HTTP shows it (status and OpenAI error type); `error_response` renders any of them as
`{"error": {"message", "type", "param", "code"}}` with `Retry-After` when the error says when to retry, and
`error_responses` documents the same in the OpenAPI document.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from common.protocol import InputType, Priority
from service.embedder import DEFAULT_TOLERANCE, EmbedOptions
from service.errors import (
    Conflict,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    TeacherFailed,
    Unauthorized,
    Unavailable,
)

if TYPE_CHECKING:
    from service.embedder import Embedder, Embeddings

EncodingFormat = Literal["float", "base64"]


# -- errors ---------------------------------------------------------------------------------------

#: Each kind of failure as HTTP shows it: (status, OpenAI error type); a subclass takes its nearest listed base.
HTTP_ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    Unauthorized: (401, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    RateLimited: (429, "rate_limit_error"),
    ServiceError: (500, "server_error"),
    TeacherFailed: (502, "server_error"),
    Unavailable: (503, "server_error"),
    DeadlineExceeded: (504, "server_error"),
}


def http_error(error: ServiceError) -> tuple[int, str]:
    """The status and OpenAI error type of `error`."""
    return next(HTTP_ERRORS[kind] for kind in type(error).__mro__ if kind in HTTP_ERRORS)


def error_response(error: ServiceError, status: int | None = None) -> Response:
    """`error` in OpenAI's shape; `status` only for HTTP's own protocol errors (405), typed by their class."""
    if status is None:
        status, kind = http_error(error)
    else:
        kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str | None = Field(description="what went wrong, e.g. model_not_found, overloaded, exceeds_deadline")


class ErrorResponse(BaseModel):
    """Every error's body, as OpenAI's API sends it."""

    error: ErrorDetail


_ERROR_DOCS = {
    400: "invalid request: malformed JSON, a wrong field, an input or a range the model refuses",
    401: "missing or incorrect API key (when the gateway has keys)",
    404: "no such model, corpus or route",
    409: "conflicts with stored state (an existing corpus or id, another model revision)",
    413: "body or input count over the gateway's limit",
    429: "overloaded, or the API key's rate limit is spent: retry after Retry-After seconds",
    502: "the teacher failed on too many documents",
    503: "no worker (or store) available, draining, or still queued at the deadline: retry after Retry-After",
    504: "the deadline passed while the work was running",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: the error statuses it can return, each in OpenAI's shape (Retry-After on 429/503)."""
    return {
        status: {"model": ErrorResponse, "description": _ERROR_DOCS[status]}
        | ({"headers": _RETRY_AFTER} if status in (429, 503) else {})
        for status in sorted(statuses)
    }


# -- /v1/embeddings ---------------------------------------------------------------------------------


class StepRange(BaseModel):
    """`refinement_steps: {"min": 1, "max": 10}`: any K in the range; under load the worker grants fewer than
    `max` (never fewer than `min`) so the request finishes within its deadline instead of being refused."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> StepRange:
        if self.min > self.max:
            raise ValueError(f"refinement_steps min={self.min} is larger than max={self.max}")
        return self


_TEXT = {"type": "string", "minLength": 1}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# What `_no_empty_inputs` accepts, documented (it answers with its own messages, so pydantic does not enforce it).
_INPUT_SCHEMA = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1},
        _TOKENS,
        {"type": "array", "items": _TOKENS, "minItems": 1},
    ],
    "description": "a string, a list of strings, a list of token ids, or a list of token-id lists; none empty",
}


class EmbeddingRequest(BaseModel):
    """OpenAI's fields plus genembed's extensions (`refinement_steps`, `input_type`, `instruction`, `truncate`,
    and for o1 models `seed` and `samples`)."""

    model_config = ConfigDict(extra="forbid")

    input: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_INPUT_SCHEMA)]
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


def validation_error(errors: Sequence[Any]) -> InvalidRequest:
    """The first pydantic error as one OpenAI-style message naming the field."""
    error: dict[str, Any] = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    message = str(error.get("msg", "invalid request")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        return InvalidRequest(f"unrecognized request argument supplied: {loc[0]}", param=loc[0])
    if error.get("type") == "json_invalid":
        return InvalidRequest(f"the body is not valid JSON: {error.get('ctx', {}).get('error', message)}")
    if error.get("type") == "value_error":  # our own validators' messages say it all
        return InvalidRequest(message, param=loc[0] if loc else None)
    if loc and loc[0] == "input":
        message = "input must be a string, a list of strings, a list of token ids, or a list of token-id lists"
        return InvalidRequest(message, param="input")
    if not loc:
        return InvalidRequest(f"the body must be a JSON object with the fields of an embeddings request: {message}")
    return InvalidRequest(f"{'.'.join(loc)}: {message}", param=loc[0])


def embed_options(
    embedder: Embedder, body: EmbeddingRequest, max_inputs: int, priority: Priority = "online"
) -> EmbedOptions:
    """What /v1/embeddings checks before the embedder (input count, the model, `dimensions`) and the options it
    embeds with: one place for the route and for each line of a batch."""
    if len(body.inputs()) > max_inputs:
        raise PayloadTooLarge(f"{len(body.inputs())} inputs; at most {max_inputs} per request", param="input")
    info = embedder.model_info(body.model)
    if body.dimensions is not None and body.dimensions > info.dimension:
        raise InvalidRequest(
            f"dimensions={body.dimensions} is larger than the {info.dimension} dimensions of model {body.model!r}",
            param="dimensions",
        )
    steps = body.refinement_steps
    return EmbedOptions(
        refinement_steps=(steps.min, steps.max) if isinstance(steps, StepRange) else steps,
        input_type=body.input_type,
        instruction=body.instruction,
        truncate=body.truncate,
        seed=body.seed,
        samples=body.samples,
        tolerance=DEFAULT_TOLERANCE if body.refinement_tolerance is None else body.refinement_tolerance,
        trajectory=body.return_trajectory,
        priority=priority,
    )


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
