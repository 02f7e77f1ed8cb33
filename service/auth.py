"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time.

Keys are hashed first so every comparison is between equal-length digests, and every configured
key is compared, so the time taken says nothing about which key, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.openai_api import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="an API key from GENEMBED_API_KEYS or the keys file")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """A FastAPI dependency; with no keys configured every request passes."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if not self._digests:
            return
        if credentials is None:
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        given = _digest(credentials.credentials)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise Unauthorized("incorrect API key provided")
