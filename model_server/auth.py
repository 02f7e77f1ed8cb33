"""The worker answers only its gateway: every call but the probes and /metrics must carry the shared token.

API keys, limits and usage live in the gateway; a worker reachable without the token would bypass all of them
(docs/deploy.md#who-trusts-whom). The check runs before any other middleware or route, compares in constant
time, and covers every path not named open, so a route added later is protected without a second thought.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Collection

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from common.protocol import WORKER_TOKEN_HEADER

log = logging.getLogger(__name__)

# Probes and the scraper: they carry no token, and answer nothing a caller could misuse.
OPEN_PATHS = ("/health", "/ready", "/metrics")


class WorkerTokenMiddleware:
    """ASGI middleware: 401 for a missing or wrong token, before the request reaches anything else."""

    def __init__(
        self, app: ASGIApp, tokens: Collection[bytes], refused: Counter, open_paths: Collection[str] = OPEN_PATHS
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.refused = refused
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get(WORKER_TOKEN_HEADER)
        if sent is not None and self._accepted(sent.encode("latin-1")):
            await self.app(scope, receive, send)
            return
        reason = "missing" if sent is None else "wrong"
        self.refused.labels(reason).inc()
        client = scope.get("client") or ("?", 0)
        log.warning("refused %s %s from %s: %s worker token", scope["method"], scope["path"], client[0], reason)
        body = {"detail": f"{reason} worker token ({WORKER_TOKEN_HEADER})", "code": "unauthorized"}
        await JSONResponse(body, status_code=401)(scope, receive, send)

    def _accepted(self, sent: bytes) -> bool:
        # Every token is compared (no early exit), so the time taken says nothing about which one matched.
        return sum(hmac.compare_digest(sent, token) for token in self.tokens) > 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def require_token(app: FastAPI, host: str, tokens: list[SecretStr | None], registry: CollectorRegistry) -> None:
    """Protect `app` with the configured tokens (the first is the gateway's, a second one is accepted while the
    token rotates). Without one the worker stays open on a loopback address, where only local processes reach
    it, and refuses to start on any other: raises ValueError saying what to set."""
    accepted = [token.get_secret_value().encode() for token in tokens if token is not None]
    if accepted:
        refused = Counter(
            "genembed_worker_unauthorized_requests",
            "Calls refused for a missing or wrong gateway token",
            ["reason"],
            registry=registry,
        )
        app.add_middleware(WorkerTokenMiddleware, tokens=accepted, refused=refused)  # added last: runs first
    elif is_loopback(host):
        log.warning("no GENEMBED_WORKER_TOKEN: any process on this machine can call this worker on %s", host)
    else:
        raise ValueError(
            f"refusing to serve on {host} without a token: anyone who reaches the port would bypass the gateway's "
            "keys and limits. Set GENEMBED_WORKER_TOKEN (the same value for the gateway), or bind 127.0.0.1"
        )
