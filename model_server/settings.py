"""The worker's settings: flags of `genembed worker` or GENEMBED_WORKER_* environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.logs import LogFormat
from model_server.admission import Policy
from model_server.engine import EngineLimits
from model_server.specs import DEFAULT_MODEL
from model_server.threads import INGRESS_NICE, MAX_NICE, CpuTurns, OmpMode


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENEMBED_WORKER_", extra="ignore")

    model: str = Field(default=DEFAULT_MODEL, description="built-in model id or a spec file (TOML/YAML)")
    host: str = "127.0.0.1"
    port: int = 8001
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] | None = Field(
        default=None, description="overrides the spec's dtype"
    )
    device: str | None = Field(default=None, description="overrides the spec's device (cpu, cuda, cuda:1)")
    linear: Literal["auto", "packed", "eager"] | None = Field(
        default=None, description="overrides the spec's: packed (oneDNN, CPU) or eager projections"
    )
    cuda_graphs: bool | None = Field(default=None, description="overrides the spec's: CUDA-graph decode steps")
    kernels: Literal["auto", "torch"] | None = Field(
        default=None, description="overrides the spec's: auto (genembed's CPU kernels where they build) or torch"
    )
    omp: OmpMode = Field(
        default="auto",
        description="CPU threading: auto spins 10 000 rounds between parallel regions, passive sleeps (cores shared "
        "with busy processes), off keeps libgomp's 300 000 (model_server/threads.py); set before torch loads",
    )
    nice: int = Field(
        default=0,
        ge=0,
        le=MAX_NICE,
        description="added to the worker's CPU niceness before torch loads, for every thread of it (`genembed serve` "
        "gives its workers 5, so that on shared cores they never starve the gateway)",
    )
    ingress_nice: int = Field(
        default=INGRESS_NICE,
        ge=0,
        le=MAX_NICE,
        description="added to the worker's niceness for the one thread that tokenizes calls before admission, so that "
        "a burst's tokenization yields the CPUs to the engine passes admission has priced",
    )
    cpu_turns: str | None = Field(
        default=None,
        description="a lock file: CPU workers given the same one take turns at the CPUs they share, one engine pass "
        "at a time (`genembed serve` sets one for its workers unless they have CPUs of their own)",
    )
    cpu_turn_lead_s: float = Field(
        default=CpuTurns.LEAD_S,
        ge=0,
        description="turns are shared by time: how many seconds more than a waiting neighbour a worker may have held "
        "the CPUs and still take the next turn (inf: one pass each, whatever its length)",
    )
    max_running_seqs: int = Field(default=64, gt=0)
    max_batch_tokens: int = Field(default=4096, gt=0)
    max_kv_tokens: int = Field(default=65536, gt=0)
    max_waiting_seqs: int = Field(
        default=4096, gt=0, description="online sequences waiting (a safety net: admission decides by deadline)"
    )
    log_level: str = "info"
    drain_grace_s: float = Field(default=30.0, ge=0, description="on SIGTERM: how long in-flight requests may finish")
    log_format: LogFormat = Field(default="text", description="text, or json: one object per line")
    otel: bool = Field(default=False, description="OpenTelemetry tracing (the otel extra; OTEL_* configure it)")

    # The gateway's token (model_server/auth.py; docs/deploy.md#who-trusts-whom)
    token: SecretStr | None = Field(
        default=None,
        description="shared secret every call but /health, /ready, /metrics must carry; unset: open on a loopback "
        "host, refused on any other",
    )
    rotation_token: SecretStr | None = Field(
        default=None, description="accepted besides token while the gateway's token is being changed"
    )

    @field_validator("token", "rotation_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """An empty variable (compose's `${VAR:-}`, an empty Secret key) means no token, never the empty token."""
        return None if value == "" else value

    # Admission (model_server/admission.py; docs/gateway.md, "Admission and overload")
    deadline_share: float = Field(
        default=0.7, gt=0, le=1, description="of a call's deadline, what its estimated finish may use (headroom)"
    )
    max_retry_after_s: int = Field(default=30, gt=0, description="the largest Retry-After a refusal names")
    batch_share: float = Field(
        default=0.75, gt=0, le=1, description="of the running slots and token budgets, the most batch work may hold"
    )

    def limits(self) -> EngineLimits:
        return EngineLimits(
            max_running_seqs=self.max_running_seqs,
            max_batch_tokens=self.max_batch_tokens,
            max_kv_tokens=self.max_kv_tokens,
            max_waiting_seqs=self.max_waiting_seqs,
            batch_share=self.batch_share,
        )

    def policy(self) -> Policy:
        return Policy(deadline_share=self.deadline_share, max_retry_after_s=self.max_retry_after_s)

    def turns(self) -> CpuTurns | None:
        return CpuTurns(self.cpu_turns, self.cpu_turn_lead_s) if self.cpu_turns else None

    def spec_overrides(self) -> dict[str, object]:
        fields = ("dtype", "device", "linear", "cuda_graphs", "kernels")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
