"""`return_trajectory` and `refinement_steps: "auto"` through the gateway: shape, encodings, cache, errors."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

TEXT = "Where do migrating birds spend the winter?"


def _post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"model": "smollm2-gircse", "input": [TEXT], **body}, timeout=120)


def _floats(value: str | list[float]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value), "<f4") if isinstance(value, str) else np.array(value, np.float32)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_trajectory_rows_follow_encoding_and_dimensions(served, encoding):
    response = _post(served, refinement_steps=4, return_trajectory=True, dimensions=64, encoding_format=encoding)
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    rows = np.stack([_floats(row) for row in item["trajectory"]])
    assert item["refinement_steps"] == 4 and rows.shape == (4, 64)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    assert np.array_equal(rows[-1], _floats(item["embedding"]))
    plain = _post(served, refinement_steps=2, dimensions=64, encoding_format=encoding).json()["data"][0]
    assert "trajectory" not in plain and "refinement_steps" not in plain
    assert float(rows[1] @ _floats(plain["embedding"])) > 1 - 1e-5, "row 2 is the K = 2 embedding"


def test_auto_reports_the_steps_and_is_cached(served):
    first = _post(served, refinement_steps="auto", refinement_tolerance=0.05, return_trajectory=True)
    assert first.status_code == 200, first.text
    item = first.json()["data"][0]
    assert 2 <= item["refinement_steps"] < 20 and len(item["trajectory"]) == item["refinement_steps"]
    again = _post(served, refinement_steps="auto", refinement_tolerance=0.05, return_trajectory=True)
    assert again.headers["x-cache"] == "hit" and again.json()["data"] == first.json()["data"]
    # tolerance 0: every step up to the model's maximum
    full = _post(served, refinement_steps="auto", refinement_tolerance=0).json()["data"][0]
    assert full["refinement_steps"] == 20 and "trajectory" not in full


def test_openai_client_passes_the_extensions(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(
        model="smollm2-gircse", input=[TEXT], extra_body={"refinement_steps": 3, "return_trajectory": True}
    )
    extra = result.data[0].model_extra
    assert extra["refinement_steps"] == 3 and len(extra["trajectory"]) == 3


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "minilm-l6", "refinement_steps": "auto"}, "refinement_steps", "only for gircse"),
        ({"refinement_tolerance": 0.01}, "refinement_tolerance", "only with refinement_steps 'auto'"),
        ({"refinement_steps": "auto", "refinement_tolerance": -1}, "refinement_tolerance", "greater than or equal"),
        ({"refinement_steps": "many"}, "refinement_steps", ""),
    ],
)
def test_bad_step_options_are_400s(served, body, param, words):
    response = _post(served, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert error["param"] is None or param in error["param"]
