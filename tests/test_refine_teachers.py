"""The fast layer of the teachers: the paper's yes/no score, the exact judge and HyDE requests the paper's code
sends (recorded by a real HTTP server), and the judge client against a scripted chat-completions server (retries,
timeouts, the concurrency bound, per-document errors, 502/504, the score cache)."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from harness.llama import JUDGE_MODEL, llama_server
from harness.procs import app_in_thread, free_port
from service.cache import MemoryCache
from service.embedder import Embedder
from service.errors import DeadlineExceeded, InvalidRequest, TeacherFailed
from service.metrics import GatewayMetrics
from service.refine import llm
from service.refine.api import Teacher
from service.refine.llm import CallError, ChatClient, yes_no_score
from service.refine.teachers import Teachers
from service.settings import GatewaySettings
from service.workers import WorkerPool


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


def test_yes_no_variants_are_summed_and_rounded_to_5_decimals_as_in_the_paper():
    response = completion([("Yes", 0.5), (" yes", 0.1), ("YES.", 0.1), ("No", 0.2), ("yesterday", 0.05)])
    assert yes_no_score(response) == 0.77778  # round(0.7 / 0.9, 5)
    bpe = completion([("Ġno", 0.6), ("▁Yes", 0.2), ("nothing", 0.1), ("yesĠ", 0.2)])
    assert yes_no_score(bpe) == 0.4


def test_the_second_token_is_read_when_the_first_is_preamble():
    response = completion([(" ", 0.9), ("Answer", 0.1)], [("no", 0.3), ("yes", 0.6)])
    assert yes_no_score(response) == 0.66667


def test_only_the_top_alternatives_of_the_first_two_positions_count():
    # The sampled token itself is not read (the paper reads top_logprobs only): here it is a "yes" outside them.
    sampled_only = {"choices": [{"logprobs": {"content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": []}]}}]}
    with pytest.raises(ValueError):
        yes_no_score(sampled_only)
    # A yes/no mass of at most 1e-4 at the first position is no answer: the second position decides.
    faint = completion([("Sure", 0.9), ("no", 0.5e-4)], [("No", 0.8), ("Yes", 0.2)])
    assert yes_no_score(faint) == 0.2
    with pytest.raises(ValueError):  # a third position is never read
        yes_no_score(completion([("Sure", 0.9)], [(",", 0.9)], [("yes", 0.9)]))


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
        self.bodies: list[dict] = []  # every request body, as the server received it
        self.in_flight = 0
        self.max_in_flight = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.bodies.append(body)
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
                    return {"choices": [{"message": {"content": "\nA passage. "}}]}
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


# -- the paper's requests, as a real server receives them ---------------------------------------------------

# IBM/task-aware-embedding-refinement, generative_llms.py (LLMJudgeYesNoProbs, generate_hypothetical_documents):
# the strings its code sends, written out here independently of service/refine/llm.py.
PAPER_JUDGE = (
    "Here is a user query and a document. Is this document relevant for this query? {task}Answer with only yes/no, "
    "without any preceding tokens. Query: {query}\nDocument: {document}\nRelevant? (Yes/No):"
)
PAPER_TASK = "Judge the relevance according to the following task: {} "
PAPER_HYDE = (
    "Write a representative document passage that would be relevant to the following query. The passage should "
    "capture key concepts and terminology that relevant documents would contain.\n\nQuery: {}\n\nPassage:"
)


def received(script: Script, marker: str) -> list[dict]:
    """The bodies the server received whose prompt holds `marker`, in arrival order."""
    return [b for b in script.bodies if marker in b["messages"][0]["content"]]


def test_the_judge_sends_the_papers_question_and_call_parameters(fake_judge):
    url, script = fake_judge

    async def go():
        client = ChatClient(url, None, 0)
        try:
            with_task = await llm.judge(client, "m", "q-task", "Find intents.", ["d relevant"], 2, 2.0, 7, 10.0)
            without = await llm.judge(client, "Qwen/Qwen3-8B", "q-none", None, ["d other"], 2, 2.0, 42, 10.0)
            return with_task + without
        finally:
            await client.aclose()

    assert asyncio.run(go()) == [0.9, 0.2]
    task = PAPER_TASK.format("Find intents.")
    assert received(script, "q-task") == [
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": PAPER_JUDGE.format(task=task, query="q-task", document="d relevant")}
            ],
            "seed": 7,
            "max_tokens": 5,
            "logprobs": True,
            "top_logprobs": 5,
        }
    ]  # no temperature: the paper leaves it to the server
    (qwen,) = received(script, "q-none")
    assert qwen["messages"][0]["content"] == PAPER_JUDGE.format(task="", query="q-none", document="d other")
    assert qwen["chat_template_kwargs"] == {"enable_thinking": False}  # as the paper does for Qwen judges


def test_the_judge_prompt_keeps_the_papers_character_bound():
    long = "x" * 600_000
    assert len(llm.judge_prompt("q", long, "task")) == 500_000 - len("{}{}")  # the paper counts its two "{}"
    assert llm.judge_prompt("q", "short", None) == PAPER_JUDGE.format(task="", query="q", document="short")


def test_the_teacher_instruction_replaces_the_requests_for_the_judge(fake_judge):
    url, script = fake_judge

    async def go():
        teachers = teachers_for(url)
        try:
            for instruction in (None, "", "Judge by topic."):
                teacher = Teacher(type="llm", instruction=instruction)
                await teachers.score(teacher, "q-instr", "Student task.", ["d0"], ["d relevant"], 42, "r", 10.0)
        finally:
            await teachers.aclose()

    asyncio.run(go())
    prompts = [b["messages"][0]["content"] for b in received(script, "q-instr")]
    tasks = [PAPER_TASK.format("Student task."), "", PAPER_TASK.format("Judge by topic.")]
    assert prompts == [PAPER_JUDGE.format(task=t, query="q-instr", document="d relevant") for t in tasks]
    with pytest.raises(ValueError, match="only for the llm teacher"):
        Teacher(type="labels", labels={}, instruction="x")


def test_hyde_sends_the_papers_request_and_keeps_the_passage_as_written(fake_judge):
    url, script = fake_judge

    async def go():
        client = ChatClient(url, None, 0)
        try:
            return await llm.write_passage(client, "m", "q-hyde", 1, 0.7, 256, 2.0)
        finally:
            await client.aclose()

    assert asyncio.run(go()) == "\nA passage. "
    assert received(script, "q-hyde") == [
        {
            "model": "m",
            "messages": [{"role": "user", "content": PAPER_HYDE.format("q-hyde")}],
            "seed": 1,
            "max_tokens": 256,
            "temperature": 0.7,
        }
    ]


def test_openais_own_api_gets_max_completion_tokens(fake_judge, monkeypatch):
    """As the paper's code does for api.openai.com; the scripted server stands in for it as an HTTP proxy."""
    url, script = fake_judge
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", url.removesuffix("/v1"))

    async def go():
        client = ChatClient("http://api.openai.com/v1", "key", 0)
        try:
            return await llm.judge(client, "gpt-4.1-mini", "q-openai", None, ["d relevant"], 1, 2.0, 42, 10.0)
        finally:
            await client.aclose()

    assert asyncio.run(go()) == [0.9]
    (body,) = received(script, "q-openai")
    assert body["max_completion_tokens"] == 5 and "max_tokens" not in body


