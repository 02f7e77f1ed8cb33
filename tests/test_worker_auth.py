"""Workers answer only the gateway: a real worker with a token refuses calls without it (401, logged, counted)
and serves its gateway; `genembed serve` makes a token for its own workers; a worker without a token stays
open on loopback and refuses to start on any other address."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.protocol import WORKER_TOKEN_HEADER, EmbedItem, EmbedRequest, EmbedResponse
from harness.procs import children, free_port, genembed, genembed_exits, running, worker_process
from model_server.app import create_app
from model_server.settings import WorkerSettings
from tests.gateway_fixtures import gateway_process
from tests.load import MODEL, poll, sample

TOKEN = "gateway-token-for-the-tests"
NEXT_TOKEN = "the-token-that-replaces-it"
REFUSED = "genembed_worker_unauthorized_requests_total"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A minilm-l6 worker that requires TOKEN (and NEXT_TOKEN, as during a rotation); yields (URL, its log)."""
    tmp = tmp_path_factory.mktemp("guarded")
    env = {"GENEMBED_WORKER_TOKEN": TOKEN, "GENEMBED_WORKER_ROTATION_TOKEN": NEXT_TOKEN}
    with worker_process(MODEL, tmp, env=env) as (url, _):
        yield url, next(tmp.glob("worker-*.log"))


def embed(url: str, token: str | None) -> httpx.Response:
    body = EmbedRequest(items=[EmbedItem(text="who may ask")]).encode()
    headers = {WORKER_TOKEN_HEADER: token} if token is not None else {}
    return httpx.post(f"{url}/embed", content=body, headers=headers, timeout=60)


def test_a_call_without_the_token_is_refused_before_any_work(guarded):
    url, log = guarded
    before = {reason: sample(url, REFUSED, reason=reason) for reason in ("missing", "wrong")}
    items = sample(url, "genembed_worker_items_total")
    for response in (embed(url, None), httpx.get(f"{url}/info"), httpx.get(f"{url}/docs")):
        assert response.status_code == 401, response.text
        assert response.json() == {
            "detail": f"missing worker token ({WORKER_TOKEN_HEADER})",
            "code": "unauthorized",
        }
    wrong = embed(url, TOKEN + "x")
    assert wrong.status_code == 401 and wrong.json()["detail"].startswith("wrong worker token")
    assert sample(url, REFUSED, reason="missing") == before["missing"] + 3
    assert sample(url, REFUSED, reason="wrong") == before["wrong"] + 1
    assert sample(url, "genembed_worker_items_total") == items  # nothing reached the engine
    poll(lambda: "refused POST /embed from 127.0.0.1: wrong worker token" in log.read_text(), 10, "logged")
    assert TOKEN not in log.read_text()


def test_probes_and_metrics_stay_open(guarded):
    url, _ = guarded
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200, path


def test_the_token_and_the_rotation_token_are_served(guarded):
    url, _ = guarded
    for token in (TOKEN, NEXT_TOKEN):
        response = embed(url, token)
        assert response.status_code == 200, response.text
        assert EmbedResponse.decode(response.content).vectors.shape == (1, 384)
    assert httpx.get(f"{url}/info", headers={WORKER_TOKEN_HEADER: TOKEN}).json()["id"] == MODEL


def test_the_gateway_with_the_token_is_served_and_one_without_is_refused(guarded, tmp_path):
    url, _ = guarded
    body = {"model": MODEL, "input": ["through the gateway"]}
    with gateway_process(tmp_path, {MODEL: url}, env={"GENEMBED_WORKER_TOKEN": TOKEN}) as (gateway, _):
        response = httpx.post(f"{gateway}/v1/embeddings", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]["embedding"]) == 384
    refused = sample(url, REFUSED, reason="missing")
    with gateway_process(tmp_path, {MODEL: url}, env={"GENEMBED_WORKER_TOKEN": ""}, ready=False) as (gateway, _):
        poll(lambda: sample(url, REFUSED, reason="missing") > refused, 20, "the gateway's probe refused")
        assert httpx.get(f"{gateway}/ready").status_code == 503
        assert httpx.post(f"{gateway}/v1/embeddings", json=body, timeout=60).status_code == 503
        port = gateway.rsplit(":", 1)[1]
        time.sleep(3)  # more probes: the refusal is logged once, not on each
        log = (tmp_path / f"gateway-{port}.log").read_text()
        assert log.count("refuses this gateway's token (401)") == 1, log


@pytest.mark.slow
def test_serve_gives_its_workers_a_token_of_its_own(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = genembed("serve", "--model", MODEL, "--port", str(port))
    with running(cmd, f"{url}/ready", env={"GENEMBED_WORKER_TOKEN": ""}, log_path=tmp_path / "serve.log") as proc:
        body = {"model": MODEL, "input": ["end to end"]}
        assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).status_code == 200
        (pid,) = children(proc.pid)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        worker = f"http://127.0.0.1:{int(argv[argv.index(b'--port') + 1])}"
        assert embed(worker, None).status_code == 401
        # The generated token reaches the worker through its environment, never its command line.
        environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if v)
        token = environ[b"GENEMBED_WORKER_TOKEN"].decode()
        assert len(token) >= 32 and token.encode() not in b" ".join(argv)
        assert embed(worker, token).status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "worker.internal"])
def test_a_worker_without_a_token_refuses_to_serve_other_hosts(host):
    done = genembed_exits(
        "worker", "--model", MODEL, "--host", host, "--port", str(free_port()), env={"GENEMBED_WORKER_TOKEN": ""}
    )
    assert done.returncode == 2, done.stderr
    assert f"genembed worker: refusing to serve on {host} without a token" in done.stderr
    assert "GENEMBED_WORKER_TOKEN" in done.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_a_worker_without_a_token_serves_loopback_with_a_warning(host, caplog):
    with caplog.at_level(logging.WARNING, logger="model_server.auth"):
        create_app(WorkerSettings(model=MODEL, host=host, token=None))
    assert f"no GENEMBED_WORKER_TOKEN: any process on this machine can call this worker on {host}" in caplog.text
