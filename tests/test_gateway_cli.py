"""`genembed serve` and `genembed gateway` as commands: startup, arguments, and stopping children."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from cli.main import SERVE_WORKER_NICE, split_cpus
from harness.procs import alive, children, free_port, genembed, genembed_exits, running, thread_niceness
from model_server.threads import INGRESS_NICE, MAX_NICE


@pytest.mark.slow
def test_serve_starts_a_worker_per_model_and_stops_them_on_sigterm(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = genembed("serve", "--model", "minilm-l6", "--port", str(port), "--log-level", "warning")
    with running(cmd, f"{url}/ready", log_path=tmp_path / "serve.log") as proc:
        workers = children(proc.pid)
        assert len(workers) == 1
        [gateway_nice] = set(thread_niceness(proc.pid))  # the gateway comes first on cores they share
        worker_nice = gateway_nice + SERVE_WORKER_NICE
        # every thread of the worker at serve's niceness, but the one that tokenizes calls: nicer still
        assert set(thread_niceness(workers[0])) == {worker_nice, min(worker_nice + INGRESS_NICE, MAX_NICE)}
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["minilm-l6"]
        body = {"model": "minilm-l6", "input": "hello"}
        assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` or `kill` would
        assert proc.wait(timeout=30) != 0
        assert not any(alive(pid) for pid in workers)
    assert "items received" not in (tmp_path / "serve.log").read_text()  # serve's log level is its workers' too


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


def test_serve_gives_each_worker_cpus_of_its_own_when_there_are_enough():
    assert split_cpus([0, 1], 2) == ["0", "1"]
    assert split_cpus([0, 1, 2, 3, 4], 2) == ["0,1,2", "3,4"]
    assert split_cpus([2, 3, 6, 7], 4) == ["2", "3", "6", "7"]
    assert split_cpus([0, 1], 1) is None  # one worker keeps every CPU
    assert split_cpus([0, 1], 3) is None  # fewer CPUs than workers: none of its own for some, so none for any


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_serve_keeps_two_workers_on_cpus_of_their_own(tmp_path):
    port = free_port()
    cmd = genembed("serve", "--model", "minilm-l6", "--replicas", "2", "--cpu-split", "even", "--port", str(port))
    with running(cmd, f"http://127.0.0.1:{port}/ready", log_path=tmp_path / "serve.log") as proc:
        masks = [os.sched_getaffinity(pid) for pid in children(proc.pid)]
        gateway = os.sched_getaffinity(proc.pid)
        turns = [_environ(pid).get("GENEMBED_WORKER_CPU_TURNS") for pid in children(proc.pid)]
    assert len(masks) == 2 and not masks[0] & masks[1] and masks[0] | masks[1] == gateway
    assert turns == [None, None]  # CPUs of their own: no turns to take


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = (entry.decode().partition("=") for entry in f.read().split(b"\0") if entry)
        return {name: value for name, _, value in pairs}


@pytest.mark.slow
def test_serve_has_workers_on_shared_cpus_take_turns(tmp_path):
    """By default serve's workers keep every CPU and share one turns file and its ledger (`threads.CpuTurns`),
    removed on exit."""
    port = free_port()
    cmd = genembed("serve", "--model", "minilm-l6", "--replicas", "2", "--port", str(port))
    with running(cmd, f"http://127.0.0.1:{port}/ready", log_path=tmp_path / "serve.log") as proc:
        workers = children(proc.pid)
        [path] = {_environ(pid).get("GENEMBED_WORKER_CPU_TURNS") for pid in workers}
        assert path and os.path.exists(path) and os.path.exists(path + ".ledger")
        assert all(os.sched_getaffinity(pid) == os.sched_getaffinity(proc.pid) for pid in workers)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not os.path.exists(path) and not os.path.exists(path + ".ledger")