# -- the paper's call against a real OpenAI-compatible server -------------------------------------------------


@pytest.fixture(scope="module")
def llama_judge(tmp_path_factory) -> Iterator[str]:
    with llama_server(tmp_path_factory.mktemp("teachers-llama")) as (url, _):
        yield url


def papers_score(response: dict) -> float | None:
    """LLMJudgeYesNoProbs.calc_score of the paper's code, rewritten here as the reference: the first of the first
    two positions whose top alternatives hold more than 1e-4 of yes/no probability, rounded to 5 decimals."""
    for position in response["choices"][0]["logprobs"]["content"][:2]:
        pos, neg = (
            [
                math.exp(t["logprob"])
                for t in position["top_logprobs"]
                if re.fullmatch(rf"(\W|Ġ|_)*{w}(\W|Ġ|_)*", t["token"], re.I)
            ]
            for w in ("yes", "no")
        )
        if (pos or neg) and sum(pos) + sum(neg) > 1e-4:
            return round(sum(pos) / (sum(pos) + sum(neg)), 5)
    return None


@pytest.mark.slow
def test_the_papers_judge_call_against_llama_cpp(llama_judge):
    query = "interest rates and the stock market"
    docs = ["The central bank raised interest rates to fight inflation.", "The cat sat on the mat."]

    async def go():
        client = ChatClient(llama_judge, None, 0)
        try:
            return await llm.judge(client, JUDGE_MODEL, query, "Find finance news.", docs, 2, 120.0, 42, 300.0)
        finally:
            await client.aclose()

    scores = asyncio.run(go())
    for doc, score in zip(docs, scores, strict=True):
        payload = llm.judge_payload(JUDGE_MODEL, query, doc, "Find finance news.", 42)
        response = httpx.post(f"{llama_judge}/chat/completions", json=payload, timeout=120).json()
        positions = response["choices"][0]["logprobs"]["content"]
        assert 1 <= len(positions) <= 5 and all(len(p["top_logprobs"]) == 5 for p in positions)
        assert isinstance(score, float) and 0 <= score <= 1
        assert score == papers_score(response)  # the server answers the same question the same way
