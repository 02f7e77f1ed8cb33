"""The fast layer of the teachers: yes/no parsing, and the judge client against a scripted chat-completions server
(retries, timeouts, the concurrency bound, per-document errors, 502/504, the score cache)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.cache import MemoryCache
from service.embedder import Embedder
from service.metrics import GatewayMetrics
from service.openai_api import DeadlineExceeded, InvalidRequest
from service.refine import llm
from service.refine.api import Teacher, TeacherFailed
from service.refine.llm import CallError, ChatClient, yes_no_score
from service.refine.teachers import Teachers
from service.settings import GatewaySettings
from service.workers import WorkerPool
from tests.procs import app_in_thread, free_port


def completion(*positions: list[tuple[str, float]]) -> dict:
    """A chat completion whose i-th generated token has the (token, probability) alternatives positions[i]."""
    content = [
        {
            "token": alts[0][0],
            "logprob": math.log(alts[0][1]),
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in alts],
        }
        for alts in positions
    ]
    return {
        "choices": [{"message": {"content": "".join(a[0][0] for a in positions)}, "logprobs": {"content": content}}]
    }


def test_yes_no_variants_are_summed():
    response = completion([("Yes", 0.5), (" yes", 0.1), ("YES.", 0.1), ("No", 0.2), ("yesterday", 0.05)])
    assert yes_no_score(response) == pytest.approx(0.7 / 0.9)
    bpe = completion([("Ġno", 0.6), ("▁Yes", 0.2), ("nothing", 0.1)])
    assert yes_no_score(bpe) == pytest.approx(0.25)


def test_the_second_token_is_read_when_the_first_is_preamble():
    response = completion([(" ", 0.9), ("Answer", 0.1)], [("no", 0.3), ("yes", 0.6)])
    assert yes_no_score(response) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "response",
    [completion([("Maybe", 0.9), ("Perhaps", 0.1)]), {"choices": [{"message": {"content": "yes"}}]}, {}],
    ids=["no-yes-or-no", "no-logprobs", "empty"],
)
def test_no_yes_no_is_an_error_not_a_score(response):
    with pytest.raises(ValueError):
        yes_no_score(response)


# -- a scripted OpenAI-compatible server --------------------------------------------------------------------


class Script:
    """What the fake judge does for a document, keyed by a word in the prompt."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            prompt = body["messages"][0]["content"]
            word = next((w for w in ("FLAKY", "HANG", "BROKEN", "REJECT", "SLOW") if w in prompt), "OK")
            self.calls[word] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(0.05)
                if word == "HANG":
                    await asyncio.sleep(30)
                if word == "SLOW":
                    await asyncio.sleep(0.5)
                if word == "FLAKY" and self.calls[word] % 2 == 1:
                    return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
                if word == "REJECT":
                    return JSONResponse({"error": {"message": "bad model"}}, status_code=400)
                if word == "BROKEN":
                    return {"choices": [{"message": {"content": "yes"}}]}
                if prompt.endswith("Passage:"):  # HyDE
                    return {"choices": [{"message": {"content": "A passage."}}]}
                yes = 0.9 if "relevant" in prompt.split("Document:")[1].split("\n")[0] else 0.2
                return completion([("Yes", yes), ("No", 1 - yes)])
            finally:
                self.in_flight -= 1

        return app


@pytest.fixture(scope="module")
def fake_judge() -> Iterator[tuple[str, Script]]:
    script = Script()
    with app_in_thread(script.app(), force_exit=True) as url:  # don't wait for the hung calls
        yield f"{url}/v1", script


def run_judge(url: str, documents: list[str], concurrency=4, timeout_s=2.0, budget_s=10.0, retries=1) -> list:
    async def go():
        client = ChatClient(url, "key", retries)
        try:
            return await llm.judge(client, "m", "q", "instr", documents, concurrency, timeout_s, 42, budget_s)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_judge_scores_and_bounds_concurrency(fake_judge):
    url, script = fake_judge
    script.max_in_flight = 0
    docs = [f"doc {i} {'relevant' if i % 2 else 'other'}" for i in range(12)]
    scores = run_judge(url, docs, concurrency=3)
    assert scores == [pytest.approx(0.9 if i % 2 else 0.2) for i in range(12)]
    assert script.max_in_flight == 3


