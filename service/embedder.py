"""The gateway's core without HTTP: check inputs against the worker's /info, serve hits from the cache,
send the misses through the model's coalescer, and store what comes back.

Vectors come out as the worker computed them (full dimension, float32); `dimensions` and the
encoding are the HTTP layer's business, so the cache holds one entry per input whatever they are.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from model_server import rules, tracing
from model_server.protocol import INTERNAL_ERROR, INVALID_INPUT, EmbedItem, InputType, ItemError, ModelInfo
from model_server.rules import ItemRejected
from service.cache import CachedEmbedding, EmbeddingCache, cache_key
from service.coalescer import Coalescer, CoalescerLimits, WorkItem
from service.limits import meter_tokens
from service.metrics import GatewayMetrics
from service.openai_api import ApiError, InvalidRequest
from service.settings import GatewaySettings
from service.workers import WorkerPool

#: `refinement_steps: "auto"` stops a sequence once a step moves its embedding by less than this (1 - cos)
DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    # None: the model's default; (lowest, highest): the most the load allows within the range
    refinement_steps: int | Literal["auto"] | tuple[int, int] | None = None
    input_type: InputType = "query"
    instruction: str | None = None  # None: the model's default
    truncate: bool = True
    seed: int | None = None  # o1 thoughts; None: the worker's default seed
    samples: int | None = None  # o1 thoughts per input; None: the model's default
    tolerance: float = DEFAULT_TOLERANCE  # with "auto": stop once a step moves the embedding by less (1 - cos)
    trajectory: bool = False  # also the embedding after every step


@dataclass
class Embeddings:
    vectors: np.ndarray  # (inputs, the model's dimension), float32
    prompt_tokens: int
    cache: Literal["hit", "miss", "partial"]
    queue_s: float
    compute_s: float
    steps: list[int] = field(default_factory=list)  # per input, the refinement steps that ran
    trajectories: list[np.ndarray] | None = None  # per input [steps, D], when asked for


class Embedder:
    def __init__(
        self, pool: WorkerPool, cache: EmbeddingCache, settings: GatewaySettings, metrics: GatewayMetrics
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.metrics = metrics
        limits = CoalescerLimits.from_settings(settings)
        self.coalescers = {name: Coalescer(name, g, limits, metrics) for name, g in pool.groups.items()}
        self._timeout_s = settings.request_timeout_s
        self._writes: set[asyncio.Task] = set()  # cache stores run after the response

    def start(self) -> None:
        for coalescer in self.coalescers.values():
            coalescer.start()

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.coalescers.values()), *self._writes)

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
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        info = self.model_info(model)
        items = self._items(model, info, inputs, options)
        keys = [cache_key(info, item) for item in items]
        with tracing.span("cache.lookup", attributes={"genembed.items": len(keys)}) as span:
            found = await self.cache.get_many(keys)
            tracing.set_attributes(span, {"genembed.cache.hits": sum(f is not None for f in found)})
        # A vector cut by truncation must not answer a request that forbids truncation.
        results = [c if c is not None and (options.truncate or not c.truncated) else None for c in found]
        misses = [i for i, r in enumerate(results) if r is None]
        self.metrics.cache_items.labels("hit").inc(len(items) - len(misses))
        self.metrics.cache_items.labels("miss").inc(len(misses))
        queue_s = compute_s = 0.0
        if misses and isinstance(options.refinement_steps, tuple):
            self._shed_steps(model, items, keys, misses, *options.refinement_steps)
        if misses:
            work = [WorkItem(keys[i], items[i]) for i in misses]
            coalesced = await self.coalescers[model].embed(work, deadline, request_id)
            queue_s, compute_s = coalesced.queue_s, coalesced.compute_s
            fresh: dict[bytes, CachedEmbedding] = {}
            failure: ApiError | None = None
            for i, outcome in zip(misses, coalesced.outcomes, strict=True):
                if outcome.error is not None:
                    failure = failure or _item_error(i, len(items), outcome.error)
                    continue
                results[i] = fresh[keys[i]] = CachedEmbedding(
                    outcome.vector, outcome.prompt_tokens, outcome.truncated, outcome.steps, outcome.trajectory
                )
            if fresh:
                task = asyncio.create_task(self.cache.put_many(fresh))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
            if failure is not None:
                raise failure
        prompt_tokens = sum(r.prompt_tokens for r in results)
        meter_tokens(prompt_tokens)
        self.metrics.input_tokens.labels(model).inc(prompt_tokens)
        for result in results:
            self.metrics.refinement_steps.labels(model).observe(result.steps)
        trajectories = None
        if options.trajectory:  # K = 0 has none: an empty one
            empty = np.zeros((0, info.dimension), np.float32)
            trajectories = [r.trajectory if r.trajectory is not None else empty for r in results]
        return Embeddings(
            vectors=np.stack([r.vector for r in results]),
            steps=[r.steps for r in results],
            trajectories=trajectories,
            prompt_tokens=prompt_tokens,
            cache="miss" if len(misses) == len(items) else "partial" if misses else "hit",
            queue_s=queue_s,
            compute_s=compute_s,
        )

    def _shed_steps(
        self, model: str, items: list[EmbedItem], keys: list[bytes], misses: list[int], lowest: int, highest: int
    ) -> None:
        """Give the inputs to compute the most steps in lowest..highest that the model's load admits (shed compute
        before requests); `items` and `keys` are updated in place. Cache hits keep the steps they were asked at."""
        granted = self.coalescers[model].grant_steps([items[i] for i in misses], lowest, highest)
        if granted == highest:
            return
        info = self.model_info(model)
        for i in misses:
            items[i] = dataclasses.replace(items[i], steps=granted)
            keys[i] = cache_key(info, items[i])
        self.metrics.steps_shed.labels(model).inc((highest - granted) * len(misses))

    @staticmethod
    def _items(model: str, info: ModelInfo, inputs: list[str | list[int]], options: EmbedOptions) -> list[EmbedItem]:
        """Resolve K and check the request by the worker's own rules (model_server/rules.py) against the model's
        /info card, early: no queue place, no worker round trip."""
        tolerance = None
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
                )
            )
        return items


def _rejected(error: ItemError, where: str = "") -> InvalidRequest:
    """A rule the request breaks, found before any worker saw it: the worker's message and code, except that its
    generic `invalid_input` is the gateway's `invalid_request` (the request is wrong, not one input)."""
    return InvalidRequest(
        where + error.message, param=error.param, code=None if error.code == INVALID_INPUT else error.code
    )


def _item_error(index: int, count: int, error: ItemError) -> ApiError:
    message = f"input[{index}]: {error.message}" if count > 1 else error.message
    if error.code == INTERNAL_ERROR:
        return ApiError(message, code=error.code)
    return InvalidRequest(message, param=error.param, code=error.code)
