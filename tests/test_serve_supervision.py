"""`genembed serve --replicas N` runs N workers per model behind its gateway and restarts a worker that dies;
the gateway (the same process throughout) serves again as soon as the restarted worker is ready."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import httpx
import pytest

from harness.procs import alive, children, free_port, genembed, running
from tests.load import MODEL, body, items_done, poll, post_all

pytestmark = pytest.mark.slow


def worker_url(pid: int) -> str:
    """The URL of a `genembed worker` child, from its --port argument."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return f"http://127.0.0.1:{int(argv[argv.index(b'--port') + 1])}"


def ready_workers(url: str) -> int:
    return httpx.get(f"{url}/v1/models/{MODEL}", timeout=10).json()["workers_ready"]


async def test_serve_restarts_killed_workers_and_the_gateway_serves_again(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"GENEMBED_WORKER_PROBE_INTERVAL_S": "0.5", "GENEMBED_CACHE_MAX_MB": "0"}
    cmd = genembed("serve", "--model", MODEL, "--replicas", "2", "--port", str(port))
    log = tmp_path / "serve.log"
    with running(cmd, f"{url}/ready", env=env, log_path=log) as proc:
        first = children(proc.pid)
        assert len(first) == 2 and ready_workers(url) == 2
        urls = {worker_url(pid) for pid in first}
        assert len(urls) == 2  # each on its own port

        # Both die: the gateway answers 503 until the supervisor's restarts are ready, then serves again.
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        poll(lambda: httpx.get(f"{url}/ready").status_code == 503, 10, "the gateway notices")
        assert httpx.post(f"{url}/v1/embeddings", json=body("while down", 1), timeout=30).status_code == 503
        poll(lambda: ready_workers(url) == 2, 180, "both workers restarted and taken back")
        restarted = children(proc.pid)
        assert len(restarted) == 2 and not set(restarted) & set(first)
        assert {worker_url(pid) for pid in restarted} == urls  # same ports: the gateway's URLs still hold
        assert not any(alive(pid) for pid in first)

        before = {u: items_done(u) for u in urls}
        responses = await post_all(url, [body(f"after restart {r}", 8) for r in range(16)], concurrency=4)
        assert Counter(r.status_code for r in responses) == {200: 16}
        assert all(items_done(u) > before[u] for u in urls), "a restarted worker got no work"
        assert proc.poll() is None and children(proc.pid) == restarted  # no gateway restart, no extra restarts
    text = log.read_text()
    assert text.count("restarting it in 1 s") == 2 and text.count("restarted (pid") == 2, text[-3000:]
