"""An OpenAI-compatible chat-completions client for the LLM judge and HyDE (vLLM, LiteLLM, llama.cpp, OpenAI).

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

# Part of the score cache key: change it whenever the prompt or the parsing changes.
JUDGE_PROMPT_VERSION = "yesno-v1"
_JUDGE_TOKENS_CHECKED = 2  # the answer may start with a space, a quote or "Answer:" before yes/no
_JUDGE_TOP_LOGPROBS = 10
_MIN_YES_NO_MASS = 1e-4  # below it the judge did not answer yes/no at all
_MAX_DOCUMENT_CHARS = 8000  # ~2k tokens: keeps one prompt inside a small judge's context
_RETRY_BACKOFF_S = 0.25
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# "Yes", " yes", "YES.", "▁Yes" (sentencepiece), "Ġyes" (byte-level BPE) — but not "yesterday" or "nothing".
_YES = re.compile(r"[\W_Ġ▁]*yes[\W_]*", re.IGNORECASE)
_NO = re.compile(r"[\W_Ġ▁]*no[\W_]*", re.IGNORECASE)


@dataclass(frozen=True)
class CallError:
    """Why one judge or writer call produced no result: `timeout`, `unreachable`, `http_error` or `bad_response`."""

    code: str
    message: str


def judge_prompt(query: str, document: str, instruction: str | None) -> str:
    task = f"The search task: {instruction}\n" if instruction else ""
    return (
        "You judge search results. Decide whether the document is relevant to the query.\n"
        f"{task}"
        f"Query: {query}\n"
        f"Document: {document[:_MAX_DOCUMENT_CHARS]}\n"
        "Is the document relevant to the query? Answer with a single word: yes or no."
    )


def hyde_prompt(query: str, instruction: str | None) -> str:
    task = f" The search task: {instruction}" if instruction else ""
    return (
        "Write a short passage that answers the query below, in the style of a document a search engine would "
        f"return for it, with the terms such a document would use.{task}\n"
        f"Query: {query}\n"
        "Passage:"
    )


def yes_no_score(response: dict[str, Any]) -> float:
    """P(yes) / (P(yes) + P(no)), summed over the yes/no spellings among the alternatives of the first tokens
    (the first position that holds any). Raises ValueError when none of them is a yes or a no."""
    try:
        positions = response["choices"][0]["logprobs"]["content"] or []
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("the response holds no logprobs (does the server support `logprobs`?)") from exc
    for position in positions[:_JUDGE_TOKENS_CHECKED]:
        alternatives = position.get("top_logprobs") or [position]
        yes = no = 0.0
        for alt in alternatives:
            token, logprob = alt.get("token"), alt.get("logprob")
            if not isinstance(token, str) or not isinstance(logprob, int | float) or not math.isfinite(logprob):
                continue
            if _YES.fullmatch(token):
                yes += math.exp(logprob)
            elif _NO.fullmatch(token):
                no += math.exp(logprob)
        if yes + no > _MIN_YES_NO_MASS:
            return yes / (yes + no)
    seen = [p.get("token") for p in positions[:_JUDGE_TOKENS_CHECKED]]
    raise ValueError(f"no yes/no among the first tokens' alternatives (the judge wrote {seen!r})")


class ChatClient:
    """One chat-completions endpoint; `base_url` ends where the OpenAI SDK's does (`…/v1`)."""

    def __init__(self, base_url: str, api_key: str | None, max_retries: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # Each call's own deadline bounds it (asyncio.timeout below); the pool is sized by the callers' semaphores.
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=None, limits=httpx.Limits(max_connections=256)
        )

    async def complete(
        self, payload: dict[str, Any], timeout_s: float, parse: Callable[[dict[str, Any]], T]
    ) -> T | CallError:
        """POST /chat/completions and `parse` the JSON (ValueError: a bad response), retrying transient failures."""
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
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": judge_prompt(query, document, instruction)}],
            "max_tokens": _JUDGE_TOKENS_CHECKED,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": _JUDGE_TOP_LOGPROBS,
            "seed": seed,
        }
        async with gate:
            return await client.complete(payload, timeout_s, yes_no_score)

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
    client: ChatClient,
    model: str,
    query: str,
    instruction: str | None,
    seed: int,
    temperature: float,
    max_tokens: int,
    timeout_s: float,
) -> str | CallError:
    """HyDE: a hypothetical document for the query, sampled with `seed`."""
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": hyde_prompt(query, instruction)}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    return await client.complete(payload, timeout_s, _message_text)


def _message_text(response: dict[str, Any]) -> str:
    try:
        text = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("the response holds no message") from exc
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the LLM wrote an empty passage")
    return text.strip()
