"""`genembed serve` and `genembed gateway` as commands: startup, arguments, and stopping children."""

from __future__ import annotations

import signal

import httpx
import pytest

from cli.main import SERVE_WORKER_NICE
from harness.procs import alive, children, free_port, genembed, genembed_exits, running, thread_niceness


@pytest.mark.slow
def test_serve_starts_a_worker_per_model_and_stops_them_on_sigterm(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = genembed("serve", "--model", "minilm-l6", "--port", str(port))
    with running(cmd, f"{url}/ready", log_path=tmp_path / "serve.log") as proc:
        workers = children(proc.pid)
        assert len(workers) == 1
        [gateway_nice] = set(thread_niceness(proc.pid))  # the gateway comes first on cores they share
        assert set(thread_niceness(workers[0])) == {gateway_nice + SERVE_WORKER_NICE}
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["minilm-l6"]
        body = {"model": "minilm-l6", "input": "hello"}
        assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` or `kill` would
        assert proc.wait(timeout=30) != 0
        assert not any(alive(pid) for pid in workers)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no workers: give at least one --worker MODEL=URL"),
        (["--worker", "minilm-l6"], "expected MODEL=http://host:port"),
        (["--worker", "a=http://x:1", "--worker", "a=http://x:1"], "http://x:1 is named twice for model 'a'"),
        (["--worker", "a=dns+http://workers"], "expected dns+http://NAME:PORT"),
    ],
)
def test_gateway_refuses_bad_worker_arguments(args, message):
    result = genembed_exits("gateway", *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_serve_reports_a_worker_that_cannot_start(tmp_path):
    result = genembed_exits("serve", "--model", str(tmp_path / "missing.toml"), "--port", str(free_port()))
    assert result.returncode == 1
    assert "genembed serve: the worker for http://127.0.0.1:" in result.stderr