def test_transient_failures_are_retried_once(fake_judge):
    url, script = fake_judge
    before = script.calls["FLAKY"]
    assert run_judge(url, ["FLAKY relevant"]) == [pytest.approx(0.9)]
    assert script.calls["FLAKY"] - before == 2
    assert isinstance(run_judge(url, ["FLAKY"], retries=0)[0], CallError)  # the odd call fails again


def test_errors_are_per_document(fake_judge):
    url, script = fake_judge
    started = time.monotonic()
    rejected_before = script.calls["REJECT"]
    out = run_judge(url, ["relevant", "REJECT", "BROKEN", "HANG"], timeout_s=0.5)
    assert out[0] == pytest.approx(0.9)
    assert [(o.code if isinstance(o, CallError) else None) for o in out[1:]] == [
        "http_error",
        "bad_response",
        "timeout",
    ]
    assert script.calls["REJECT"] - rejected_before == 1  # a 400 is not retried
    assert time.monotonic() - started < 0.5 * 2 + 1.5  # one retry of the hung call, then give up


def test_the_request_budget_bounds_everything(fake_judge):
    url, _ = fake_judge
    started = time.monotonic()
    out = run_judge(url, ["SLOW"] * 6, concurrency=1, budget_s=1.2)
    assert time.monotonic() - started < 2
    assert isinstance(out[-1], CallError) and out[-1].code == "timeout"
    assert out[0] == pytest.approx(0.2)


def test_unreachable_judge_fails_fast():
    started = time.monotonic()
    out = run_judge(f"http://127.0.0.1:{free_port()}/v1", ["x"])
    assert isinstance(out[0], CallError) and out[0].code == "unreachable"
    assert time.monotonic() - started < 2


# -- the teacher layer: error policy and score cache ---------------------------------------------------------


def teachers_for(url: str | None, **settings) -> Teachers:
    s = GatewaySettings(workers=["m=http://127.0.0.1:9"], judge_url=url, judge_model="judge", **settings)
    metrics = GatewayMetrics()
    return Teachers(s, Embedder(WorkerPool(s, metrics), MemoryCache(1 << 20, 0), s, metrics))


def score(teachers: Teachers, *doc_lists: list[str]) -> list:
    """Score each list in turn with the llm teacher, in one event loop."""

    async def go():
        try:
            return [
                await teachers.score(
                    Teacher(type="llm"), "q", None, [f"d{i}" for i in range(len(docs))], docs, 42, "r", 10.0
                )
                for docs in doc_lists
            ]
        finally:
            await teachers.aclose()

    return asyncio.run(go())


def test_scores_are_cached(fake_judge):
    url, _ = fake_judge
    docs = ["cached relevant", "cached other"]
    first, second = score(teachers_for(url), docs, docs)
    assert (first.calls, first.cache_hits) == (2, 0)
    assert (second.calls, second.cache_hits) == (0, 2)
    assert first.scores == pytest.approx([0.9, 0.2])
    assert second.scores == pytest.approx(first.scores)


def test_a_few_errors_are_reported_many_fail_the_request(fake_judge):
    url, _ = fake_judge
    (few,) = score(teachers_for(url), ["relevant", "other", "BROKEN"])
    assert few.scores[2] is None and few.errors[0].id == "d2" and few.errors[0].code == "bad_response"
    with pytest.raises(TeacherFailed, match="2 of 3"):
        score(teachers_for(url), ["relevant", "REJECT", "BROKEN"])
    with pytest.raises(DeadlineExceeded, match="timeout"):
        score(teachers_for(url, teacher_timeout_s=0.2, teacher_max_retries=0), ["HANG", "HANG", "ok"])


def test_no_judge_configured_is_a_400():
    with pytest.raises(InvalidRequest, match="GENEMBED_JUDGE_URL"):
        score(teachers_for(None), ["x"])


def test_hyde_writes_a_seeded_request(fake_judge):
    url, _ = fake_judge

    async def go():
        client = ChatClient(url, None, 0)
        try:
            return await llm.write_passage(client, "m", "q", None, 1, 0.7, 64, 2.0)
        finally:
            await client.aclose()

    assert asyncio.run(go()) == "A passage."
