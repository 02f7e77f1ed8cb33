"""An OpenAI-compatible chat-completions client for the LLM judge and HyDE (vLLM, LiteLLM, llama.cpp, OpenAI).

The judge and HyDE requests are the ones the paper's code sends (IBM/task-aware-embedding-refinement,
`generative_llms.py`: `LLMJudgeYesNoProbs`, `OpenAIStyleMixin`, `generate_hypothetical_documents`), so teacher
scores and hypothetical passages are the paper's; docs/refine.md lists what still differs.

Every call has its own timeout and a bounded number of retries, and only for what a retry can fix (timeouts,
connection failures, 408/429/5xx); a failure comes back as a `CallError` value for the caller to report per
document, never as an exception that would lose the other documents' scores.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

# Part of the score cache key: change it whenever the prompt, the call parameters or the parsing change.
JUDGE_PROMPT_VERSION = "ibm-yesno-v1"

# The paper's prompts, verbatim (data, not code): generative_llms.py, LLMJudgeYesNoProbs.__init__ and
# generate_hypothetical_documents. The task sentence ends in a space; the judge prompt has no space after "(Yes/No):".
_JUDGE_HEAD = "Here is a user query and a document. Is this document relevant for this query? "
_JUDGE_TASK = "Judge the relevance according to the following task: {instruction} "
_JUDGE_TAIL = (
    "Answer with only yes/no, without any preceding tokens. Query: {query}\nDocument: {document}\nRelevant? (Yes/No):"
)
_HYDE_TEMPLATE = (
    "Write a representative document passage that would be relevant to the following query. "
    "The passage should capture key concepts and terminology that relevant documents would contain.\n\n"
    "Query: {query}\n\n"
    "Passage:"
)
# The paper's judge call (LLMJudgeYesNoProbs.get_relevance_scores): 5 new tokens, the top 5 alternatives of each,
# no temperature (the server's default); the score reads the first 2 positions and is rounded to 5 decimals.
_JUDGE_MAX_TOKENS = 5
_JUDGE_TOP_LOGPROBS = 5
_JUDGE_TOKENS_CHECKED = 2
_JUDGE_SCORE_DECIMALS = 5
_MIN_YES_NO_MASS = 1e-4  # below it the judge did not answer yes/no at all
_MAX_INPUT_CHARS = 500_000  # the paper's MAX_INPUT_CHARS: the document is cut so that the prompt stays within it
# The paper's regexes: "Yes", " yes", "YES.", "Ġyes" (byte-level BPE), "▁Yes" (sentencepiece) — not "yesterday".
_YES = re.compile(r"(\W|Ġ|_)*yes(\W|Ġ|_)*", re.IGNORECASE)
_NO = re.compile(r"(\W|Ġ|_)*no(\W|Ġ|_)*", re.IGNORECASE)
_RETRY_BACKOFF_S = 0.25
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class CallError:
    """Why one judge or writer call produced no result: `timeout`, `unreachable`, `http_error` or `bad_response`."""

    code: str
    message: str


def judge_prompt(query: str, document: str, instruction: str | None) -> str:
    """The paper's yes/no question; `instruction` (the task to judge by) is left out when empty, as there."""
    task = _JUDGE_TASK.format(instruction=instruction) if instruction else ""
    # The paper cuts the document so that the template (its two "{}" included) plus query and document stay
    # within _MAX_INPUT_CHARS; a prompt the judge's context cannot hold is that document's error, not a score.
    template_chars = len(_JUDGE_HEAD + task + _JUDGE_TAIL.format(query="", document="")) + len("{}{}")
    document = document[: max(0, _MAX_INPUT_CHARS - template_chars - len(query))]
    return _JUDGE_HEAD + task + _JUDGE_TAIL.format(query=query, document=document)


def hyde_prompt(query: str) -> str:
    """The paper's HyDE request: the query only, no task instruction."""
    return _HYDE_TEMPLATE.format(query=query)


def _chat_payload(model: str, prompt: str, seed: int, **params: Any) -> dict[str, Any]:
    """One user message, as the paper sends it; Qwen3 judges are asked not to think first, as there (their
    thinking would fill the few new tokens the score reads)."""
    payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "seed": seed}
    if "qwen" in model.lower():
        payload["chat_template_kwargs"] = {"enable_thinking": False}
    return payload | params


def judge_payload(model: str, query: str, document: str, instruction: str | None, seed: int) -> dict[str, Any]:
    """The paper's judge call: max_tokens 5, logprobs with the top 5 alternatives, the server's own temperature."""
    prompt = judge_prompt(query, document, instruction)
    return _chat_payload(
        model, prompt, seed, max_tokens=_JUDGE_MAX_TOKENS, logprobs=True, top_logprobs=_JUDGE_TOP_LOGPROBS
    )


