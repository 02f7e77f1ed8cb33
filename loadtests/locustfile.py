"""Locust load for POST /v1/embeddings: mixed batch sizes and refinement steps (by hand, not in CI).

    genembed serve --model smollm2-gircse --model minilm-l6          # in another shell
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 60s

Environment: GENEMBED_BENCH_MODEL (default smollm2-gircse), GENEMBED_BENCH_API_KEY (when the gateway has
keys), GENEMBED_BENCH_REPEAT (share of requests that repeat an earlier input, i.e. cache hits; default 0).
K is drawn from {0, 1, 3, 5, 10, 20} up to the model's maximum (read from /v1/models), batch sizes from
{1, 4, 16, 64}; 429 answers count as failures in locust's table, named "429 overloaded".
"""

from __future__ import annotations

import itertools
import os
import random

from locust import HttpUser, between, task

MODEL = os.environ.get("GENEMBED_BENCH_MODEL", "smollm2-gircse")
API_KEY = os.environ.get("GENEMBED_BENCH_API_KEY")
REPEAT = float(os.environ.get("GENEMBED_BENCH_REPEAT", "0"))
STEPS = (0, 1, 3, 5, 10, 20)
BATCH_SIZES = (1, 4, 16, 64)
WORDS = (
    "the of and to in is was for on that with as by at from were are which this be or has had not but it "
    "city river music government system between during year team school company world state war time "
    "history population people area university album series family film part known called made"
).split()
_serial = itertools.count()


def sentence() -> str:
    """A new sentence each time (a serial number keeps it out of the cache)."""
    return f"{next(_serial)} " + " ".join(random.choices(WORDS, k=random.randint(8, 40)))


class EmbeddingsUser(HttpUser):
    wait_time = between(0, 0.05)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["authorization"] = f"Bearer {API_KEY}"
        card = self.client.get(f"/v1/models/{MODEL}", name="/v1/models/[model]").json()
        self.steps = [k for k in STEPS if card["min_refinement_steps"] <= k <= card["max_refinement_steps"]]
        self.seen: list[str] = []

    def _inputs(self, n: int) -> list[str]:
        if self.seen and random.random() < REPEAT:
            return random.choices(self.seen, k=n)
        fresh = [sentence() for _ in range(n)]
        self.seen = (self.seen + fresh)[-1000:]
        return fresh

    @task
    def embed(self) -> None:
        n = random.choice(BATCH_SIZES)
        k = random.choice(self.steps)
        body = {"model": MODEL, "input": self._inputs(n), "refinement_steps": k, "encoding_format": "base64"}
        name = f"/v1/embeddings n={n} K={k}"
        with self.client.post("/v1/embeddings", json=body, name=name, catch_response=True) as r:
            if r.status_code == 429:
                r.failure("429 overloaded")
            elif r.status_code != 200:
                r.failure(f"{r.status_code} {r.text[:200]}")
