"""Per-key limits and accounting: real gateways (TOML and plain keys files) in front of a real minilm-l6 worker,
plus the keys-file parsing and the bucket arithmetic on their own."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from service.auth import ApiKey, load_api_keys
from service.errors import RateLimited
from service.limits import KeyLimiter
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings
from tests.gateway_fixtures import gateway_process

MODEL = "minilm-l6"
KEYS_TOML = """
[defaults]
rpm = 1000

[[keys]]
name = "team-a"
key = "sk-secret-team-a"
rpm = 2

[[keys]]
name = "team-b"
key = "sk-secret-team-b"
tpm = 20

[[keys]]
name = "team-c"
key = "sk-secret-team-c"
"""


@pytest.fixture(scope="module")
def limited(minilm_worker, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(gateway URL, its log) with the TOML keys file above."""
    tmp = tmp_path_factory.mktemp("limited")
    keys = tmp / "keys.toml"
    keys.write_text(KEYS_TOML)
    with gateway_process(tmp, {MODEL: minilm_worker}, env={"GENEMBED_API_KEYS_FILE": str(keys)}) as (url, _):
        yield url, next(tmp.glob("gateway-*.log"))


def _embed(url: str, key: str, text: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": [text]}, headers=headers, timeout=60)


def _metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_requests_per_minute_by_key(limited) -> None:
    url = limited[0]
    for i in range(2):
        assert _embed(url, "sk-secret-team-a", f"rpm {i} {uuid.uuid4().hex}").status_code == 200
    refused = _embed(url, "sk-secret-team-a", "one too many")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "team-a" in error["message"] and "2 requests per minute" in error["message"]
    # A 2-per-minute bucket refills one request every 30 s: the two taken just now leave about 30 s to wait.
    assert 25 <= int(refused.headers["retry-after"]) <= 30
    # Every authenticated route counts, not just embeddings, and is refused before its body is read.
    headers = {"authorization": "Bearer sk-secret-team-a"}
    assert httpx.post(f"{url}/v1/refine-query", json={}, headers=headers).status_code == 429
    assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 429
    # Other keys are independent.
    assert _embed(url, "sk-secret-team-c", f"another key {uuid.uuid4().hex}").status_code == 200


def test_tokens_per_minute_charged_after_and_enforced_before_the_next(limited) -> None:
    url = limited[0]
    text = "a sentence long enough to spend a twenty token per minute budget in one single request, and more"
    first = _embed(url, "sk-secret-team-b", text)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["prompt_tokens"]
    assert used > 20
    refused = _embed(url, "sk-secret-team-b", "short")
    assert refused.status_code == 429 and "20 tokens per minute" in refused.json()["error"]["message"]
    # The bucket is at 20 - used; one token is needed, at 20/60 tokens per second: 3 s per token of debt + 1.
    expected = 3 * (used - 20 + 1)
    assert expected - 4 <= int(refused.headers["retry-after"]) <= expected


def test_usage_metrics_are_labelled_by_name_never_by_secret(limited) -> None:
    url, log = limited
    before = httpx.get(f"{url}/metrics").text
    response = _embed(url, "sk-secret-team-c", f"accounting {uuid.uuid4().hex}")
    assert response.status_code == 200
    tokens = response.json()["usage"]["prompt_tokens"]
    after = httpx.get(f"{url}/metrics").text
    key_tokens = "genembed_gateway_key_tokens_total"
    assert _metric(after, key_tokens, key="team-c") - _metric(before, key_tokens, key="team-c") == tokens
    requests = "genembed_gateway_key_requests_total"
    assert _metric(after, requests, key="team-c") - _metric(before, requests, key="team-c") == 1
    assert "sk-secret" not in after and "sk-secret" not in log.read_text()
    assert re.search(r'^genembed_gateway_key_rejections_total\{key="team-\w",limit="\w+"\} [1-9]', after, re.MULTILINE)
    access = [line for line in log.read_text().splitlines() if response.headers["x-request-id"] in line]
    assert any('"POST /v1/embeddings" 200' in line and "key=team-c" in line for line in access), access


def test_plain_keys_file_still_works(minilm_worker, tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key per line\nsk-plain-one\n\n  sk-plain-two  \n")
    with gateway_process(tmp_path, {MODEL: minilm_worker}, env={"GENEMBED_API_KEYS_FILE": str(keys)}) as (url, _):
        assert _embed(url, "sk-plain-two", f"plain {uuid.uuid4().hex}").status_code == 200
        assert _embed(url, "sk-plain-one", f"plain {uuid.uuid4().hex}").status_code == 200
        assert _embed(url, "sk-wrong", "plain").status_code == 401
        metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, "genembed_gateway_key_requests_total", key="key-2") == 1
    assert _metric(metrics, "genembed_gateway_key_requests_total", key="key-1") == 1
    assert "sk-plain" not in metrics


def test_keys_file_parsing(tmp_path) -> None:
    toml = tmp_path / "keys.toml"
    toml.write_text('[defaults]\nrpm = 5\ntpm = 50\n[[keys]]\nname = "a"\nkey = "k-a"\ntpm = 7\n')
    [env_key, a] = load_api_keys(GatewaySettings(api_keys=["k-env"], api_keys_file=toml))
    assert (env_key.name, env_key.rpm, env_key.tpm) == ("key-1", None, None)  # env keys: unlimited
    assert (a.name, a.rpm, a.tpm, a.key.get_secret_value()) == ("a", 5, 7, "k-a")  # defaults fill what is unset
    for bad in (
        '[[keys]]\nname = "a"\nkey = "x"\n[[keys]]\nname = "a"\nkey = "y"\n',  # repeated name
        '[[keys]]\nname = "a"\nkey = "x"\n[[keys]]\nname = "b"\nkey = "x"\n',  # repeated key
        '[[keys]]\nname = "has space"\nkey = "x"\n',  # a name must be a safe label
        '[[keys]]\nname = "a"\nkey = "x"\nrpm = 0\n',  # limits are positive
        '[[keys]]\nname = "a"\nkey = "x"\nrps = 3\n',  # unknown field
        "not toml = = 1\n",
    ):
        toml.write_text(bad)
        with pytest.raises(ValueError):
            load_api_keys(GatewaySettings(api_keys_file=toml))


def test_token_bucket_refills_at_the_per_minute_rate() -> None:
    now = [0.0]
    limiter = KeyLimiter(GatewayMetrics(), clock=lambda: now[0])
    key = ApiKey(name="k", key=SecretStr("s"), rpm=60, tpm=600)
    limiter.admit(key)
    limiter.charge(key, 1000)  # 400 tokens of debt at 10 tokens/s
    with pytest.raises(RateLimited) as refused:
        limiter.admit(key)
    assert refused.value.retry_after == 41  # (1 - (-400)) / 10 = 40.1 s
    now[0] = 40.0
    with pytest.raises(RateLimited):
        limiter.admit(key)
    now[0] = 40.2
    limiter.admit(key)