def yes_no_score(response: dict[str, Any]) -> float:
    """P(yes) / (P(yes) + P(no)) as the paper computes it: at the first of the first two generated positions whose
    top alternatives hold any yes/no spelling with more than 1e-4 probability, summed per class, rounded to 5
    decimals. Raises ValueError when there is none (the paper's "ERR")."""
    try:
        positions = response["choices"][0]["logprobs"]["content"] or []
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("the response holds no logprobs (does the server support `logprobs`?)") from exc
    for position in positions[:_JUDGE_TOKENS_CHECKED]:
        yes = no = 0.0
        for alt in position.get("top_logprobs") or []:
            token, logprob = alt.get("token"), alt.get("logprob")
            if not isinstance(token, str) or not isinstance(logprob, int | float) or math.isnan(logprob):
                continue
            if _YES.fullmatch(token):
                yes += math.exp(logprob)
            elif _NO.fullmatch(token):
                no += math.exp(logprob)
        if yes + no > _MIN_YES_NO_MASS:
            return round(yes / (yes + no), _JUDGE_SCORE_DECIMALS)
    seen = [p.get("token") for p in positions[:_JUDGE_TOKENS_CHECKED]]
    raise ValueError(f"no yes/no among the first tokens' top_logprobs (the judge wrote {seen!r})")


class ChatClient:
    """One chat-completions endpoint; `base_url` ends where the OpenAI SDK's does (`…/v1`)."""

    def __init__(self, base_url: str, api_key: str | None, max_retries: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        # As in the paper's code: OpenAI's own API takes `max_completion_tokens` (its newer models refuse `max_tokens`).
        self._limit_field = (
            "max_completion_tokens" if httpx.URL(self.base_url).host == "api.openai.com" else "max_tokens"
        )
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # Each call's own deadline bounds it (asyncio.timeout below); the pool is sized by the callers' semaphores.
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=None, limits=httpx.Limits(max_connections=256)
        )

    async def complete(
        self, payload: dict[str, Any], timeout_s: float, parse: Callable[[dict[str, Any]], T]
    ) -> T | CallError:
        """POST /chat/completions and `parse` the JSON (ValueError: a bad response), retrying transient failures."""
        if "max_tokens" in payload:
            payload = {(self._limit_field if k == "max_tokens" else k): v for k, v in payload.items()}
        error = CallError("unreachable", "not tried")
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(_RETRY_BACKOFF_S * 2 ** (attempt - 1))
            try:
                async with asyncio.timeout(timeout_s):
                    response = await self._http.post("/chat/completions", json=payload)
            except TimeoutError:
                error = CallError("timeout", f"no answer within {timeout_s:g} s")
                continue
            except httpx.TransportError as exc:
                error = CallError("unreachable", f"{self.base_url}: {type(exc).__name__} {exc}".strip())
                continue
            if response.status_code != 200:
                error = CallError("http_error", f"answered {response.status_code}: {response.text[:300]}")
                if response.status_code in _RETRYABLE_STATUS:
                    continue
                return error
            try:
                return parse(response.json())
            except ValueError as exc:
                return CallError("bad_response", str(exc))
        return error

    async def aclose(self) -> None:
        await self._http.aclose()


async def judge(
    client: ChatClient,
    model: str,
    query: str,
    instruction: str | None,
    documents: list[str],
    concurrency: int,
    timeout_s: float,
    seed: int,
    budget_s: float,
) -> list[float | CallError]:
    """One yes/no question per document, at most `concurrency` in flight, each call within `timeout_s` and all of
    them within `budget_s`; a score or a CallError per document."""
    gate = asyncio.Semaphore(concurrency)

    async def one(document: str) -> float | CallError:
        async with gate:
            return await client.complete(
                judge_payload(model, query, document, instruction, seed), timeout_s, yes_no_score
            )

    tasks = [asyncio.ensure_future(one(d)) for d in documents]
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, timeout=budget_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    late = CallError("timeout", f"not judged within the request's remaining {budget_s:.3g} s")
    return [task.result() if task in done else late for task in tasks]


async def write_passage(
    client: ChatClient, model: str, query: str, seed: int, temperature: float, max_tokens: int, timeout_s: float
) -> str | CallError:
    """HyDE: the paper's request for a hypothetical document (its defaults: temperature 0.7, 256 tokens), sampled
    with `seed`."""
    payload = _chat_payload(model, hyde_prompt(query), seed, max_tokens=max_tokens, temperature=temperature)
    return await client.complete(payload, timeout_s, _message_text)


def _message_text(response: dict[str, Any]) -> str:
    """The passage as written (the paper embeds it unstripped); an empty one is an error."""
    try:
        text = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("the response holds no message") from exc
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the LLM wrote an empty passage")
    return text
