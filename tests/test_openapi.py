"""The OpenAPI document is the API: schemathesis generates requests (valid and invalid) for every operation of a live
gateway's /openapi.json, with a real minilm-l6 worker behind it, and checks each answer against the document: no
5xx that is not documented, every status, content type, header and body as documented. Any finding fails.

The document is tested as served, except that the `model` a request names is pinned to the model this gateway
serves: otherwise nearly every generated request would stop at a 404 before reaching the embedder and the worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.ci import tool_missing
from tests.gateway_fixtures import gateway_process

MODEL = "minilm-l6"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
EXAMPLES_PER_OPERATION = 50  # with the coverage and stateful phases about 1,500 requests: ~15 s here


def pin_model(spec: dict[str, Any], model: str) -> dict[str, Any]:
    """`spec` with the `model` of every request body, and the {model} path parameter, limited to `model`."""
    for operation in (op for path in spec["paths"].values() for op in path.values()):
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "model" and parameter["in"] == "path":
                parameter["schema"] = {"type": "string", "enum": [model]}
        body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if body is not None and "$ref" in body:
            body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
        if body is not None and "model" in body.get("properties", {}):
            body["properties"]["model"] = {"type": "string", "enum": [model]}
    return spec


def test_the_gateway_answers_as_its_openapi_document_says(minilm_worker, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "st"
    if not st.exists():
        tool_missing("schemathesis is not installed: bash scripts/setup-tests.sh")
    with gateway_process(tmp_path, {MODEL: minilm_worker}) as (url, _):
        spec = pin_model(httpx.get(f"{url}/openapi.json").json(), MODEL)
        schema = tmp_path / "openapi.json"
        schema.write_text(json.dumps(spec))
        done = subprocess.run(
            [
                str(st),
                "run",
                str(schema),
                f"--url={url}",
                f"--checks={','.join(CHECKS)}",
                f"--max-examples={EXAMPLES_PER_OPERATION}",
                "--seed=1",
                "--workers=1",
                "--generation-database=none",
                "--request-timeout=60",
                "--no-color",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=540,
        )
    assert done.returncode == 0, done.stdout[-20_000:] + done.stderr[-5_000:]
    operations = sum(len(path) for path in spec["paths"].values())
    assert f"Tested: {operations}" in done.stdout, done.stdout[-5_000:]  # every operation, none skipped
