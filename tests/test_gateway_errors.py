"""Every error path of the gateway: status, OpenAI-shaped body, and headers where they matter."""

from __future__ import annotations

import httpx
import pytest

from harness.procs import free_port
from tests.gateway_fixtures import gateway_process

pytestmark = pytest.mark.slow


def assert_error(response: httpx.Response, status: int, code: str, param: str | None, message: str) -> None:
    """`message` is a substring of the error message; the rest must match exactly."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    assert (error["type"], error["code"], error["param"]) == (kind, code, param), error
    assert message in error["message"], error["message"]


def post(url: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json=body, timeout=60, **kwargs)


@pytest.mark.parametrize(
    ("body", "code", "param", "message"),
    [
        ({"model": "minilm-l6", "input": []}, "invalid_request", "input", "input must not be an empty list"),
        ({"model": "minilm-l6", "input": ""}, "invalid_request", "input", "input[0] is empty"),
        ({"model": "minilm-l6", "input": [[1], []]}, "invalid_request", "input", "input[1] is empty"),
        ({"model": "minilm-l6", "input": [1, "a"]}, "invalid_request", "input", "input must be a string, a list of"),
        ({"model": "minilm-l6", "input": {"a": 1}}, "invalid_request", "input", "input must be a string, a list of"),
        ({"input": "x"}, "invalid_request", "model", "model: Field required"),
        ({"model": "minilm-l6", "input": "x", "foo": 1}, "invalid_request", "foo", "unrecognized request argument"),
        (
            {"model": "minilm-l6", "input": "x", "encoding_format": "hex"},
            "invalid_request",
            "encoding_format",
            "'float' or 'base64'",
        ),
        ({"model": "minilm-l6", "input": "x", "dimensions": 0}, "invalid_request", "dimensions", "greater than 0"),
        (
            {"model": "minilm-l6", "input": "x", "input_type": "passage"},
            "invalid_request",
            "input_type",
            "'query' or 'document'",
        ),
        ({"model": "minilm-l6", "input": "x", "truncate": "maybe"}, "invalid_request", "truncate", "truncate:"),
        (
            {"model": "minilm-l6", "input": "x", "dimensions": 385},
            "invalid_request",
            "dimensions",
            "dimensions=385 is larger than the 384 dimensions of model 'minilm-l6'",
        ),
        (
            {"model": "minilm-l6", "input": "x", "refinement_steps": 1},
            "steps_out_of_range",
            "refinement_steps",
            "refinement_steps=1 is outside the range model 'minilm-l6' accepts: 0..0",
        ),
        (
            {"model": "smollm2-gircse", "input": "x", "refinement_steps": -1},
            "steps_out_of_range",
            "refinement_steps",
            "refinement_steps=-1 is outside the range model 'smollm2-gircse' accepts: 0..20",
        ),
        (
            {"model": "minilm-l6", "input": ["a", [5, 30522]]},
            "invalid_request",
            "input",
            "input must be a string, a list of",  # mixed text and ids is not one of OpenAI's shapes
        ),
        (
            {"model": "minilm-l6", "input": [[5], [7, 30522]]},
            "token_out_of_vocabulary",
            "input",
            "input[1]: token id 30522 is outside the vocabulary of model 'minilm-l6' (0..30521)",
        ),
        (
            {"model": "smollm2-gircse", "input": [-1]},
            "token_out_of_vocabulary",
            "input",
            "token id -1 is outside the vocabulary",
        ),
        (
            {"model": "minilm-l6", "input": ["short", "word " * 300], "truncate": False},
            "input_too_long",
            "input",
            "input[1]: input has 302 tokens, more than the 256 model 'minilm-l6' accepts",
        ),
    ],
)
def test_400(served, body, code, param, message):
    assert_error(post(served, body), 400, code, param, message)


def test_400_on_a_malformed_body(served):
    response = httpx.post(f"{served}/v1/embeddings", content=b'{"model": "minilm-l6", "input": "x"', timeout=10)
    assert_error(response, 400, "invalid_request", None, "the body is not valid JSON")
    response = httpx.post(f"{served}/v1/embeddings", content=b"[1, 2]", timeout=10)
    assert_error(response, 400, "invalid_request", None, "the body must be a JSON object")


def test_truncate_true_serves_long_inputs(served):
    response = post(served, {"model": "minilm-l6", "input": "word " * 300, "encoding_format": "base64"})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 256


def test_404(served):
    response = post(served, {"model": "text-embedding-3-small", "input": "x"})
    assert_error(response, 404, "model_not_found", "model", "the model 'text-embedding-3-small' does not exist")
    assert_error(httpx.get(f"{served}/v2/nothing"), 404, "not_found", None, "Not Found")
    assert_error(httpx.get(f"{served}/v1/embeddings"), 405, None, None, "Method Not Allowed")


def test_413_more_inputs_than_allowed(served):
    response = post(served, {"model": "minilm-l6", "input": ["x"] * 2049})
    assert_error(response, 413, "payload_too_large", "input", "2049 inputs; at most 2048 per request")


def test_413_body_limit_and_401(minilm_worker, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nsk-from-file\n\n")
    env = {
        "GENEMBED_MAX_BODY_BYTES": "2048",
        "GENEMBED_API_KEYS": "sk-one,sk-two",
        "GENEMBED_API_KEYS_FILE": str(keys_file),
        "GENEMBED_METRICS_REQUIRE_AUTH": "true",
    }
    with gateway_process(tmp_path, {"minilm-l6": minilm_worker}, env) as (url, _):
        body = {"model": "minilm-l6", "input": "hello"}
        assert_error(post(url, body), 401, "invalid_api_key", None, "missing API key")
        wrong = {"authorization": "Bearer sk-three"}
        assert_error(post(url, body, headers=wrong), 401, "invalid_api_key", None, "incorrect API key provided")
        basic = {"authorization": "Basic c2stb25lOg=="}
        assert_error(post(url, body, headers=basic), 401, "invalid_api_key", None, "missing API key")
        for key in ("sk-one", "sk-two", "sk-from-file"):
            assert post(url, body, headers={"authorization": f"Bearer {key}"}).status_code == 200
        assert_error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key", None, "missing API key")
        assert_error(httpx.get(f"{url}/metrics"), 401, "invalid_api_key", None, "missing API key")
        assert httpx.get(f"{url}/metrics", headers={"authorization": "Bearer sk-one"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 200

        auth = {"authorization": "Bearer sk-one"}
        big = {"model": "minilm-l6", "input": ["x" * 1000, "y" * 1000, "z" * 100]}
        message = "the request body is larger than the 2048-byte limit"
        assert_error(post(url, big, headers=auth), 413, "payload_too_large", None, message)

        def chunks():  # no content-length: the limit is enforced while reading
            yield b'{"model": "minilm-l6", "input": "'
            for _ in range(10):
                yield b"a" * 500
            yield b'"}'

        chunked = httpx.post(f"{url}/v1/embeddings", content=chunks(), headers=auth, timeout=10)
        assert_error(chunked, 413, "payload_too_large", None, message)
        metrics = httpx.get(f"{url}/metrics", headers=auth).text
        assert 'genembed_gateway_rejections_total{reason="invalid_api_key"} 5.0' in metrics
        assert 'genembed_gateway_rejections_total{reason="payload_too_large"} 2.0' in metrics


def test_503_when_the_worker_is_not_there(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway_process(tmp_path, {"minilm-l6": dead}, ready=False) as (url, _):
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "not ready", "workers": {"minilm-l6": False}}
        response = post(url, {"model": "minilm-l6", "input": "x"})
        assert_error(response, 503, "worker_unavailable", None, "the worker for model 'minilm-l6' is unavailable")
        assert response.headers["retry-after"] == "2"
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m["ready"], m["dimension"]) for m in models] == [("minilm-l6", False, None)]


def test_400_for_work_that_cannot_finish_within_the_deadline(gircse_worker, tmp_path):
    """Not a 504 after the deadline (#22): the worker, which knows its speed, says at once what to change."""
    with gateway_process(tmp_path, {"smollm2-gircse": gircse_worker}, {"GENEMBED_REQUEST_TIMEOUT_S": "1"}) as (url, _):
        body = {"model": "smollm2-gircse", "input": [f"slow {i}" for i in range(16)], "refinement_steps": 20}
        response = post(url, body)
        assert_error(response, 400, "exceeds_deadline", None, "send fewer inputs per request")


def test_docs_describe_the_embeddings_request(served):
    assert httpx.get(f"{served}/docs").status_code == 200
    spec = httpx.get(f"{served}/openapi.json").json()
    body = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"input", "model", "refinement_steps", "input_type", "instruction", "truncate"} <= set(body["properties"])
