"""The gateway's core without HTTP: check inputs against the worker's /info, serve hits from the cache,
send the misses through the model's coalescer (one worker call per request), and store what comes back.

Vectors come out as the worker computed them (full dimension, float32); `dimensions` and the
encoding are the HTTP layer's business, so the cache holds one entry per input whatever they are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from common import rules, tracing
from common.protocol import INTERNAL_ERROR, INVALID_INPUT, EmbedItem, InputType, ItemError, ModelInfo, Priority
from common.rules import ItemRejected
from service.cache import CachedEmbedding, EmbeddingCache, cache_key
from service.coalescer import Coalescer, ItemOutcome, WorkItem
from service.errors import InvalidRequest, ServiceError
from service.limits import meter_tokens
from service.loop_lag import LoopLag
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings
from service.workers import WorkerPool

#: `refinement_steps: "auto"` stops a sequence once a step moves its embedding by less than this (1 - cos)
DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    # None: the model's default; (lowest, highest): the most the worker's load allows within the range
    refinement_steps: int | Literal["auto"] | tuple[int, int] | None = None
    input_type: InputType = "query"
    instruction: str | None = None  # None: the model's default
    truncate: bool = True
    seed: int | None = None  # o1 thoughts; None: the worker's default seed
    samples: int | None = None  # o1 thoughts per input; None: the model's default
    tolerance: float = DEFAULT_TOLERANCE  # with "auto": stop once a step moves the embedding by less (1 - cos)
    trajectory: bool = False  # also the embedding after every step
    # batch: no deadline, runs in what online work leaves, never refused for load (waits instead); the caller
    # bounds how many it has in flight
    priority: Priority = "online"


@dataclass
class Embeddings:
    vectors: np.ndarray  # (inputs, the model's dimension), float32
    prompt_tokens: int
    cache: Literal["hit", "miss", "partial"]
    queue_s: float
    compute_s: float
    steps: list[int] = field(default_factory=list)  # per input, the refinement steps that ran
    trajectories: list[np.ndarray] | None = None  # per input [steps, D], when asked for


@dataclass
class PairScores:
    scores: list[float | ItemError]  # per pair: the relevance logit, or why the worker refused it
    prompt_tokens: int  # cache hits count theirs
    cache_hits: int


class Embedder:
    def __init__(
        self, pool: WorkerPool, cache: EmbeddingCache, settings: GatewaySettings, metrics: GatewayMetrics
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.metrics = metrics
        self.loop_lag = LoopLag(metrics)
        self.coalescers = {
            name: Coalescer(name, g, settings, metrics, self.loop_lag, functools.partial(self._store, name))
            for name, g in pool.groups.items()
        }
        self._timeout_s = settings.request_timeout_s
        self._info_wait_s = settings.worker_probe_interval_s

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.coalescers.values()), self.loop_lag.aclose())

    def model_info(self, model: str) -> ModelInfo:
        """The model's workers' last /info; raises ModelNotFound (404), or Unavailable (503) before the first.

        While every worker is down the last info is kept, so requests the cache would answer still succeed;
        the coalescer refuses the rest at once.
        """
        group = self.pool.get(model)
        info = group.info
        if info is None:
            raise group.unavailable()
        return info

    async def embed(
        self, model: str, inputs: list[str | list[int]], options: EmbedOptions, request_id: str
    ) -> Embeddings:
        """The inputs' vectors. Online: within the request timeout, or a ServiceError (429 when no worker can take
        the request now). Batch priority: no deadline, never refused for load; it waits, for a worker's first /info
        too, until answered (the caller bounds how many it runs at once)."""
        online = options.priority == "online"
        deadline = asyncio.get_running_loop().time() + self._timeout_s if online else None
        info = self.model_info(model) if online else await self._wait_for_info(model)
        items = self._items(model, info, inputs, options)
        keys = [cache_key(info, item) for item in items]
        results = await self._cached(keys, options.truncate)
        misses = [i for i, r in enumerate(results) if r is None]
        computed, queue_s, compute_s = await self._compute(
            model, keys, items, misses, deadline, request_id, options.priority
        )
        failure: ServiceError | None = None
        for i, outcome in zip(misses, computed, strict=True):
            if isinstance(outcome, ItemError):
                failure = failure or _item_error(i, len(items), outcome)
            results[i] = outcome
        if failure is not None:
            raise failure
        done = [r for r in results if isinstance(r, CachedEmbedding)]  # all of them: a failure raised above
        prompt_tokens = self._charge(model, done)
        for result in done:
            self.metrics.refinement_steps.labels(model).observe(result.steps)
        trajectories = None
        if options.trajectory:  # K = 0 has none: an empty one
            empty = np.zeros((0, info.dimension), np.float32)
            trajectories = [r.trajectory if r.trajectory is not None else empty for r in done]
        return Embeddings(
            vectors=np.stack([r.vector for r in done]),
            steps=[r.steps for r in done],
            trajectories=trajectories,
            prompt_tokens=prompt_tokens,
            cache="miss" if len(misses) == len(items) else "partial" if misses else "hit",
            queue_s=queue_s,
            compute_s=compute_s,
        )

    async def score_pairs(
        self, model: str, query: str, documents: list[str], request_id: str, budget_s: float
    ) -> PairScores:
        """A cross_encoder model's relevance of each (query, document) pair, served as `embed` serves inputs (cache,
        batching, admission, deadline, tokens charged to the caller's key); the deadline is `budget_s` or the
        request timeout, whichever is sooner. A pair the worker refused comes back as its error, for the caller
        to report per document."""
        deadline = asyncio.get_running_loop().time() + min(budget_s, self._timeout_s)
        info = self.model_info(model)
        items = [EmbedItem(text=query, text_pair=document, steps=0) for document in documents]
        keys = [cache_key(info, item) for item in items]
        results = await self._cached(keys, truncate=True)
        misses = [i for i, r in enumerate(results) if r is None]
        computed, _, _ = await self._compute(model, keys, items, misses, deadline, request_id, "online")
        for i, outcome in zip(misses, computed, strict=True):
            results[i] = outcome
        done = [r for r in results if isinstance(r, CachedEmbedding)]
        # Raw logits; with several labels the last is taken as "relevant".
        scores = [r if isinstance(r, ItemError) else float(r.vector[-1]) for r in results if r is not None]
        return PairScores(scores, self._charge(model, done), cache_hits=len(items) - len(misses))

    async def _cached(self, keys: list[bytes], truncate: bool) -> list[CachedEmbedding | ItemError | None]:
        """The cache's entry per key (None: compute it)."""
        with tracing.span("cache.lookup", attributes={"genembed.items": len(keys)}) as span:
            found = await self.cache.get_many(keys)
            tracing.set_attributes(span, {"genembed.cache.hits": sum(f is not None for f in found)})
        # A vector cut by truncation must not answer a request that forbids truncation.
        results: list[CachedEmbedding | ItemError | None] = [
            c if c is not None and (truncate or not c.truncated) else None for c in found
        ]
        misses = sum(r is None for r in results)
        self.metrics.cache_items.labels("hit").inc(len(keys) - misses)
        self.metrics.cache_items.labels("miss").inc(misses)
        return results

    async def _compute(
        self,
        model: str,
        keys: list[bytes],
        items: list[EmbedItem],
        misses: list[int],
        deadline: float | None,
        request_id: str,
        priority: Priority,
    ) -> tuple[list[CachedEmbedding | ItemError], float, float]:
        """The `misses` through the model's coalescer: per miss its result or the worker's error, the queue and
        compute seconds (the coalescer stores computed results in the cache: `_store`)."""
        if not misses:
            return [], 0.0, 0.0
        work = [WorkItem(_flight_key(keys[i], items[i]), items[i]) for i in misses]
        coalesced = await self.coalescers[model].embed(work, deadline, request_id, priority)
        computed: list[CachedEmbedding | ItemError] = []
        shed = 0
        for i, outcome in zip(misses, coalesced.outcomes, strict=True):
            if outcome.error is not None or outcome.vector is None:
                computed.append(outcome.error or ItemError(INTERNAL_ERROR, "the worker sent no vector"))
                continue
            if items[i].min_steps is not None:
                shed += (items[i].steps or 0) - outcome.steps
            computed.append(_cached_embedding(outcome))
        if shed:
            self.metrics.steps_shed.labels(model).inc(shed)
        return computed, coalesced.queue_s, coalesced.compute_s

    async def _store(self, model: str, items: list[EmbedItem], outcomes: list[ItemOutcome]) -> None:
        """A worker call's answers into the cache, while the coalescer still holds them in flight; a step range's
        under the steps the worker granted (the key a request for exactly those steps looks up)."""
        info = self.pool.get(model).info
        if info is None:
            return
        fresh: dict[bytes, CachedEmbedding] = {}
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome.error is None and outcome.vector is not None:
                exact = (
                    item if item.min_steps is None else dataclasses.replace(item, steps=outcome.steps, min_steps=None)
                )
                fresh[cache_key(info, exact)] = _cached_embedding(outcome)
        if fresh:
            await self.cache.put_many(fresh)

    async def _wait_for_info(self, model: str) -> ModelInfo:
        """The model's /info, waiting (batch priority) while no worker has answered yet."""
        group = self.pool.get(model)
        while group.info is None:
            await asyncio.sleep(self._info_wait_s)
        return group.info

    def _charge(self, model: str, results: list[CachedEmbedding]) -> int:
        """Their prompt tokens (cache hits count), charged to the request's key and counted; returns them."""
        prompt_tokens = sum(r.prompt_tokens for r in results)
        meter_tokens(prompt_tokens)
        self.metrics.input_tokens.labels(model).inc(prompt_tokens)
        return prompt_tokens

    @staticmethod
    def _items(model: str, info: ModelInfo, inputs: list[str | list[int]], options: EmbedOptions) -> list[EmbedItem]:
        """Resolve K and check the request by the worker's own rules (common/rules.py) against the model's
        /info card, early: no queue place, no worker round trip."""
        tolerance = None
        lowest: int | None = None  # a step range's floor: the worker grants lowest..steps
        steps: int | None
        if options.refinement_steps == "auto":
            steps, tolerance = info.max_refinement_steps, options.tolerance
        elif isinstance(options.refinement_steps, tuple):
            lowest, steps = options.refinement_steps
            if lowest < info.min_refinement_steps:
                steps = lowest  # reported as out of range
        else:
            steps = options.refinement_steps
        try:
            rules.check_step_options(model, info.method, tolerance, options.trajectory)
            steps = rules.check_steps(model, info, steps)
            rules.check_sampling(model, info, options.seed, options.samples)
        except ItemRejected as rejected:
            raise _rejected(rejected.error) from None
        items = []
        for i, value in enumerate(inputs):
            text = value if isinstance(value, str) else None
            if not isinstance(value, str):
                try:
                    rules.check_token_ids(model, value, info.vocab_size)
                except ItemRejected as rejected:
                    raise _rejected(rejected.error, f"input[{i}]: ") from None
            items.append(
                EmbedItem(
                    text=text,
                    token_ids=None if text is not None else value,  # type: ignore[arg-type]
                    input_type=options.input_type,
                    instruction=options.instruction,
                    steps=steps,
                    truncate=options.truncate,
                    seed=options.seed,
                    samples=options.samples,
                    tolerance=tolerance,
                    trajectory=options.trajectory,
                    min_steps=lowest if lowest != steps else None,
                )
            )
        return items


def _cached_embedding(outcome: ItemOutcome) -> CachedEmbedding:
    return CachedEmbedding(outcome.vector, outcome.prompt_tokens, outcome.truncated, outcome.steps, outcome.trajectory)


def _flight_key(key: bytes, item: EmbedItem) -> bytes:
    """An input's identity in flight: its cache key (at the range's top), and its floor when it allows a range, so a
    ranged input never shares a computation with a fixed one that must run every step."""
    return key if item.min_steps is None else key + b"/min=%d" % item.min_steps


def _rejected(error: ItemError, where: str = "") -> InvalidRequest:
    """A rule the request breaks, found before any worker saw it: the worker's message and code, except that its
    generic `invalid_input` is the gateway's `invalid_request` (the request is wrong, not one input)."""
    return InvalidRequest(
        where + error.message, param=error.param, code=None if error.code == INVALID_INPUT else error.code
    )


def _item_error(index: int, count: int, error: ItemError) -> ServiceError:
    message = f"input[{index}]: {error.message}" if count > 1 else error.message
    if error.code == INTERNAL_ERROR:
        return ServiceError(message, code=error.code)
    return InvalidRequest(message, param=error.param, code=error.code)
