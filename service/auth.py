"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time; each key has a name and limits.

Keys are hashed first so every comparison is between equal-length digests, and every configured
key is compared, so the time taken says nothing about which key, or how much of one, matched.

Keys come from GENEMBED_API_KEYS and the keys file. A plain file holds one key per line (`#` comments);
a `.toml` file names its keys and gives them rate limits (docs/gateway.md):

    [defaults]            # optional: limits of the file's keys that set none
    rpm = 600
    [[keys]]
    name = "search-backend"
    key = "sk-..."
    rpm = 60              # requests per minute
    tpm = 100000          # prompt tokens per minute

Keys without a name are `key-1`, `key-2`, ... in the order they are given: a name is a metrics label and a
log field, so it is never derived from the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from pathlib import Path
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from service.errors import Unauthorized
from service.settings import GatewaySettings

_bearer = HTTPBearer(auto_error=False, description="an API key from GENEMBED_API_KEYS or the keys file")


class RateLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, gt=0, description="requests per minute; unset: unlimited")
    tpm: int | None = Field(default=None, gt=0, description="prompt tokens per minute; unset: unlimited")


class ApiKey(RateLimits):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the metrics label; never secret")
    key: SecretStr = Field(min_length=1)


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: RateLimits = RateLimits()
    keys: list[ApiKey] = Field(default_factory=list)


def load_api_keys(settings: GatewaySettings) -> list[ApiKey]:
    """Every configured key; empty means auth is off. Raises ValueError (bad file, repeated name or key), OSError."""
    plain = list(settings.api_keys)
    named: list[ApiKey] = []
    path: Path | None = settings.api_keys_file
    if path is not None and path.suffix == ".toml":
        parsed = _KeysFile.model_validate(tomllib.loads(path.read_text()))
        named = [
            k.model_copy(update={"rpm": k.rpm or parsed.defaults.rpm, "tpm": k.tpm or parsed.defaults.tpm})
            for k in parsed.keys
        ]
    elif path is not None:
        lines = (line.strip() for line in path.read_text().splitlines())
        plain += [line for line in lines if line and not line.startswith("#")]
    keys = [ApiKey(name=f"key-{i}", key=SecretStr(k)) for i, k in enumerate(plain, 1)] + named
    for attr in ("name", "key"):
        values = [k.key.get_secret_value() if attr == "key" else k.name for k in keys]
        if len(set(values)) != len(values):
            repeated = "a key is given twice" if attr == "key" else f"key names repeat: {sorted(values)}"
            raise ValueError(f"API keys: {repeated}")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """A FastAPI dependency returning the caller's key; with no keys configured every request passes (None)."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._digests = [(_digest(k.key.get_secret_value()), k) for k in keys]

    async def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> ApiKey | None:
        """Async though it never awaits: FastAPI runs a plain `def` dependency in its thread pool, a thread handoff
        per request that was 11 % of the gateway's CPU at 4x overload (py-spy, docs/benchmarks.md)."""
        if not self._digests:
            return None
        if credentials is None:
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        given = _digest(credentials.credentials)
        matched: ApiKey | None = None
        for digest, key in self._digests:
            if hmac.compare_digest(given, digest):
                matched = key
        if matched is None:
            raise Unauthorized("incorrect API key provided")
        return matched
