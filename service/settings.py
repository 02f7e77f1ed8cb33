"""The gateway's settings: flags of `genembed gateway` / `genembed serve` or GENEMBED_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Self
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.logs import LogFormat
from common.protocol import WORKER_TOKEN_HEADER


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENEMBED_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    workers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="MODEL=URL per worker, MODEL repeatable; MODEL=dns+http://NAME:PORT: every address of NAME",
    )
    log_level: str = "info"
    log_format: LogFormat = Field(default="text", description="text, or json: one object per line")
    otel: bool = Field(default=False, description="OpenTelemetry tracing (the otel extra; OTEL_* configure it)")

    # Auth
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted Bearer keys")
    api_keys_file: Path | None = Field(
        default=None, description="one key per line (# comments), or a .toml file with names and rate limits"
    )
    metrics_require_auth: bool = False

    # Limits and deadlines
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    max_inputs: int = Field(default=2048, gt=0, description="inputs per request (OpenAI's limit)")
    request_timeout_s: float = Field(default=30.0, gt=0, description="deadline of one request")

    # Overload (docs/gateway.md#admission-and-overload): the workers admit by their deadlines; these bounds only
    # protect the gateway itself (memory, sockets), per model, answered 429 past them.
    max_queued_items: int = Field(default=4096, gt=0, description="distinct inputs in worker calls per model")
    max_worker_calls: int = Field(default=512, gt=0, description="worker calls in flight per model (one per request)")
    retry_after_max_s: int = Field(default=30, gt=0, description="cap of the gateway's own Retry-After on 429")
    max_loop_lag_s: float = Field(
        default=2.0, ge=0, description="refuse new online work (429) while the event loop runs later; 0: never"
    )
    remember_refusals: bool = Field(
        default=True,
        description="answer 429 at once for a call a worker's recent refusal covers (it says how long it holds)",
    )

    # Workers
    worker_probe_interval_s: float = Field(default=2.0, gt=0)
    worker_probe_timeout_s: float = Field(default=5.0, gt=0)
    worker_load_interval_s: float = Field(
        default=0.5, gt=0, description="how often each worker's backlog is read from GET /load (routing)"
    )
    worker_dns_interval_s: float = Field(default=5.0, gt=0, description="how often dns+http:// names are re-resolved")
    drain_grace_s: float = Field(default=30.0, ge=0, description="on SIGTERM: how long in-flight requests may finish")

    # Cache
    redis_url: str | None = Field(default=None, description="redis:// or rediss://; unset: in-memory LRU")
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=0, description="0: entries never expire")
    cache_max_mb: float = Field(default=256, ge=0, description="in-memory cache size; 0 disables it")
    redis_timeout_s: float = Field(default=0.25, gt=0, description="past it Redis counts as down")
    redis_retry_s: float = Field(default=1.0, gt=0, description="how long to serve uncached before trying again")

    # Test-time query refinement (/v1/refine-query, /v1/corpora; docs/refine.md)
    judge_url: str | None = Field(default=None, description="OpenAI-compatible base URL of the LLM judge (…/v1)")
    judge_api_key: SecretStr | None = Field(default=None, description="sent as Bearer to the judge")
    judge_model: str | None = Field(default=None, description="judge (and HyDE) model when a request names none")
    teacher_timeout_s: float = Field(default=20.0, gt=0, description="deadline of one judge call")
    teacher_max_retries: int = Field(default=1, ge=0, description="retries of a judge call that failed transiently")
    teacher_max_concurrency: int = Field(default=16, gt=0, description="judge calls in flight per request")
    teacher_max_error_fraction: float = Field(default=0.5, ge=0, le=1, description="more failed documents: 502/504")
    refine_timeout_s: float = Field(default=120.0, gt=0, description="deadline of one refine-query request")
    corpus_batch_size: int = Field(default=64, gt=0, description="documents embedded and stored per batch")

    # Reranking (/v1/rerank; docs/rerank.md)
    rerank_max_documents: int = Field(default=1000, gt=0, description="documents per rerank request (400 past it)")
    rerank_timeout_s: float = Field(
        default=120.0, gt=0, description="scoring budget of one request (worker calls also end at request_timeout_s)"
    )

    # Batch API (/v1/files, /v1/batches; docs/batch.md): where files and batch state live, and how batches run
    batch_dir: Path = Field(
        default=Path("~/.local/share/genembed/batches"), description="files and batch state, unless a bucket is set"
    )
    batch_s3_bucket: str | None = Field(default=None, description="an S3-compatible bucket instead (the s3 extra)")
    batch_s3_prefix: str = Field(default="genembed/", description="key prefix inside the bucket")
    batch_s3_endpoint_url: str | None = Field(default=None, description="e.g. http://minio:9000; unset: AWS")
    batch_s3_region: str | None = None
    batch_s3_access_key_id: str | None = Field(default=None, description="unset: boto's usual credential chain")
    batch_s3_secret_access_key: SecretStr | None = None
    batch_max_lines: int = Field(default=50_000, gt=0, description="requests in one batch input file (OpenAI's cap)")
    batch_max_in_flight: int = Field(
        default=8, gt=0, description="batch lines in flight to one model's workers, per gateway"
    )
    batch_checkpoint_s: float = Field(
        default=1.0, gt=0, description="how often a running batch saves its progress and sees a cancel"
    )
    batch_part_bytes: int = Field(default=8 << 20, gt=0, description="results buffered before a part is written")
    batch_lease_s: float = Field(
        default=30.0, gt=0, description="a gateway that stops renewing its lease on a batch loses it after this"
    )
    batch_poll_s: float = Field(default=2.0, gt=0, description="how often a gateway looks for batches to run")
    batch_retry_max_s: float = Field(default=5.0, gt=0, description="longest wait before a batch line is retried")

    # Credentials of the parts behind the gateway (docs/deploy.md#who-trusts-whom)
    worker_token: SecretStr | None = Field(
        default=None,
        description="sent to every worker; the same variable (GENEMBED_WORKER_TOKEN) sets the workers' own. "
        "`genembed serve` makes one when unset",
    )
    redis_password: SecretStr | None = Field(
        default=None, description="Redis AUTH password (from a Secret), joined into redis_url; not also in the URL"
    )

    @field_validator("worker_token", "redis_password", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """An empty variable (compose's `${VAR:-}`, an empty Secret key) means none, never the empty secret."""
        return None if value == "" else value

    @model_validator(mode="after")
    def _redis_password_into_url(self) -> Self:
        """The URL is plain configuration, the password a Secret: joined here, every Redis client gets one URL."""
        if self.redis_password is None:
            return self
        if not self.redis_url:
            raise ValueError("GENEMBED_REDIS_PASSWORD is set but GENEMBED_REDIS_URL is not")
        parts = urlsplit(self.redis_url)
        if parts.password is not None:
            raise ValueError("the Redis password is given twice: in GENEMBED_REDIS_URL and GENEMBED_REDIS_PASSWORD")
        user, _, address = parts.netloc.rpartition("@")
        password = quote(self.redis_password.get_secret_value(), safe="")
        self.redis_url = urlunsplit(parts._replace(netloc=f"{user}:{password}@{address}"))
        return self

    def worker_headers(self) -> dict[str, str]:
        """Headers of every call to a worker."""
        return {WORKER_TOKEN_HEADER: self.worker_token.get_secret_value()} if self.worker_token else {}

    @field_validator("workers", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """Lists come from the environment as comma-separated text (`a=http://x,b=http://y`)."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def worker_urls(self) -> dict[str, list[str]]:
        """`MODEL=URL` entries grouped by model, in order; raises ValueError on a malformed or repeated entry."""
        urls: dict[str, list[str]] = {}
        for entry in self.workers:
            model, sep, url = entry.partition("=")
            model, url = model.strip(), url.strip().rstrip("/")
            if not sep or not model or not url.startswith(("http://", "https://", "dns+http://", "dns+https://")):
                raise ValueError(f"worker {entry!r}: expected MODEL=http://host:port or MODEL=dns+http://name:port")
            if url in urls.get(model, []):
                raise ValueError(f"worker {entry!r}: {url} is named twice for model {model!r}")
            urls.setdefault(model, []).append(url)
        if not urls:
            raise ValueError("no workers: give at least one --worker MODEL=URL (or GENEMBED_WORKERS)")
        return urls
