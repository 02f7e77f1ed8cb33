"""The gateway against a real `redis-server --requirepass`: the right password caches (the corpora too: they
share the joined URL); a wrong or missing one stops the start with what to fix; a Redis that does not answer
yet, or that changes its password under a running gateway, means uncached service until it answers again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis

from harness.procs import free_port, genembed_exits
from service.settings import GatewaySettings
from tests.gateway_fixtures import gateway_process, redis_process
from tests.load import poll, sample
from tests.test_gateway_cache import embed, log_count, wait_for_hit

PASSWORD = "s3cret/with:odd@chars"


def gateway_start(env: dict[str, str]) -> subprocess.CompletedProcess:
    """`genembed gateway` that is expected to exit at start (before it calls its worker, so none runs)."""
    return genembed_exits(
        "gateway", "--port", str(free_port()), f"--worker=minilm-l6=http://127.0.0.1:{free_port()}", env=env, timeout=60
    )


@pytest.mark.slow
def test_the_right_password_caches_and_a_rotated_one_is_an_outage(minilm_worker, tmp_path):
    with redis_process(tmp_path, password=PASSWORD) as (redis_url, _):
        env = {"GENEMBED_REDIS_URL": redis_url, "GENEMBED_REDIS_PASSWORD": PASSWORD, "GENEMBED_REDIS_RETRY_S": "0.5"}
        with gateway_process(tmp_path, {"minilm-l6": minilm_worker}, env) as (url, _):
            assert embed(url, "behind a password").headers["x-cache"] == "miss"
            assert embed(url, "behind a password").headers["x-cache"] == "hit"
            client = redis.Redis.from_url(redis_url, password=PASSWORD)
            assert client.dbsize() > 0

            # The password changes under the running gateway (and its connections drop, as when a Redis pod
            # restarts): it serves on uncached, and says why.
            client.config_set("requirepass", "rotated")
            client = redis.Redis.from_url(redis_url, password="rotated")
            client.client_kill_filter(skipme=True)
            poll(lambda: embed(url, "wakes it up").headers["x-cache"] == "miss", 10, "a call after the rotation")
            poll(lambda: log_count(tmp_path, "check GENEMBED_REDIS_PASSWORD") == 1, 10, "the refusal logged")
            assert sample(url, "genembed_gateway_cache_available") == 0
            assert embed(url, "behind a password").headers["x-cache"] == "miss"  # uncached, yet served

            client.config_set("requirepass", PASSWORD)  # rotated back: caching resumes on its own
            wait_for_hit(url, "after the rotation")


@pytest.mark.parametrize(
    ("password", "complaint"),
    [("not-the-password", "a password that it refused"), (None, "no password, which it refused")],
    ids=["wrong password", "no password"],
)
def test_a_password_redis_refuses_stops_the_start(tmp_path, password, complaint):
    with redis_process(tmp_path, password=PASSWORD) as (redis_url, _):
        env = {"GENEMBED_REDIS_URL": redis_url, **({"GENEMBED_REDIS_PASSWORD": password} if password else {})}
        done = gateway_start(env)
    assert done.returncode == 2, done.stderr
    shown = redis_url.replace("redis://", "redis://:***@") if password else redis_url
    assert f"genembed gateway: redis at {shown} refused the gateway's credentials" in done.stderr
    assert complaint in done.stderr and "set GENEMBED_REDIS_PASSWORD" in done.stderr
    assert password is None or password not in done.stderr


def test_a_password_in_the_url_and_the_variable_is_refused():
    env = {"GENEMBED_REDIS_URL": "redis://:one@127.0.0.1:6379/0", "GENEMBED_REDIS_PASSWORD": "two"}
    done = gateway_start(env)
    assert done.returncode == 2
    assert "the Redis password is given twice" in done.stderr


@pytest.mark.slow
def test_a_redis_that_does_not_answer_at_start_is_a_warning(minilm_worker, tmp_path):
    port = free_port()
    env = {"GENEMBED_REDIS_URL": f"redis://127.0.0.1:{port}/0", "GENEMBED_REDIS_PASSWORD": PASSWORD}
    with gateway_process(tmp_path, {"minilm-l6": minilm_worker}, {**env, "GENEMBED_REDIS_RETRY_S": "0.5"}) as (url, _):
        assert embed(url, "redis is not there yet").headers["x-cache"] == "miss"
        assert log_count(tmp_path, f"redis at redis://:***@127.0.0.1:{port}/0 does not answer yet") == 1
        with redis_process(tmp_path, port, password=PASSWORD):
            wait_for_hit(url, "redis came up")


def certificates(directory: Path) -> Path:
    """A CA and a certificate for localhost it signed (openssl), the files of a kubernetes.io/tls Secret."""
    directory.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    key = ("-newkey", "rsa:2048", "-nodes", "-days", "1")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=genembed test CA")
    openssl("req", *key[:3], "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=localhost")
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "san.cnf", "-out", "tls.crt",
    )  # fmt: skip
    return directory


@pytest.mark.slow
def test_rediss_with_a_password_caches(minilm_worker, tmp_path):
    """TLS as the chart's redis.tls sets it up: rediss:// checked against the CA named in the URL."""
    with redis_process(tmp_path, password=PASSWORD, tls=certificates(tmp_path / "tls")) as (redis_url, _):
        assert redis_url.startswith("rediss://localhost:") and "ssl_ca_certs=" in redis_url
        env = {"GENEMBED_REDIS_URL": redis_url, "GENEMBED_REDIS_PASSWORD": PASSWORD}
        with gateway_process(tmp_path, {"minilm-l6": minilm_worker}, env) as (url, _):
            assert embed(url, "over TLS").headers["x-cache"] == "miss"
            assert embed(url, "over TLS").headers["x-cache"] == "hit"


def test_the_password_is_joined_into_the_url_quoted():
    settings = GatewaySettings(redis_url="rediss://cache.internal:6380/2?ssl_ca_certs=/ca.crt", redis_password=PASSWORD)
    assert settings.redis_url == "rediss://:s3cret%2Fwith%3Aodd%40chars@cache.internal:6380/2?ssl_ca_certs=/ca.crt"
    kwargs = redis.connection.parse_url(settings.redis_url)
    assert (kwargs["password"], kwargs["host"], kwargs["port"]) == (PASSWORD, "cache.internal", 6380)
    user = GatewaySettings(redis_url="redis://genembed@cache:6379/0", redis_password="p")
    assert user.redis_url == "redis://genembed:p@cache:6379/0"
    assert GatewaySettings(redis_url="redis://cache:6379/0", redis_password="").redis_url == "redis://cache:6379/0"
    with pytest.raises(ValueError, match="GENEMBED_REDIS_URL is not"):
        GatewaySettings(redis_url=None, redis_password="p")
