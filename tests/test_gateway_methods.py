"""Every method's worker behind one gateway, with requests for all of them in flight together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from harness.procs import free_port, genembed, running


def test_o1_gircse_debater_and_pooled_in_flight_together(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    models = ("smollm2-o1", "smollm2-gircse", "smollm2-debater", "minilm-l6")
    cmd = genembed("serve", "--port", str(port), *(arg for m in models for arg in ("--model", m)))
    requests = [
        {"model": "smollm2-o1", "input": ["what is a neutron star?"], "refinement_steps": 4, "seed": 7, "samples": 2},
        {"model": "smollm2-o1", "input": ["a neutron star is dense"], "input_type": "document"},
        {"model": "smollm2-gircse", "input": ["what is a neutron star?", "stellar remnants"], "refinement_steps": 3},
        {"model": "smollm2-debater", "input": ["stars collapse"], "input_type": "document", "refinement_steps": 4},
        {"model": "minilm-l6", "input": ["what is a neutron star?"]},
    ]
    with running(cmd, f"{url}/ready", timeout=600, log_path=tmp_path / "serve.log"):
        ranges = {
            m["id"]: (m["min_refinement_steps"], m["max_refinement_steps"])
            for m in httpx.get(f"{url}/v1/models").json()["data"]
        }
        assert ranges == {
            "smollm2-o1": (0, 128),
            "smollm2-gircse": (0, 20),
            "smollm2-debater": (1, 8),
            "minilm-l6": (0, 0),
        }
        with ThreadPoolExecutor(len(requests) * 2) as pool:
            responses = list(pool.map(lambda b: httpx.post(f"{url}/v1/embeddings", json=b, timeout=300), requests * 2))
        for body, response in zip(requests * 2, responses, strict=True):
            assert response.status_code == 200, response.text
            vectors = np.array([d["embedding"] for d in response.json()["data"]])
            assert vectors.shape[0] == len(body["input"])
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-4)
        # the same o1 request (same seed) gives the same vector (deduplicated, cached or recomputed)
        first, again = responses[0].json()["data"][0]["embedding"], responses[5].json()["data"][0]["embedding"]
        np.testing.assert_allclose(first, again, atol=1e-5)
        out_of_range = httpx.post(f"{url}/v1/embeddings", json={**requests[3], "refinement_steps": 9})
        assert out_of_range.status_code == 400 and "1..8" in out_of_range.json()["error"]["message"]
        # debater's step states for max-sim: K rows, row i the K = i vector; o1 has none to give
        states = httpx.post(f"{url}/v1/embeddings", json={**requests[3], "return_trajectory": True}, timeout=300)
        rows = np.array(states.json()["data"][0]["trajectory"])
        assert rows.shape == (4, 576) and np.allclose(rows[-1], states.json()["data"][0]["embedding"])
        k2 = httpx.post(f"{url}/v1/embeddings", json={**requests[3], "refinement_steps": 2}, timeout=300)
        assert float(rows[1] @ np.array(k2.json()["data"][0]["embedding"])) > 1 - 1e-5
        o1 = httpx.post(f"{url}/v1/embeddings", json={**requests[0], "return_trajectory": True}, timeout=300)
        assert o1.status_code == 400 and o1.json()["error"]["param"] == "return_trajectory"
