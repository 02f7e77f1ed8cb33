"""Gateways, `genembed serve` and redis-server as real child processes, for the gateway tests."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness.procs import free_port, genembed, running, wait_http


@contextlib.contextmanager
def gateway_process(
    tmp_dir: Path, workers: dict[str, str | list[str]], env: dict[str, str] | None = None, ready: bool = True
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`genembed gateway` on a free port in front of `workers` (name -> URL, or URLs); yields (base URL, process)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    entries = [(m, u) for m, urls in workers.items() for u in ([urls] if isinstance(urls, str) else urls)]
    cmd = genembed("gateway", "--port", str(port), *(f"--worker={m}={u}" for m, u in entries))
    env = {"GENEMBED_BATCH_DIR": str(tmp_dir / f"batches-{port}"), **(env or {})}  # never the user's own directory
    with running(cmd, f"{url}/health", timeout=60, env=env, log_path=tmp_dir / f"gateway-{port}.log") as proc:
        if ready:
            wait_http(f"{url}/ready", 30, proc)
        yield url, proc


@contextlib.contextmanager
def redis_process(
    tmp_dir: Path, port: int | None = None, password: str | None = None, tls: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A throw-away redis-server (no persistence; `requirepass password` when given; TLS only, with `tls`/tls.crt,
    tls.key and ca.crt, when given); yields (its URL without the password, process)."""
    port = port or free_port()
    log = open(tmp_dir / f"redis-{port}.log", "ab")  # noqa: SIM115
    auth = ["--requirepass", password] if password else []
    listen, url, client_tls = ["--port", str(port)], f"redis://127.0.0.1:{port}/0", {}
    if tls is not None:
        names = {"cert": "tls.crt", "key": "tls.key", "ca-cert": "ca.crt"}
        files = [arg for name, file in names.items() for arg in (f"--tls-{name}-file", str(tls / file))]
        listen = ["--port", "0", "--tls-port", str(port), *files, "--tls-auth-clients", "no"]
        url = f"rediss://localhost:{port}/0?ssl_ca_certs={tls / 'ca.crt'}"
        client_tls = {"ssl": True, "ssl_ca_certs": str(tls / "ca.crt")}
    proc = subprocess.Popen(
        ["redis-server", *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *auth],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port, password=password, socket_connect_timeout=1, **client_tls)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield url, proc
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Iterator[str]:
    """Base URL of `genembed serve --model smollm2-gircse --model minilm-l6` (in-memory cache)."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = genembed("serve", "--model", "smollm2-gircse", "--model", "minilm-l6", "--port", str(port))
    with running(cmd, f"{url}/ready", timeout=300, log_path=tmp / "serve.log"):
        yield url


@pytest.fixture(scope="session")
def minilm_gateway(minilm_worker, tmp_path_factory) -> Iterator[str]:
    """A gateway with default settings in front of the session's minilm-l6 worker."""
    with gateway_process(tmp_path_factory.mktemp("minilm-gateway"), {"minilm-l6": minilm_worker}) as (url, _):
        yield url
