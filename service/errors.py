"""The gateway's failures as domain exceptions: what went wrong, not how HTTP says it.

Any layer (worker client, coalescer, embedder, limits, auth, refine, rerank) raises the one the caller must see;
only the app's edge (`service.openai_api.error_response`) maps a kind to its HTTP status and OpenAI error type,
once, as TEI maps its core error enum in its server. This module imports nothing of the gateway, so every layer
may use it without an import circle.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A failure the caller sees; this base is an internal error. Subclasses fix the default `code`.

    `param` names the request field at fault; `retry_after` (whole seconds) says when a retry can succeed.
    """

    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.retry_after = retry_after


class InvalidRequest(ServiceError):
    """The request itself is wrong (a field, a range, an input, or more work than fits its deadline even on an idle
    worker: `exceeds_deadline`); the same request never succeeds."""

    code = "invalid_request"


class Unauthorized(ServiceError):
    """The API key is missing or unknown."""

    code = "invalid_api_key"


class NotFound(ServiceError):
    """What the request names does not exist."""

    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class CorpusNotFound(NotFound):
    code = "corpus_not_found"


class Conflict(ServiceError):
    """The request is valid but contradicts stored state (an existing corpus, another model revision)."""

    code = "conflict"


class PayloadTooLarge(ServiceError):
    """More body or more inputs than one request may carry."""

    code = "payload_too_large"


class Overloaded(ServiceError):
    """The service has no room for the work now; retrying after `retry_after` can succeed."""

    code = "overloaded"


class RateLimited(ServiceError):
    """The API key's requests or tokens per minute are spent; `retry_after` says when enough is back."""

    code = "rate_limit_exceeded"


class Unavailable(ServiceError):
    """No worker (or store) can take the work now: down, loading or draining."""

    code = "worker_unavailable"


class DeadlineExceeded(ServiceError):
    """Accepted, and not done when its deadline passed (the worker dropped it, or never answered)."""

    code = "deadline_exceeded"


class TeacherFailed(ServiceError):
    """The teacher (LLM judge, cross-encoder or teacher embedder) failed on too many documents."""

    code = "teacher_failed"
